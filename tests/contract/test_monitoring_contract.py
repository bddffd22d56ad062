"""The monitoring wire format: the reference a model ships and the summaries devices send.

Round trips, the one histogram function (bins, open outer bins, NaN), the size of a realistic
summary, and strict bounded parsing: every refusal is a ``MessageError``, never another type."""

from __future__ import annotations

import contextlib
import json
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contract import ContractError, MessageError
from contract.monitoring import (
    MAX_BINS,
    MAX_REFERENCE_BYTES,
    MAX_SIGNALS,
    MAX_SUMMARY_BYTES,
    Calibration,
    MonitoringReference,
    MonitorSummary,
    Pca,
    SignalSpec,
    merge_counts,
    pc_name,
)
from contract.topics import Topics

FEATURES, CLASSES, K = 16, 4, 3


def make_reference() -> MonitoringReference:
    rng = np.random.default_rng(0)
    comps = np.linalg.qr(rng.normal(size=(FEATURES, K)))[0].T.astype(np.float32)
    conf_edges = (0.4, 0.6, 0.8, 0.95)
    signals = [
        SignalSpec("confidence", conf_edges, (1, 2, 3, 10, 20)),
        SignalSpec("margin", (0.2, 0.5), (5, 10, 21)),
        SignalSpec("predicted", (), (9, 8, 7, 12)),
        SignalSpec("input_mean", (0.25, 0.5, 0.75), (10, 10, 10, 10)),
        SignalSpec("input_std", (0.1, 0.2), (5, 30, 5)),
        SignalSpec("input_ink", (0.3,), (20, 20)),
    ] + [SignalSpec(pc_name(i), (-1.0, 0.0, 1.0), (10, 10, 10, 10)) for i in range(K)]
    return MonitoringReference(
        signals=tuple(signals),
        ink_threshold=0.5,
        pca=Pca(rng.uniform(0, 1, FEATURES).astype(np.float32), comps),
        calibration=Calibration(
            rows=(1, 2, 3, 10, 20),
            correct=(0, 1, 2, 9, 20),
            accuracy=(0.3, 0.5, 0.66, 0.9, 1.0),
            labels=(10, 10, 10, 6),
        ),
        features=FEATURES,
        classes=CLASSES,
        input_rows=40,
        holdout_rows=36,
    )


def _pca_of(k: int) -> dict[str, Any]:
    pca = make_reference().pca
    assert pca is not None
    return Pca(pca.mean, pca.components[:k]).to_dict()


def doc(ref: MonitoringReference | None = None) -> dict[str, Any]:
    return (ref or make_reference()).to_dict()


def parse(d: Any) -> MonitoringReference:
    return MonitoringReference.from_json(json.dumps(d))


def test_reference_round_trips_byte_for_byte() -> None:
    ref = make_reference()
    text = ref.to_json()
    back = MonitoringReference.from_json(text)
    assert back == ref
    assert back.to_json() == text  # signed bytes: the same reference gives the same text
    assert back.names[:3] == ("confidence", "margin", "predicted")
    assert back.total_bins == sum(s.bins for s in ref.signals)


