"""Supervised fine-tuning data (the loss only on what the assistant says, no attention across packed
conversations, the template the server uses) and the memory estimate checked against real optimizer
state sizes."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from blueberry.data.chat_template import chat_prompt_ids
from blueberry.data.sft import SFTDataset, encode_conversation, read_conversations
from blueberry.data.tokenizer import train_bpe
from helpers import TINY_FLAGS, run_cli

WORDS = "the king queen night day love war fire stone river gold".split()


def chats(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.sample(WORDS, 2)
        if i % 3 == 0:
            out.append({"prompt": f"say {a}", "completion": f"{a} {a}"})
        else:
            out.append({"messages": [{"role": "system", "content": "be brief"},
                                     {"role": "user", "content": f"say {a} then {b}"},
                                     {"role": "assistant", "content": f"{a} {b}"},
                                     {"role": "user", "content": "again"},
                                     {"role": "assistant", "content": f"{a} {b} {a}"}]})
    return out


@pytest.fixture(scope="module")
def tok():
    return train_bpe(["User: say the king\nAssistant: the king\nSystem: be brief\n" * 40], 300)


def test_mask_covers_exactly_the_assistant_messages(tok):
    messages = chats(2)[1]["messages"]
    ids, mask = encode_conversation(messages, tok)
    learned = tok.decode([i for i, m in zip(ids, mask) if m])
    expected = "".join(f" {m['content']}\n" for m in messages if m["role"] == "assistant")
    assert learned == expected and mask[-1] == 1 and ids[-1] == tok.eot_id  # it learns to stop
    prompt = tok.decode([i for i, m in zip(ids, mask) if not m])
    assert "User: say" in prompt and "Assistant:" in prompt and "System: be brief" in prompt


def test_training_prompt_equals_the_servers_prompt(tok):
    messages = chats(2)[1]["messages"]
    ids, _ = encode_conversation(messages, tok)
    served = chat_prompt_ids(messages[:-1], tok)  # what /v1/chat/completions feeds the model
    assert ids[:len(served)] == served


def test_windows_mask_prompts_and_keep_conversations_apart(tok):
    encoded = [encode_conversation(c["messages"] if "messages" in c else
                                   [{"role": "user", "content": c["prompt"]},
                                    {"role": "assistant", "content": c["completion"]}], tok) for c in chats(20)]
    ids = np.concatenate([np.array(i) for i, _ in encoded])
    mask = np.concatenate([np.array(m) for _, m in encoded])
    starts = np.cumsum([0] + [len(i) for i, _ in encoded[:-1]])
    ds = SFTDataset(ids, mask, starts, seq_len=32)
    for w in range(len(ds)):
        x, y, doc = ds[w]
        s = int(ds.starts[w])
        for j in range(32):
            learned = mask[s + 1 + j] == 1 and (s + 1 + j) not in set(starts.tolist())
            assert (y[j] == ids[s + 1 + j]) if learned else (y[j] == -100)  # prompt tokens carry no loss
        assert np.array_equal(doc, np.searchsorted(starts, np.arange(s, s + 32), side="right") - 1)


def test_bad_records_name_their_line(tmp_path):
    from blueberry.errors import DataError

    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps(chats(1)[0]) + "\n" + json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    with pytest.raises(DataError, match="c.jsonl:2"):
        read_conversations(path)
    path.write_text(json.dumps({"prompt": "a"}) + "\n")
    with pytest.raises(DataError, match="c.jsonl:1"):
        read_conversations(path)


def test_a_tokenizers_own_chat_template_is_used_and_masked(tmp_path):
    from transformers import PreTrainedTokenizerFast

    from blueberry.data.tokenizer import load_tokenizer

    base = train_bpe(["<|im_start|>user\nsay the king<|im_end|>\n" * 40], 300)
    fast = PreTrainedTokenizerFast(tokenizer_object=base.hf, eos_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    fast.save_pretrained(tmp_path / "tok")
    tok = load_tokenizer(str(tmp_path / "tok"))
    messages = [{"role": "user", "content": "say the king"}, {"role": "assistant", "content": "the king"}]
    ids, mask = encode_conversation(messages, tok)
    learned = [i for i, m in zip(ids, mask) if m]
    assert tok.auto.decode(learned) == "the king<|im_end|><|endoftext|>"


def test_sft_run_end_to_end_lowers_held_out_loss(tmp_path):
    from blueberry.runs.layout import read_metrics

    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in chats(120)))
    r = run_cli("--task", "sft", "--dataset", path, "--cache-dir", tmp_path / "c", "--out-dir", tmp_path / "run",
                "--max-steps", "40", "--eval-every", "20", "--no-compile", "--lr", "0.02", *TINY_FLAGS)
    assert r.returncode == 0, r.stderr
    assert "SFT data:" in r.stdout and "Memory estimate:" in r.stdout
    evals = [e["loss"] for e in read_metrics(tmp_path / "run") if e["kind"] == "eval"]
    assert evals[-1] < evals[0]


def test_memory_estimate_matches_real_optimizer_states_and_refuses_what_cannot_fit(tiny, monkeypatch):
    from blueberry.models import create_model
    from blueberry.optimizers import setup_optimizers
    from blueberry.training import memory

    for optimizer in ("adamw", "muon"):
        cfg = tiny(optimizer=optimizer, use_amp=False)
        model = create_model(cfg)
        opts = setup_optimizers(model, cfg)
        model(torch.randint(0, 300, (2, 8)), torch.randint(0, 300, (2, 8))).loss.backward()
        for o in opts:
            o.step()
        measured = sum(t.numel() * t.element_size() for o in opts for s in o.state.values() for t in s.values()
                       if torch.is_tensor(t) and t.dim() > 0)
        estimate = memory.estimate(model, cfg)
        assert estimate["optimizer"] == pytest.approx(measured, rel=0.02), optimizer
        assert estimate["weights"] == sum(p.numel() * 4 for p in model.parameters())
    monkeypatch.setattr(memory, "available_bytes", lambda device: 1e5)
    with pytest.raises(Exception, match="lower --batch-size"):
        memory.check_fits(model, cfg, torch.device("cpu"))


LLAMA3_TEMPLATE = (  # Llama 3's own: contents trimmed, the header's blank line before them
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def llama3_tokenizer(path, template=LLAMA3_TEMPLATE):
    from transformers import PreTrainedTokenizerFast

    from blueberry.data.tokenizer import load_tokenizer

    base = train_bpe(["user\nsay the king then the queen\nassistant\nthe king the queen\n" * 40], 290)
    fast = PreTrainedTokenizerFast(tokenizer_object=base.hf, eos_token="<|endoftext|>", bos_token="<|begin_of_text|>")
    fast.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    fast.chat_template = template
    fast.save_pretrained(path)
    return load_tokenizer(str(path))


def test_a_trimming_template_masks_the_trimmed_assistant_contents(tmp_path):
    tok = llama3_tokenizer(tmp_path / "tok")
    messages = [{"role": "system", "content": " be brief\n"}, {"role": "user", "content": "say the king  "},
                {"role": "assistant", "content": "  the king\n"}, {"role": "user", "content": "\tagain"},
                {"role": "assistant", "content": "the queen "}]
    ids, mask = encode_conversation(messages, tok)
    runs, current = [], []
    for i, m in zip(ids, mask):
        if m:
            current.append(i)
        elif current:
            runs.append(tok.auto.decode(current)), current.clear()
    runs.append(tok.auto.decode(current))
    assert runs == ["the king<|eot_id|>", "the queen<|eot_id|><|endoftext|>"]


def test_a_trimming_template_masks_the_assistants_turn_not_a_later_copy_of_its_content(tmp_path):
    tok = llama3_tokenizer(tmp_path / "tok")
    messages = [{"role": "user", "content": "say yes"}, {"role": "assistant", "content": "yes "},
                {"role": "user", "content": "yes you said"}, {"role": "assistant", "content": "ok"}]
    ids, mask = encode_conversation(messages, tok)
    learned = tok.auto.decode([i for i, m in zip(ids, mask) if m])
    assert learned == "yes<|eot_id|>ok<|eot_id|><|endoftext|>"


def test_sft_refusals_name_the_file_and_line(tmp_path, tiny):
    from blueberry.data.sft import load_sft_data
    from blueberry.errors import DataError

    strict = LLAMA3_TEMPLATE.replace("{% for message in loop_messages %}", "{% for message in loop_messages %}"
                                     "{% if message['role'] == 'system' %}{{ raise_exception('no system role') }}"
                                     "{% endif %}")
    llama3_tokenizer(tmp_path / "tok", strict)
    records = [{"prompt": f"say {w}", "completion": f" {w} {w} "} for w in WORDS]  # whitespace: trimmed, fine
    records[6] = chats(2)[1]  # line 7: a system message, which this template refuses
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    config = tiny(task="sft", dataset=str(path), tokenizer=str(tmp_path / "tok"), val_fraction=0.5)
    with pytest.raises(DataError, match=r"chats.jsonl:7: .*no system role"):
        load_sft_data(config)
    del records[6]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    _, corpus = load_sft_data(config)
    assert corpus.train_mask.sum() > 0


def test_training_prompt_equals_the_servers_prompt_with_a_bos_and_no_template(tmp_path):
    """A tokenizer with a bos distinct from its end-of-text (an imported base model's): both start with bos."""
    from test_import import tokenizer_dir_with_bos

    from blueberry.data.tokenizer import load_tokenizer

    tokenizer_dir_with_bos(tmp_path / "tok")
    tok = load_tokenizer(str(tmp_path / "tok"))
    messages = chats(2)[1]["messages"]
    ids, _ = encode_conversation(messages, tok)
    served = chat_prompt_ids(messages[:-1], tok)
    assert served[0] == tok.auto.bos_token_id != tok.eot_id and ids[:len(served)] == served
