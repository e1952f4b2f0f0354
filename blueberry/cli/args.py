"""Train flags and how they map onto config fields. Only flags the user typed override the config."""

from __future__ import annotations

import argparse
import sys

from ..configs import PRESETS

# flag dest -> config field, for flags whose names differ from the field.
FLAG_FIELDS = {
    "seq_len": "max_seq_len",
    "top_k": "expert_top_k",
    "grad_accum": "grad_accum_steps",
}
FIELD_FLAGS = {v: k for k, v in FLAG_FIELDS.items()}
FIELD_FLAGS.update({"use_fp8": "fp8", "use_amp": "no_amp", "config": "config"})


def flag_for(field: str) -> str:
    return "--" + FIELD_FLAGS.get(field, field).replace("_", "-")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the flag, and exit code 2. Abbreviations are off:
    a typo (`--checkpoint` for `--checkpoint-every`) is an error, never another flag."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def add_train_flags(p: argparse.ArgumentParser) -> None:
    S = argparse.SUPPRESS  # absent flags stay absent, so they never override a preset or config file
    g = p.add_argument_group("run")
    g.add_argument("--config", default="default",
                   help=f"preset ({', '.join(PRESETS)}) or a .yaml/.json file of config fields")
    g.add_argument("--validate-setup", action="store_true", help="run the set-up checks and exit")
    g.add_argument("--resume-from", default=None, help="'latest', a run directory or a checkpoint")
    g.add_argument("--seed", type=int, default=S)
    g.add_argument("--device", default=S, help="cpu, cuda or cuda:N (default: the best one present)")
    g.add_argument("--out-dir", default=S, help="run directory (default runs/<date>-<time>-<model>)")
    g.add_argument("--debug", action="store_true", help="show Python tracebacks")
    g = p.add_argument_group("model")
    g.add_argument("--model-type", choices=("moe", "standard"), default=S)
    g.add_argument("--d-model", type=int, default=S)
    g.add_argument("--n-layers", type=int, default=S)
    g.add_argument("--n-heads", type=int, default=S)
    g.add_argument("--n-kv-heads", type=int, default=S, help="grouped-query attention: key/value heads")
    g.add_argument("--d-ff", type=int, default=S)
    g.add_argument("--seq-len", type=int, default=S, help="training sequence length (max_seq_len)")
    g.add_argument("--vocab-size", type=int, default=S)
    g.add_argument("--mlp-type", choices=("swiglu", "silu"), default=S)
    g.add_argument("--qk-norm", action="store_true", default=S)
    g.add_argument("--num-experts", type=int, default=S)
    g.add_argument("--top-k", type=int, default=S, help="experts per token")
    g.add_argument("--capacity-factor", type=float, default=S, help="0 = dropless")
    g.add_argument("--shared-expert", action="store_true", default=S)
    g.add_argument("--load-balancing-weight", type=float, default=S)
    g.add_argument("--router-z-loss-weight", type=float, default=S)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=S, help="shakespeare, python-docs, hf:NAME[:CONFIG], or a path")
    g.add_argument("--dataset-type", choices=("packed", "text_token", "random_chunk", "document"), default=S)
    g.add_argument("--document-mask", action="store_true", default=S, help="no attention across documents")
    g.add_argument("--tokenizer", default=S, help="a tokenizer.json or a local AutoTokenizer directory")
    g.add_argument("--text-field", default=S, help="JSONL field / parquet column holding the text")
    g.add_argument("--num-documents", type=int, default=S)
    g.add_argument("--max-tokens", type=int, default=S)
    g.add_argument("--cache-dir", default=S)
    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", choices=("muon", "adamw", "lion", "adafactor"), default=S)
    g.add_argument("--lr", type=float, action="append", default=S,
                   help="learning rate; repeat it for a sweep (one run per value)")
    g.add_argument("--adamw-lr", type=float, default=S)
    g.add_argument("--weight-decay", type=float, default=S)
    g.add_argument("--schedule", choices=("cosine_warmup", "linear_warmup", "constant", "wsd"), default=S)
    g.add_argument("--warmup-steps", type=int, default=S)
    g.add_argument("--grad-clip", type=float, default=S)
    g = p.add_argument_group("training")
    g.add_argument("--batch-size", type=int, default=S)
    g.add_argument("--grad-accum", type=int, default=S)
    g.add_argument("--max-steps", type=int, default=S)
    g.add_argument("--eval-every", type=int, default=S)
    g.add_argument("--eval-batches", type=int, default=S)
    g.add_argument("--checkpoint-every", type=int, default=S)
    g.add_argument("--keep-checkpoints", type=int, default=S)
    g.add_argument("--no-fp8", dest="use_fp8", action="store_false", default=S, help="never use FP8")
    g.add_argument("--fp8", dest="use_fp8", action="store_true", default=S, help="require FP8")
    g.add_argument("--no-amp", dest="use_amp", action="store_false", default=S, help="train in fp32")
    g.add_argument("--compile", dest="compile", action="store_true", default=S)
    g.add_argument("--no-compile", dest="compile", action="store_false", default=S)
    g.add_argument("--parallel", choices=("ddp", "fsdp"), default=S, help="engine under torchrun")


RUN_ONLY = {"config", "validate_setup", "resume_from", "debug", "command"}


def overrides_from(args: argparse.Namespace) -> dict:
    """Config field values for exactly the flags present on the command line."""
    out = {}
    for dest, value in vars(args).items():
        if dest in RUN_ONLY:
            continue
        out[FLAG_FIELDS.get(dest, dest)] = value
    return out
