"""The demo is the loop's acceptance test: run it on a small fleet and read its summary."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_demo_closes_the_loop_on_a_small_fleet(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "firmware_sim.demo",
            "--devices",
            "10",
            "--threshold",
            "150",
            "--canary-percent",
            "30",
            "--measure-rounds",
            "30",
            "--workdir",
            str(tmp_path),
            "--timeout",
            "240",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = done.stdout
    assert done.returncode == 0, out[-4000:] + done.stderr[-4000:]

    def figure(label: str) -> float:
        m = re.search(rf"{re.escape(label)}[^\n]*?([0-9]+\.[0-9]+)\s*$", out, re.M)
        assert m, f"summary line {label!r} missing:\n{out[-2000:]}"
        return float(m.group(1))

    before = figure("fleet accuracy before drift")
    old = figure("fleet accuracy under drift, old model")
    new = figure("fleet accuracy under drift, new model")
    assert before > 0.9, "the factory model should be good on clean inputs"
    assert old < before - 0.2, "drift must really hurt the deployed model"
    assert new > old + 0.2, "the retrained model must recover much of the loss"
    assert re.search(r"failed inferences\s+0$", out, re.M)
    assert "The loop closed" in out
    # Threshold -> fleet, and the stages it is made of (they add up to it, to the rounding)
    loop = re.search(r"threshold -> full fleet updated\s+([0-9.]+) s$", out, re.M)
    assert loop, out[-3000:]
    loop_s = float(loop.group(1))
    stages = re.search(
        r"of which\s+training, gate, signing ([0-9.]+) s; approval ([0-9.]+) s; "
        r"canary ([0-9.]+) s; the rest ([0-9.]+) s$",
        out,
        re.M,
    )
    assert stages, out[-3000:]
    assert sum(float(g) for g in stages.groups()) == pytest.approx(loop_s, abs=0.25)
    assert float(stages.group(1)) > 0 and float(stages.group(3)) > 0
    # The label-free path: the first drift alert on v1 and the retraining threshold, each timed
    # from the drift's start, and one sentence saying which came first (either may, on a loaded
    # machine; the demo must say which, not assume it).
    alert = re.search(
        r"drift alert raised \(no labels needed\)\s+t\+([0-9.]+) s "
        r"\(rule (drift|estimated_accuracy), group \*, v1\)$",
        out,
        re.M,
    )
    assert alert, out[-3000:]
    threshold = re.search(
        r"retraining threshold \(150 samples\) reached\s+t\+([0-9.]+) s$", out, re.M
    )
    assert threshold, out[-3000:]
    gap = float(threshold.group(1)) - float(alert.group(1))
    said = re.search(r"The drift alert came ([0-9.]+) s (before|AFTER) the threshold", out)
    assert said, out[-3000:]
    # The printed times are rounded to 0.1 s, so the gap read from them is within 0.15 s.
    assert float(said.group(1)) == pytest.approx(abs(gap), abs=0.16)
    if abs(gap) > 0.15:
        assert said.group(2) == ("before" if gap > 0 else "AFTER")
    assert re.search(r"t\+[0-9.]+ s: (drift|estimated_accuracy) alert #\d+ raised for v1", out)


def test_a_demo_that_cannot_close_says_where_and_keeps_its_evidence(tmp_path):
    """A phase that times out: the demo names the phase, shows the server log's last lines,
    keeps its work directory and exits 1, with no traceback on the screen."""
    work = tmp_path / "work"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "firmware_sim.demo",
            "--devices",
            "3",
            "--threshold",
            "1000000",  # never reached: phase 4 times out
            "--measure-rounds",
            "5",
            "--workdir",
            str(work),
            "--timeout",
            "10",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 1, out[-4000:]
    assert "The loop did not close in phase [4] Misclassified samples flow" in out, out[-4000:]
    assert "timed out after 10s waiting for the retraining threshold" in out
    assert "server log, last lines:" in out
    assert "Traceback" not in out
    assert f"work directory kept: {work}" in out
    assert (work / "demo-error.txt").read_text().startswith("Traceback")
    assert (work / "server" / "server.log").is_file()
