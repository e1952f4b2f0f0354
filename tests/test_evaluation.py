"""Evaluation against independent references: float64 log-likelihoods computed one sequence at a time,
the BLEU/ROUGE libraries' own documented examples, and lm-eval's own `hf` backend on the export."""

from __future__ import annotations

import json

import pytest
import torch

from blueberry.configs import AdaptiveMoEModelConfig
from blueberry.data.tokenizer import train_bpe
from blueberry.evaluation.scoring import rolling_loglikelihood, score
from blueberry.evaluation.tasks import evaluate_task, load_task
from blueberry.models import create_model
from helpers import TINY_FLAGS, run_cli

TEXT = ["the king speaks to the queen of night and day\n", "fire and wind, stone and river, gold and iron\n"]


@pytest.fixture(scope="module")
def tok():
    return train_bpe(TEXT * 30, 300)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = AdaptiveMoEModelConfig(d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=48, vocab_size=300,
                                 num_experts=4, device="cpu", use_fp8=False).validate()
    m = create_model(cfg).eval()
    for p in m.parameters():
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.2)
    return m


def reference_loglik(model, context, continuation):
    """float64, one unpadded sequence at a time."""
    ids = (context + continuation)[-(model.config.max_seq_len + 1):]
    n = min(len(continuation), len(ids) - 1)
    m64 = type(model)(model.config).double().eval()
    m64.load_state_dict(model.state_dict())
    with torch.no_grad():
        logp = torch.log_softmax(m64(torch.tensor([ids[:-1]])).logits[0].double(), -1)
    return sum(float(logp[len(ids) - 1 - n + j, ids[len(ids) - n + j]]) for j in range(n))


def test_batched_scores_equal_float64_one_at_a_time(model):
    g = torch.Generator().manual_seed(1)
    pairs = [(torch.randint(1, 300, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g).tolist(),
              torch.randint(1, 300, (int(torch.randint(1, 8, (1,), generator=g)),), generator=g).tolist())
             for _ in range(11)]
    pairs.append((list(range(1, 60)), [5, 6, 7]))  # longer than the window: the context is cut on the left
    got = score(model, pairs, batch_size=4)
    for (context, continuation), (logp, _) in zip(pairs, got):
        assert logp == pytest.approx(reference_loglik(model, context, continuation), abs=1e-4)


def test_rolling_windows_are_lm_evals_own():
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from blueberry.evaluation.scoring import rolling_windows

    for window in (1, 4, 16):
        for n in range(0, 70):
            ids = list(range(100, 100 + n))
            theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(ids, 7, window, 1)]
            assert rolling_windows(ids, 7, window) == [(list(a), list(b)) for a, b in theirs], (window, n)


def test_rolling_loglikelihood_scores_every_token_once_after_its_preceding_context(model):
    ids = torch.randint(1, 300, (100,), generator=torch.Generator().manual_seed(2)).tolist()
    assert model.config.max_seq_len == 48  # windows: tokens 0-47 after the prefix, 48-95 after token 47,
    expected = sum(reference_loglik(model, [0] + ids[:j], [ids[j]]) for j in range(48))  # 96-99 after 51-95
    expected += sum(reference_loglik(model, ids[47:j], [ids[j]]) for j in range(48, 96))
    expected += sum(reference_loglik(model, ids[51:j], [ids[j]]) for j in range(96, 100))
    assert rolling_loglikelihood(model, ids, prefix=0) == pytest.approx(expected, abs=1e-3)


def test_acc_norm_is_per_character_as_lm_evals(model, tok, tmp_path, monkeypatch):
    """lm-eval's acc_norm divides by len(choice) in characters (api/task.py: completion_len); per byte
    ("acc_bytes") a non-ASCII choice is shorter and would win here."""
    import blueberry.evaluation.tasks as tasks

    path = tmp_path / "accents.jsonl"
    path.write_text(json.dumps({"context": "x", "choices": ["\u00e9\u00e9", "abc"], "answer": 1}) + "\n")
    monkeypatch.setattr(tasks, "score", lambda model, pairs, batch_size: [(-4.0, False), (-5.0, False)])
    result = evaluate_task(model, tok, load_task(str(path)))
    assert result["acc"] == 0.0 and result["acc_norm"] == 1.0  # -4/2 < -5/3 per character; -4/4 > -5/3 per byte