def test_histogram_bins_every_row_once_with_open_outer_bins() -> None:
    ref = make_reference()
    X = np.zeros((5, FEATURES), np.float32)
    X[1] = 1.0  # mean 1.0: above the top edge 0.75 -> last bin
    X[2] = -3.0  # far below the training range -> first bin
    X[3, :8] = 1.0  # mean 0.5 sits on an edge: bins are [edge, next), so bin 2
    X[4] = np.nan  # NaN sorts last: the top bin, never lost
    P = np.array(
        [
            [0.97, 0.01, 0.01, 0.01],
            [0.1, 0.5, 0.3, 0.1],
            [0.25, 0.25, 0.25, 0.25],
            [0.0, 0.0, 0.04, 0.96],
            [0.3, 0.3, 0.3, 0.1],
        ],
        np.float32,
    )
    hist = ref.histogram(X, P)
    assert set(hist) == set(ref.names)
    assert all(int(c.sum()) == 5 for c in hist.values())
    assert hist["input_mean"].tolist() == [2, 0, 1, 2]  # rows 0, 2 | | 3 | 1 and NaN 4
    assert hist["predicted"].tolist() == [3, 1, 0, 1]
    assert hist["confidence"].tolist() == [2, 1, 0, 0, 2]  # 0.25, 0.3 | 0.5 | | | 0.97, 0.96
    assert hist["input_ink"].tolist() == [3, 2]  # ink fractions 0, 1, 0, 0.5 and 0 (NaN)
    values = ref.values(X[:1], P[:1])
    assert values["margin"][0] == pytest.approx(0.96)
    assert values["pc0"][0] == pytest.approx(float((X[0] - ref.pca.mean) @ ref.pca.components[0]))


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d: d.update(v=2), "format 2"),
        (lambda d: d.update(signals=[]), "signals must be a list"),
        (lambda d: d.update(signals="x"), "signals must be a list"),
        (lambda d: d["signals"].append(dict(d["signals"][0])), "listed twice"),
        (lambda d: d["signals"][0].update(name="colour"), "not a known signal"),
        (lambda d: d["signals"][0].update(name="pc99"), "not a known signal"),
        (lambda d: d["signals"][0].update(edges=[0.4, 0.4, 0.8, 0.9]), "strictly increasing"),
        (lambda d: d["signals"][0].update(edges=[0.4, float("nan"), 0.8, 0.9]), "finite"),
        (lambda d: d["signals"][0].update(counts=[1, 2, 3]), "4 edges need 5 counts"),
        (lambda d: d["signals"][0].update(counts=[1, 2, 3, 4, -1]), "integers in"),
        (lambda d: d["signals"][0].update(counts=[1, 2, 3, 4, True]), "integers in"),
        (lambda d: d["signals"][0].update(counts=[0, 0, 0, 0, 0]), "empty"),
        (lambda d: d["signals"][2].update(edges=[0.5]), "categorical"),
        (lambda d: d["signals"][2].update(counts=[1] * (MAX_BINS + 1)), "list of 2..256"),
        (lambda d: d.update(pca=None), "needs a PCA"),
        (lambda d: d.update(pca=_pca_of(2)), "needs a PCA with more than 2"),
        (lambda d: d["pca"].update(mean="!!"), "base64"),
        (lambda d: d["pca"].update(features=FEATURES + 1), "expects 17"),
        (lambda d: d.update(features=FEATURES + 1), "pca.features differs"),
        (lambda d: d.update(classes=CLASSES + 1), "one bin per class"),
        (lambda d: d["calibration"].update(rows=[1, 2, 3]), "needs 5 entries"),
        (lambda d: d["calibration"].update(correct=[2, 1, 2, 9, 20]), "must not exceed"),
        (lambda d: d["calibration"].update(accuracy=[0.3, 0.5, 0.66, 0.9, 1.5]), "within 0..1"),
        (lambda d: d.update(ink_threshold="half"), "ink_threshold"),
        (lambda d: d.update(input_rows=-1), "row counts"),
    ],
)
def test_reference_refusals_are_message_errors(mutate, match: str) -> None:
    d = doc()
    mutate(d)
    with pytest.raises(MessageError, match=match):
        parse(d)


def test_calibration_needs_the_confidence_signal() -> None:
    d = doc()
    d["signals"] = d["signals"][1:]
    with pytest.raises(MessageError, match="needs the confidence signal"):
        parse(d)


def test_reference_size_and_depth_are_bounded_before_parsing() -> None:
    with pytest.raises(MessageError, match=f"limit {MAX_REFERENCE_BYTES}"):
        MonitoringReference.from_json(b" " * (MAX_REFERENCE_BYTES + 1))
    with pytest.raises(MessageError, match="nests"):
        MonitoringReference.from_json("[" * 50 + "]" * 50)
    with pytest.raises(MessageError, match="JSON object"):
        MonitoringReference.from_json("[]")
    with pytest.raises(MessageError, match="not JSON"):
        MonitoringReference.from_json("{")


