"""BERTScore beside BLEU/ROUGE: a tiny BERT (random weights, WordPiece tokenizer trained here) saved to a
temporary directory; our scores must equal an independent computation of the algorithm (greedy cosine
matching of layer-L token embeddings, [CLS]/[SEP] left out, no idf, no baseline) and the bert_score
package's own `score`."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import TINY_FLAGS, run_cli

pytest.importorskip("bert_score")

CANDIDATES = ["the king speaks to the queen", "a cat sat", "night and day", "the mat"]
REFERENCES = ["the queen speaks to the king", "a cat sat on the mat", "day and night", "the cat sat on the mat"]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path = tmp_path_factory.mktemp("bert")
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(CANDIDATES * 10 + REFERENCES * 10, trainers.WordPieceTrainer(
        vocab_size=120, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                      sep_token="[SEP]", mask_token="[MASK]", model_max_length=64).save_pretrained(path)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(path)
    return path


def reference_bertscore(path, candidates, references, layer):
    """BERTScore by hand: each sentence's layer-`layer` token vectors, normalised; P = mean over the candidate's
    word pieces of the best cosine with any reference token, R the other way, F = 2PR/(P+R). As in the paper's
    code, [CLS] and [SEP] take part in the matching but carry no weight in the means."""
    from transformers import AutoModel, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()

    def vectors(text):
        ids = tok(text, return_tensors="pt")
        with torch.no_grad():
            h = model(**ids, output_hidden_states=True).hidden_states[layer][0]
        return torch.nn.functional.normalize(h, dim=-1)

    ps, rs, fs = [], [], []
    for cand, ref in zip(candidates, references):
        sim = vectors(cand) @ vectors(ref).T
        p, r = sim.max(dim=1).values[1:-1].mean().item(), sim.max(dim=0).values[1:-1].mean().item()
        ps, rs, fs = ps + [p], rs + [r], fs + [2 * p * r / (p + r)]
    return sum(ps) / len(ps), sum(rs) / len(rs), sum(fs) / len(fs)


@pytest.mark.parametrize("layer", [None, 1])
def test_bertscore_equals_the_algorithm_and_the_package(tiny_bert, layer):
    import bert_score

    from blueberry.evaluation.generation_metrics import bertscore

    ours = bertscore(CANDIDATES, REFERENCES, str(tiny_bert), layer)
    used = layer or 3
    assert ours["bertscore_layers"] == used
    p, r, f = reference_bertscore(tiny_bert, CANDIDATES, REFERENCES, used)
    assert ours["bertscore_precision"] == pytest.approx(p, abs=1e-5)
    assert ours["bertscore_recall"] == pytest.approx(r, abs=1e-5)
    assert ours["bertscore_f1"] == pytest.approx(f, abs=1e-5)
    bp, br, bf = bert_score.score(CANDIDATES, REFERENCES, model_type=str(tiny_bert), num_layers=used, lang=None,
                                  idf=False, rescale_with_baseline=False)
    assert ours["bertscore_f1"] == pytest.approx(bf.mean().item(), abs=1e-6)
    assert bertscore(REFERENCES, REFERENCES, str(tiny_bert))["bertscore_f1"] == pytest.approx(1.0, abs=1e-5)
    with_empty = bertscore(CANDIDATES[:1] + [""], REFERENCES[:2], str(tiny_bert), used)  # an empty side scores 0
    assert with_empty["bertscore_f1"] == pytest.approx(fs_first(tiny_bert, used) / 2, abs=1e-5)


def fs_first(path, layer):
    return reference_bertscore(path, CANDIDATES[:1], REFERENCES[:1], layer)[2]


def test_eval_generation_reports_bertscore(tmp_path, corpus_dir, tiny_bert):
    r = run_cli("--dataset", corpus_dir, "--cache-dir", tmp_path / "c", "--out-dir", tmp_path / "run", "--max-steps",
                "2", "--eval-every", "2", "--no-compile", *TINY_FLAGS)
    assert r.returncode == 0, r.stderr
    r = run_cli("eval", "--checkpoint", tmp_path / "run", "--device", "cpu", "--generation", "3", "--dataset",
                corpus_dir, "--bertscore-model", tiny_bert, "--batches", "1")
    assert r.returncode == 0, r.stderr
    g = json.loads((tmp_path / "run" / "eval.json").read_text())["generation"]
    assert g["bertscore_layers"] == 3 and g["bertscore_model"] == str(tiny_bert)
    assert 0.0 <= g["bertscore_f1"] <= 1.0 and "BERTScore P" in r.stdout and "no baseline rescaling" in r.stdout


@pytest.mark.parametrize("flags,message", [
    (["--bertscore-model", "{bert}"], "--generation"),
    (["--generation", "2", "--bertscore-model", "{tmp}"], "no config.json"),
    (["--generation", "2", "--bertscore-model", "{bert}", "--bertscore-layers", "9"], "has 3 layers"),
])
def test_bertscore_flags_that_cannot_work_exit_2(tmp_path, tiny_bert, flags, message):
    flags = [f.format(bert=tiny_bert, tmp=tmp_path) for f in flags]
    r = run_cli("eval", "--checkpoint", tmp_path / "missing-run", *flags)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
