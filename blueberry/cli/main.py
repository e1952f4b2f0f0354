"""Entry point: `train` (the default verb), `generate`, `eval`, `export`, `info`.

Every expected failure is a `BlueberryError`: printed as one line, exit 2 for usage errors and 1 for
run-time failures; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import sys
import warnings

from ..errors import BlueberryError, ConfigError
from .args import OneLineParser, add_train_flags, flag_for

VERBS = ("train", "generate", "eval", "export", "info")


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog="blueberry", description="Train, sample, evaluate and export language models.")
    sub = parser.add_subparsers(dest="command")
    add_train_flags(sub.add_parser(
        "train", help="train a model (default)",
        description="Train a model (the default verb). Other verbs: blueberry generate|eval|export|info --help"))

    g = sub.add_parser("generate", help="stream text from a checkpoint")
    g.add_argument("--checkpoint", required=True, help="run directory, checkpoint directory, or 'latest'")
    g.add_argument("--prompt", default="")
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-k", type=int, default=50)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default=None)
    g.add_argument("--debug", action="store_true")

    e = sub.add_parser("eval", help="evaluate a checkpoint on its validation split or any dataset")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--dataset", default=None, help="evaluate on all documents of this dataset or file")
    e.add_argument("--text-field", default="text")
    e.add_argument("--batches", type=int, default=None, help="limit the number of batches")
    e.add_argument("--device", default=None)
    e.add_argument("--debug", action="store_true")

    x = sub.add_parser("export", help="convert a run to another format")
    x.add_argument("run", help="run directory or checkpoint")
    x.add_argument("out", help="output directory (must not exist or be empty)")
    x.add_argument("--format", choices=("hf",), default="hf")
    x.add_argument("--debug", action="store_true")

    i = sub.add_parser("info", help="print the detected hardware capabilities")
    i.add_argument("--debug", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in VERBS:
        argv = ["train"] + argv
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", message=".*TypedStorage.*")
    try:
        return _dispatch(args)
    except BlueberryError as exc:
        if args.debug:
            raise
        message = str(exc)
        if isinstance(exc, ConfigError):
            message = f"{flag_for(exc.field)}: {message.split(': ', 1)[1]}"
        print(f"error: {message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # unexpected: say so briefly, point at --debug
        if args.debug:
            raise
        print(f"error: unexpected {type(exc).__name__}: {exc}. Rerun with --debug for the traceback, and "
              "please report it", file=sys.stderr)
        return 1


def _dispatch(args) -> int:
    if args.command == "train":
        from .train_cmd import train_command

        return train_command(args)
    if args.command == "generate":
        from .tools_cmd import generate_command

        return generate_command(args)
    if args.command == "eval":
        from .tools_cmd import eval_command

        return eval_command(args)
    if args.command == "export":
        from .tools_cmd import export_command

        return export_command(args)
    from ..system import print_system_info

    print_system_info()
    return 0