def make_summary(ref: MonitoringReference, samples: int = 6000, seed: int = 0) -> MonitorSummary:
    rng = np.random.default_rng(seed)
    counts = []
    for s in ref.signals:
        p = np.asarray(s.counts, float) + 1
        counts.append((s.name, tuple(int(v) for v in rng.multinomial(samples, p / p.sum()))))
    return MonitorSummary(
        device_id="dev-0042",
        model_line="digits",
        model_version=3,
        release=3,
        start=1_760_000_000.0,
        end=1_760_000_060.0,
        samples=samples,
        counts=tuple(counts),
    )


def realistic_reference() -> MonitoringReference:
    """The shape training ships for digits: 17 confidence bins, 10 per other continuous
    signal, 10 classes, 8 principal components (14 signals)."""
    signals = [
        SignalSpec("confidence", tuple(np.linspace(0.3, 0.999, 16).round(4)), (30,) * 17),
        SignalSpec("margin", tuple(np.linspace(0.1, 0.99, 9).round(4)), (30,) * 10),
        SignalSpec("predicted", (), (30,) * 10),
    ]
    for name in ("input_mean", "input_std", "input_ink") + tuple(pc_name(i) for i in range(8)):
        signals.append(SignalSpec(name, tuple(np.linspace(-1, 1, 9).round(4)), (130,) * 10))
    rng = np.random.default_rng(1)
    comps = np.linalg.qr(rng.normal(size=(64, 8)))[0].T.astype(np.float32)
    return MonitoringReference(
        tuple(signals), 0.5, Pca(np.zeros(64, np.float32), comps), features=64, classes=10
    )


def test_a_period_summary_of_a_busy_device_is_under_2_kb() -> None:
    ref = realistic_reference()
    for samples in (600, 6000, 60_000):  # 10, 100, 1000 inferences/s over 60 s
        s = make_summary(ref, samples)
        payload = s.to_json()
        assert len(payload) < 2048, (samples, len(payload))
        back = MonitorSummary.from_dict(payload)
        assert back == s
        back.check_against(ref)


def test_summary_refusals_are_message_errors() -> None:
    ref = make_reference()
    good = make_summary(ref, samples=100).to_dict()

    def bad(**changes: Any) -> dict[str, Any]:
        return {**good, **changes}

    counts = good["counts"]
    cases: list[tuple[Any, str]] = [
        (bad(samples=101), "add up to"),
        (bad(samples=-1), "samples must be"),
        (bad(samples=True), "samples"),
        (bad(device_id="a/b"), "device_id"),
        (bad(model_line=""), "model_line"),
        (bad(model_version=-1), ">= 0"),
        (bad(start=-5.0), "start"),
        (bad(end=good["start"] - 1), "start <= end"),
        (bad(end=good["start"] + 8 * 24 * 3600), "start <= end"),
        (bad(counts={}), "1..32 signals"),
        (bad(counts={**counts, "colour": [50, 50]}), "not a known signal"),
        (bad(counts={"confidence": [100]}), "list of 2..256"),
        (bad(counts={"confidence": [101, -1]}), "integers in"),
        (bad(counts={"confidence": [50, 50.0]}), "integers in"),
        (bad(counts={"confidence": [1] * 300}), "list of 2..256"),
        ({k: v for k, v in good.items() if k != "counts"}, "missing field 'counts'"),
        ([good], "JSON object"),
    ]
    for data, match in cases:
        with pytest.raises(MessageError, match=match):
            MonitorSummary.from_dict(data)
    too_many = {f"s{i}": [1, 0] for i in range(MAX_SIGNALS + 1)}
    with pytest.raises(MessageError, match="1..32 signals"):
        MonitorSummary.from_dict(bad(samples=1, counts=too_many))


