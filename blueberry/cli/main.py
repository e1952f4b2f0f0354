"""Entry point: `train` (the default verb), `prepare`, `generate`, `chat`, `eval`, `compare`, `ensemble`, `export`,
`push`, `quantize`, `serve`, `lm-eval` (lm-evaluation-harness with the blueberry model registered), `info`.

Every expected failure is a `BlueberryError`: printed as one line, exit 2 for usage errors and 1 for
run-time failures; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import sys
import warnings

from ..errors import BlueberryError, ConfigError, UsageError
from .args import OneLineParser, add_train_flags, flag_for

VERBS = ("train", "prepare", "generate", "chat", "eval", "compare", "ensemble", "export", "import", "push", "quantize",
         "serve", "lm-eval", "info")


def build_parser() -> OneLineParser:
    from .prepare_cmd import add_parser as add_prepare_parser
    from .use_cmds import add_parsers

    parser = OneLineParser(prog="blueberry", description="Train, use, evaluate and export language models.")
    sub = parser.add_subparsers(dest="command")
    add_train_flags(sub.add_parser(
        "train", help="train a model (default)",
        description="Train a model (the default verb). Other verbs: blueberry "
                    + "|".join(v for v in VERBS if v != "train") + " --help"))
    add_parsers(sub)
    add_prepare_parser(sub)
    i = sub.add_parser("info", help="print the detected hardware capabilities")
    i.add_argument("--debug", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "lm-eval":
        return lm_eval_command(argv[1:])
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


def entry() -> None:
    """The console script, `python train.py` and `python -m blueberry`: `main`, then leave the process
    (a torchrun rank leaves without interpreter finalization, see `training.distributed.exit_process`).
    A time budget counts from this process's start (`training.budget`)."""
    from ..training.budget import start_command_clock

    start_command_clock()
    code = main()
    from ..training.distributed import exit_process

    exit_process(code)


def lm_eval_command(argv: list[str]) -> int:
    """`blueberry lm-eval ARGS`: lm-evaluation-harness's own command line, with `--model blueberry`
    registered in this process (lm-eval has no plugins); every argument goes to lm-eval unchanged."""
    from ..extras import require

    try:
        require("lm_eval", "eval", "blueberry lm-eval")
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import blueberry.evaluation.harness  # noqa: F401  (registers the "blueberry" model)
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    return 0


def _dispatch(args) -> int:
    if args.command == "train":
        from .train_cmd import train_command

        return train_command(args)
    if args.command == "prepare":
        from .prepare_cmd import prepare_command

        return prepare_command(args)
    if args.command == "info":
        from ..system import print_system_info

        print_system_info()
        return 0
    from .use_cmds import COMMANDS

    return COMMANDS[args.command](args)
