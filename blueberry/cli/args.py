"""Train flags, generated from the config sections' fields: name, type, allowed values and help text all
come from the dataclasses (`configs/fields.py`). Only flags the user typed override the config."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from ..configs import PRESETS
from ..configs.adaptive_moe_config import FIELDS, SECTIONS
from ..configs.fields import flag_name

_SECTION_TITLES = {"model": "model", "data": "data", "optim": "optimisation", "training": "training"}


def flag_for(field: str) -> str:
    """The flag(s) that set `field`, for error messages: `--experts-per-token/--top-k`."""
    if field not in FIELDS:
        return "--" + field.replace("_", "-")
    aliases = ["--" + a.replace("_", "-") for a in FIELDS[field].metadata.get("aliases", ())]
    return "/".join([flag_name(FIELDS[field])] + aliases)


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
    g = p.add_argument_group("run")
    g.add_argument("--config", default="default",
                   help=f"preset ({', '.join(PRESETS)}) or a .yaml/.json file of config fields")
    g.add_argument("--validate-setup", action="store_true", help="run the set-up checks and exit")
    g.add_argument("--resume-from", default=None,
                   help="'latest' (the newest checkpoint of --out-dir, else of the newest run in runs/), a run "
                        "directory or a checkpoint")
    g.add_argument("--debug", action="store_true", help="show Python tracebacks")
    g.add_argument("--dry-run", action="store_true", help="print the plan (model, batch, tokens, optimizer, memory "
                                                          "per device) and exit without training")
    for section, cls in SECTIONS.items():
        group = p.add_argument_group(_SECTION_TITLES[section])
        for field in dataclasses.fields(cls):
            if field.metadata.get("cli", True):
                _add_field_flag(group, field)


def _add_field_flag(group, field: dataclasses.Field) -> None:
    """One flag per field; absent flags stay absent (SUPPRESS), so they never override a preset or file."""
    meta = field.metadata
    names = [flag_name(field)] + ["--" + a.replace("_", "-") for a in meta.get("aliases", ())]
    kwargs = dict(dest=field.name, default=argparse.SUPPRESS, help=(meta.get("help") or "").replace("%", "%%"))
    kind = str(field.type)
    if meta.get("auto_on_off"):
        group.add_argument(names[0], nargs="?", const="on", choices=("auto", "on", "off"), **kwargs)
        group.add_argument("--no-" + names[0][2:], action="store_const", const="off", dest=field.name,
                           default=argparse.SUPPRESS, help=f"the same as {names[0]} off")
        return
    if "bool" in kind:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif "tuple" in kind:
        kwargs.update(type=float, nargs=2, metavar=("B1", "B2"))
    else:
        kwargs["type"] = int if kind.startswith("int") else float if kind.startswith("float") else str
        if meta.get("choices"):
            kwargs["choices"] = meta["choices"]
        if meta.get("repeatable"):
            kwargs["action"] = "append"
    if meta.get("aliases"):
        kwargs["help"] = f"{kwargs['help']} (also {', '.join(names[1:])})"
    group.add_argument(*names, **kwargs)


RUN_ONLY = {"config", "validate_setup", "resume_from", "debug", "command", "dry_run"}


def overrides_from(args: argparse.Namespace) -> dict:
    """Config field values for exactly the flags present on the command line."""
    out = {dest: value for dest, value in vars(args).items() if dest not in RUN_ONLY}
    for name in [n for n, v in out.items() if n in FIELDS and FIELDS[n].metadata.get("auto_on_off")]:
        if out[name] == "auto":
            del out[name]  # left to the machine, exactly as when the flag is absent
        else:
            out[name] = out[name] == "on"
    if "adamw_betas" in out:
        out["adamw_betas"] = tuple(out["adamw_betas"])
    return out