def test_summary_bytes_are_bounded_and_checked_against_the_reference() -> None:
    ref = make_reference()
    with pytest.raises(MessageError, match=f"limit {MAX_SUMMARY_BYTES}"):
        MonitorSummary.from_dict(b"{" + b" " * MAX_SUMMARY_BYTES + b"}")
    with pytest.raises(MessageError, match="not JSON"):
        MonitorSummary.from_dict(b'{"samples": NaN')
    with pytest.raises(MessageError, match="nests"):
        MonitorSummary.from_dict(b'{"counts": {"confidence": [[[[1]]]]}}')
    s = make_summary(ref, samples=50)
    other = replace(s, counts=(("margin", (50, 0)),))
    with pytest.raises(MessageError, match="2 bins, the reference 3"):
        other.check_against(ref)
    missing = replace(s, counts=(("pc2", (0, 50, 0, 0)), ("input_ink", (25, 25))))
    missing.check_against(ref)  # a subset of the reference's signals is fine
    no_pcs = replace(ref, signals=ref.signals[:6], pca=None)
    with pytest.raises(MessageError, match="not in the model's reference"):
        missing.check_against(no_pcs)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=20,
)


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=4096))
def test_arbitrary_bytes_never_raise_anything_but_contract_errors(data: bytes) -> None:
    for parse_fn in (MonitorSummary.from_dict, MonitoringReference.from_json):
        with contextlib.suppress(ContractError):
            parse_fn(data)


@settings(max_examples=150, deadline=None)
@given(which=st.integers(0, 100), value=JSON, nested=st.booleans())
def test_a_field_replaced_by_any_json_gives_a_message_error_or_a_valid_document(
    which: int, value: Any, nested: bool
) -> None:
    """Hostile-but-well-formed JSON in any field: a MessageError naming it, or (when the value
    happens to be valid) a document that parses; never another exception."""
    ref = make_reference()
    for d, parse_fn in (
        (make_summary(ref, samples=40).to_dict(), MonitorSummary.from_dict),
        (doc(ref), lambda x: MonitoringReference.from_json(json.dumps(x))),
    ):
        keys = sorted(d)
        key = keys[which % len(keys)]
        target = d[key]
        if nested and isinstance(target, dict) and target:
            target[sorted(target)[which % len(target)]] = value
        elif nested and isinstance(target, list) and target:
            target[which % len(target)] = value
        else:
            d[key] = value
        with contextlib.suppress(MessageError):
            parse_fn(d)


@settings(max_examples=40, deadline=None)
@given(
    samples=st.integers(0, 10**9),
    bins=st.lists(st.integers(2, 40), min_size=1, max_size=MAX_SIGNALS),
    seed=st.integers(0, 2**32 - 1),
    release=st.none() | st.integers(0, 2**31),
)
def test_valid_summaries_round_trip(samples: int, bins: list[int], seed: int, release) -> None:
    rng = np.random.default_rng(seed)
    names = ["confidence", "margin", "predicted", "input_mean", "input_std", "input_ink"]
    names += [pc_name(i) for i in range(16)]
    counts = tuple(
        (names[i], tuple(int(v) for v in rng.multinomial(samples, np.ones(b) / b)))
        for i, b in enumerate(bins[: len(names)])
    )
    s = MonitorSummary("dev-1", "digits", 1, 10.0, 70.5, samples, counts, release)
    assert MonitorSummary.from_dict(s.to_json()) == s


def test_merge_counts_adds_mergeable_histograms() -> None:
    a = {"confidence": [1, 2, 3], "predicted": [0, 5]}
    b = {"confidence": [4, 0, 1]}
    total = merge_counts([a, b])
    assert total["confidence"].tolist() == [5, 2, 4] and total["predicted"].tolist() == [0, 5]
    with pytest.raises(MessageError, match="2 bins, not 3"):
        merge_counts([a, {"confidence": [1, 1]}])


def test_monitor_topic_parses_beside_the_existing_ones() -> None:
    t = Topics()
    assert t.monitor("dev-1") == "edgeloop/v1/devices/dev-1/monitor"
    assert t.all_monitor == "edgeloop/v1/devices/+/monitor"
    assert t.parse(t.monitor("dev-1")) == ("dev-1", "monitor")
    for kind in ("target", "status", "metrics"):
        assert t.parse(f"edgeloop/v1/devices/dev-1/{kind}") == ("dev-1", kind)
    assert t.parse("edgeloop/v1/devices/dev-1/monitors") is None
    assert t.parse("edgeloop/v1/devices/a/b/monitor") is None
    assert t.parse("edgeloop/v1/devices/+/monitor") is None
