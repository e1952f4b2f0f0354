"""Speculative decoding vs plain decoding of the same target, side by side, with the acceptance rate.

    python benchmarks/speculative_speed.py [--target RUN --draft RUN] [--new-tokens 128] [--k 4]

Without runs given, trains both on the default corpus first (same data, so the same tokenizer): the
target at the cpu preset (4 layers, d_model 256, MoE) and the draft dense, 2 layers, d_model 128, for
--steps each. Greedy (the output is the target's own, token for token: the script checks it) and
sampled (temperature 0.8); tokens/s over 8 prompts from the validation plays, batch 1.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, table


def train(out: Path, steps: int, *flags) -> Path:
    subprocess.run([sys.executable, "train.py", "--config", "cpu", "--max-steps", str(steps), "--eval-every",
                    str(steps), "--out-dir", str(out), *flags], cwd=ROOT, check=True)
    return out


def main() -> None:
    import torch

    from blueberry.inference import Engine, SamplingParams
    from blueberry.runs.loading import load_model
    from blueberry.inference.speculative import check_same_tokenizer, speculative_generate

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target")
    p.add_argument("--draft")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--k", type=int, default=4)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="blueberry-spec-"))
    target_run = args.target or train(work / "target", args.steps)
    draft_run = args.draft or train(work / "draft", args.steps, "--model-type", "standard", "--d-model", "128",
                                    "--n-layers", "2", "--n-heads", "4")
    target, config, tok, _ = load_model(target_run, "cpu")
    draft, _, draft_tok, _ = load_model(draft_run, "cpu")
    check_same_tokenizer(tok, draft_tok)
    prompts = [[tok.eot_id] + tok.encode(t) for t in ("ROMEO:", "JULIET:", "KING HENRY:", "HAMLET:", "First Citizen:",
                                                      "Enter", "O, my lord,", "What say you")]
    rows = []
    for name, temperature in (("greedy", 0.0), ("sampled", 0.8)):
        params = [SamplingParams(max_new_tokens=args.new_tokens, temperature=temperature, top_k=50, seed=i,
                                 stop_at_eot=False) for i in range(len(prompts))]
        engine = Engine(target, tok, slots=1)
        engine.generate(prompts[:1], params[:1])  # warm-up
        start = time.perf_counter()
        plain = [engine.generate([pr], [pa])[0].output_ids for pr, pa in zip(prompts, params)]
        plain_rate = len(prompts) * args.new_tokens / (time.perf_counter() - start)
        start = time.perf_counter()
        spec = [speculative_generate(target, draft, pr, pa, tok.eot_id, k=args.k) for pr, pa in zip(prompts, params)]
        spec_rate = sum(len(s.output_ids) for s in spec) / (time.perf_counter() - start)
        accepted, proposed = sum(s.accepted for s in spec), sum(s.proposed for s in spec)
        if temperature == 0:
            assert [s.output_ids for s in spec] == plain, "speculative greedy must equal the target's greedy"
        rows.append([name, f"{plain_rate:,.0f}", f"{spec_rate:,.0f}", f"{spec_rate / plain_rate:.2f}x",
                     f"{accepted / max(proposed, 1):.0%}"])
    print(table(["decoding", "plain tokens/s", "speculative tokens/s", "speed-up", "acceptance"], rows))
    print(f"target {target_run}, draft {draft_run}, k={args.k}, torch threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
