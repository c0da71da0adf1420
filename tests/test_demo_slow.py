"""The embedded default end to end (minutes): `lisa demo` meets the acceptance criteria."""

from __future__ import annotations

import json
import time

import pytest

from lisa_align.cli import main


@pytest.mark.slow
def test_lisa_demo_meets_acceptance(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LISA_ALIGN_CACHE", str(tmp_path / "cache"))
    t0 = time.time()
    assert main(["demo", "--seed", "0", "--output-dir", str(tmp_path / "runs")]) == 0
    wall = time.time() - t0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    s = json.loads(open(last).read())
    assert set(s) == {"base", "aligned", "sft", "bso", "lisa"}
    assert s["sft"]["hs"] >= 60
    assert s["lisa"]["hs"] <= s["sft"]["hs"] - 30
    assert s["lisa"]["fa"] >= s["sft"]["fa"] - 5
    assert wall <= 300, f"the demo pipeline took {wall:.0f}s (budget 300s on 2 cores)"