def test_task_scores_equal_a_hand_computation(model, tok, tmp_path):
    items = [{"context": "the king speaks to", "choices": [" the queen", " fire and iron", " day"], "answer": 0},
             {"context": "stone and", "choices": [" river", " the king of night"], "answer": 1},
             {"context": "gold", "choices": [" and iron", " speaks", " wind", " the"], "answer": 2}]
    path = tmp_path / "hand.jsonl"
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
    result = evaluate_task(model, tok, load_task(str(path)))
    correct = correct_norm = 0
    for item in items:
        context = [tok.eot_id] + tok.encode(item["context"])
        logps = [reference_loglik(model, context, tok.encode(c)) for c in item["choices"]]
        per_char = [lp / len(c) for lp, c in zip(logps, item["choices"])]
        correct += max(range(len(logps)), key=logps.__getitem__) == item["answer"]
        correct_norm += max(range(len(per_char)), key=per_char.__getitem__) == item["answer"]
    chance = (1 / 3 + 1 / 2 + 1 / 4) / 3
    assert result["acc"] == correct / 3 and result["acc_norm"] == correct_norm / 3
    assert result["centered"] == pytest.approx((correct / 3 - chance) / (1 - chance))


def test_bad_task_files_name_the_line(tmp_path):
    from blueberry.errors import UsageError

    path = tmp_path / "bad.jsonl"
    path.write_text('{"context": "a", "choices": ["b", "c"], "answer": 0}\n{"context": "a", "choices": ["b"], "answer": 3}\n')
    with pytest.raises(UsageError, match="bad.jsonl:2"):
        load_task(str(path))
    with pytest.raises(UsageError, match="neither a built-in task"):
        load_task("no-such-task")


def test_shipped_tasks_come_from_held_out_text_only():
    from blueberry.data.corpus import split_documents
    from blueberry.data.sources import load_documents
    from blueberry.evaluation.build_tasks import SPLIT_SEED, VAL_FRACTION

    train, _ = split_documents(load_documents("shakespeare", "text"), VAL_FRACTION, SPLIT_SEED)
    train_text = "\n".join(d.text for d in train)
    for name in ("shakespeare-next-line", "shakespeare-speaker"):
        task = load_task(name)
        assert len(task.items) >= 200
        for item in task.items[:60]:
            passage = item["context"].strip().splitlines()
            assert "\n".join(passage[-3:]) not in train_text, "a task passage appears in the training plays"


def test_bleu_and_rouge_reproduce_the_libraries_documented_examples():
    from blueberry.evaluation.generation_metrics import bleu, exact_match, rouge

    refs = [["The dog bit the man.", "It was not unexpected.", "The man bit him first."],
            ["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."]]
    hyps = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
    assert bleu(hyps, refs) == pytest.approx(48.53, abs=0.01)  # sacrebleu's README
    r = rouge(["The quick brown dog jumps on the log."], ["The quick brown fox jumps over the lazy dog"])
    assert r["rouge1"] == pytest.approx(0.70588, abs=1e-4) and r["rougeL"] == pytest.approx(0.58824, abs=1e-4)
    assert exact_match([" yes", "no"], ["yes", "maybe"]) == 0.5


# ---------------------------------------------------------------- runs, the CLI and lm-eval
@pytest.fixture(scope="module")
def run_dir(corpus_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_run")
    task = root / "mini.jsonl"
    task.write_text("".join(json.dumps({"context": f"the {w} ", "choices": ["king", "stone", "fire"],
                                        "answer": k % 3}) + "\n" for k, w in enumerate("night day love war".split())))
    r = run_cli("--dataset", corpus_dir, "--cache-dir", root / "cache", "--out-dir", root / "run", "--max-steps", "12",
                "--eval-every", "6", "--no-compile", "--eval-tasks", task, *TINY_FLAGS)
    assert r.returncode == 0, r.stderr
    return root / "run"


def test_a_run_logs_its_task_scores_at_the_final_evaluation(run_dir):
    from blueberry.runs.layout import read_metrics

    evals = [r for r in read_metrics(run_dir) if r["kind"] == "eval"]
    assert "mini/acc" not in evals[0] and 0 <= evals[-1]["mini/acc"] <= 1  # final only, by default
    assert "mini/centered" in json.loads((run_dir / "summary.json").read_text())


def test_eval_command_writes_json_and_markdown(run_dir):
    r = run_cli("eval", "--checkpoint", run_dir, "--batches", "2", "--tasks", "shakespeare-next-line", "--limit", "8",
                "--generation", "4")
    assert r.returncode == 0, r.stderr
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["tasks"]["shakespeare-next-line"]["items"] == 8 and "bleu" in report["generation"]
    assert "| shakespeare-next-line | 8 |" in (run_dir / "eval.md").read_text()


def test_compare_reads_runs_into_one_table_and_a_plot(run_dir, tmp_path):
    r = run_cli("compare", run_dir, run_dir, "--out", tmp_path / "c.png")
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("| run | moe | muon |")]
    assert len(rows) == 2 and "mini acc_norm" in r.stdout and (tmp_path / "c.png").stat().st_size
    bad = run_cli("compare", tmp_path)
    assert bad.returncode == 2 and "not a run directory" in bad.stderr


