"""A short soak of `blueberry serve` (benchmarks/server_soak.py's functions): concurrent greedy requests must
give the text they give alone, while others hang up mid-stream and bad requests are mixed in; afterwards
no slot is held and the server's memory has not grown."""

from __future__ import annotations

import sys

import pytest

from helpers import ROOT, ServedRun

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="process groups and /proc as on Linux")


def test_a_short_soak(served_run):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from server_soak import soak
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    with ServedRun(served_run) as served:
        report = soak(served.base, served.pid, requests=150, clients=16, seconds=90, seed=1)
    print("\n".join(report.lines()))
    assert report.ok, "\n".join(report.lines())
    assert report.sent["greedy"] and report.sent["hang-up"] and report.sent["bad"]
    assert report.rss_warm_mb > 0
