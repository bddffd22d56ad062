"""The demo's account of the label-free path: which came first, the drift alert or the
retraining threshold, said plainly either way; and its monitoring options refused when the
server could not run them."""

from __future__ import annotations

import pytest

from firmware_sim.demo import Timeline, main, unix

ALERT = {"rule": "drift", "group": "*", "model_version": 1}


def test_an_alert_before_the_threshold_is_said_with_the_gap() -> None:
    t = Timeline(drift_at=100.0, alert=ALERT, alert_s=2.7, threshold_s=4.1)
    assert t.lines(300) == [
        ("drift alert raised (no labels needed)", "t+2.7 s (rule drift, group *, v1)"),
        ("retraining threshold (300 samples) reached", "t+4.1 s"),
    ]
    first, sentence = t.verdict()
    assert first and sentence.startswith("The drift alert came 1.4 s before the threshold")


def test_an_alert_after_the_threshold_or_none_is_said_so() -> None:
    late = Timeline(drift_at=100.0, alert=ALERT, alert_s=3.3, threshold_s=2.0)
    first, sentence = late.verdict()
    assert not first and "1.3 s AFTER the threshold" in sentence
    never = Timeline(drift_at=100.0, threshold_s=2.0)
    assert never.lines(150)[0] == ("drift alert raised (no labels needed)", "not raised")
    assert never.verdict() == (False, "No drift alert was raised after the drift began.")
    unreached = Timeline(drift_at=100.0, alert=ALERT, alert_s=3.0)
    assert unreached.lines(150)[1] == ("retraining threshold (150 samples) reached", "not reached")
    assert unreached.verdict()[0]


def test_api_times_read_as_utc() -> None:
    assert unix("1970-01-01T00:00:10Z") == 10.0
    assert unix("1970-01-01T00:00:10") == 10.0  # no zone: the server writes UTC
    assert unix("1970-01-01T01:00:10+01:00") == 10.0


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--monitor-window", "0.5"], "--monitor-window must be within 1..86400 seconds, got 0.5"),
        (["--monitor-period", "0"], "--monitor-period must be within (0, 3600] seconds, got 0"),
        (["--monitor-period", "nan"], "--monitor-period must be within (0, 3600] seconds"),
    ],
)
def test_monitoring_options_the_server_cannot_run_are_refused(
    args: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    assert says in capsys.readouterr().err
