"""The package's messages go through `logging`: shown once, by the main process, on standard output."""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import pytest

from blueberry.logs import get_logger, prefixed, quiet

PACKAGE = Path(__file__).resolve().parents[1] / "blueberry"


@pytest.fixture
def logger():
    yield get_logger("blueberry.test_logs")
    prefixed("")  # the formatter back to the plain message


def test_the_main_process_prints_each_message_once_on_stdout(logger, monkeypatch, capsys):
    monkeypatch.delenv("RANK", raising=False)
    logger.info("plan: 300 steps")
    assert capsys.readouterr().out == "plan: 300 steps\n"
    logging.getLogger().addHandler(logging.StreamHandler())  # an application's own root handler: no echo
    try:
        logger.info("once")
        captured = capsys.readouterr()
        assert captured.out == "once\n" and "once" not in captured.err
    finally:
        logging.getLogger().handlers.pop()


def test_other_ranks_print_warnings_only(logger, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    logger.info("every rank would say this")
    logger.warning("rank 1 is out of memory")
    assert capsys.readouterr().out == "rank 1 is out of memory\n"


def test_quiet_silences_a_block_and_prefixed_tags_every_line(logger, monkeypatch, capsys):
    monkeypatch.delenv("RANK", raising=False)
    with quiet():
        logger.info("repeated")
    logger.info("after")
    prefixed("[member 1] ")
    logger.info("done")
    assert capsys.readouterr().out == "after\n[member 1] done\n"


def test_no_function_takes_a_log_callback():
    """Messages are logged where they arise; no `log=print` parameter is threaded through signatures."""
    taking = [f"{p.relative_to(PACKAGE)}:{node.name}" for p in PACKAGE.rglob("*.py")
              for node in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
              if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
              and any(a.arg in ("log", "say") for a in node.args.args + node.args.kwonlyargs)]
    assert not taking, taking


def test_a_level_set_before_the_first_message_is_kept(capsys):
    """An application (a benchmark) that sets the package's level before its first message keeps that level."""
    root = logging.getLogger("blueberry")
    saved, level = root.handlers[:], root.level
    root.handlers.clear()  # as before the package's first message
    try:
        root.setLevel(logging.WARNING)
        get_logger("blueberry.x").info("hidden")
        get_logger("blueberry.x").warning("shown")
        assert capsys.readouterr().out == "shown\n"
    finally:
        root.handlers[:] = saved
        root.setLevel(level)