def lm_eval_task(directory, name: str, items: list[dict]) -> None:
    """An lm-eval YAML task over a local JSONL file (our item format, choices scored with no delimiter)."""
    (directory / f"{name}.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    (directory / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {directory / (name + '.jsonl')}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        'target_delimiter: ""\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n')


def short_items(n: int) -> list[dict]:
    """Items of the test corpus's words, short enough for the tiny run's 32-token window."""
    import random

    from conftest import WORDS

    rng = random.Random(n)
    return [{"context": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8))) + " ",
             "choices": rng.sample(WORDS, 4), "answer": rng.randrange(4)} for _ in range(n)]


def test_lm_eval_backend_equals_its_hf_backend_on_the_export_and_our_scorer(run_dir, tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    import blueberry.evaluation.harness as harness
    from blueberry.runs.loading import load_model

    lm_eval_task(tmp_path, "tiny_mc", short_items(12))
    assert run_cli("export", run_dir, tmp_path / "hf").returncode == 0
    manager = TaskManager(include_path=str(tmp_path))
    ours = lm_eval.simple_evaluate(model="blueberry", model_args=f"checkpoint={run_dir}", tasks=["tiny_mc"],
                                   task_manager=manager, batch_size=4, log_samples=True)
    theirs = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={tmp_path / 'hf'},dtype=float32",
                                     tasks=["tiny_mc"], task_manager=manager, batch_size=4, device="cpu",
                                     log_samples=True)
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"]["tiny_mc"][metric] == theirs["results"]["tiny_mc"][metric]
    ours_ll = [float(r[0][0]) for s in ours["samples"]["tiny_mc"] for r in s["resps"]]
    their_ll = [float(r[0][0]) for s in theirs["samples"]["tiny_mc"] for r in s["resps"]]
    assert max(abs(a - b) for a, b in zip(ours_ll, their_ll)) < 1e-3
    model, _, tok, _ = load_model(run_dir, "cpu")
    mine = evaluate_task(model, tok, load_task(str(tmp_path / "tiny_mc.jsonl")), encode=harness.encode_pair)
    assert mine["acc"] == pytest.approx(ours["results"]["tiny_mc"]["acc,none"])
    assert mine["acc_norm"] == pytest.approx(ours["results"]["tiny_mc"]["acc_norm,none"])


def test_lm_eval_verb_hands_its_arguments_to_lm_eval(run_dir, tmp_path):
    lm_eval_task(tmp_path, "tiny_speaker", short_items(4))
    r = run_cli("lm-eval", "--model", "blueberry", "--model_args", f"checkpoint={run_dir}", "--tasks", "tiny_speaker",
                "--include_path", tmp_path, "--batch_size", "4", "--output_path", tmp_path / "out")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "tiny_speaker" in r.stdout and list((tmp_path / "out").rglob("results*.json"))


def test_rolling_loglikelihood_equals_the_hf_backends_past_one_window(run_dir, tmp_path):
    """Text of several windows (the run's window is 32 tokens): lm-eval's rolling windows keep the
    preceding tokens as context; so must ours."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from blueberry.evaluation.harness import BlueberryLM

    assert run_cli("export", run_dir, tmp_path / "hf").returncode == 0
    texts = ["the king and the queen of night speak of fire and stone\n" * 12, "gold", "river wind " * 30]
    requests = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    ours = BlueberryLM(checkpoint=str(run_dir), device="cpu", batch_size=4)
    assert len(ours.tokenizer.encode(texts[0])) > 4 * ours.config.max_seq_len
    theirs = HFLM(pretrained=str(tmp_path / "hf"), dtype="float32", device="cpu", batch_size=4, max_length=32)
    for a, b in zip(ours.loglikelihood_rolling(requests), theirs.loglikelihood_rolling(requests)):
        assert a == pytest.approx(b, abs=1e-3)
