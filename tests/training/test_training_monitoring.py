"""The monitoring reference training computes at export and ships inside the signed model."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from contract.monitoring import METADATA_KEY, MonitoringReference, pc_name
from training.data import digits_pools
from training.errors import ExportError
from training.export import onnx_predict_proba, read_metadata
from training.monitoring import (
    CONFIDENCE_GRID,
    build_reference,
    calibrate,
    embed_reference,
    fit_pca,
    quantile_edges,
)


def test_run_job_ships_a_reference_the_contract_parses(champion_path: Path) -> None:
    raw = champion_path.read_bytes()
    ref = MonitoringReference.from_json(read_metadata(raw)[METADATA_KEY])
    pools = digits_pools()
    assert ref.names == (
        "confidence",
        "margin",
        "predicted",
        "input_mean",
        "input_std",
        "input_ink",
        *(pc_name(i) for i in range(8)),
    )
    assert ref.features == 64 and ref.classes == 10 and ref.ink_threshold == 0.5
    assert ref.holdout_rows == len(pools.golden.y) == 300
    assert ref.input_rows == len(pools.train.y) + 300
    for s in ref.signals:
        expected = ref.holdout_rows if s.name in ("confidence", "margin", "predicted") else 1300
        assert sum(s.counts) == expected, s.name
    assert set(CONFIDENCE_GRID) <= set(ref.signal("confidence").edges)
    # Equal-mass bins where the values allow: every principal component's bins hold 10 %.
    assert ref.signal("pc0").counts == (130,) * 10
    cal = ref.calibration
    assert cal is not None and sum(cal.rows) == 300 and sum(cal.labels) == 300
    assert list(cal.accuracy) == sorted(cal.accuracy)  # monotone in confidence
    # What a device bins from the golden pool through ONNX Runtime is the shipped histogram.
    P = onnx_predict_proba(raw, pools.golden.X)
    hist = ref.histogram(pools.golden.X, P)
    for name in ("confidence", "margin", "predicted"):
        assert tuple(hist[name]) == ref.signal(name).counts
    right = (P.argmax(axis=1) == pools.golden.y).sum()
    assert sum(cal.correct) == right


def test_reference_is_deterministic_and_pca_is_orthonormal(champion_path: Path) -> None:
    raw = champion_path.read_bytes()
    pools = digits_pools()

    def build() -> MonitoringReference:
        return build_reference(
            lambda X: onnx_predict_proba(raw, X),
            pools.train.X,
            pools.golden.X,
            pools.golden.y,
            n_classes=10,
            value_range=(0.0, 1.0),
        )

    first = build()
    assert first.to_json() == build().to_json()  # signed bytes: same data, same reference
    assert first.to_json() == read_metadata(raw)[METADATA_KEY]
    pca = fit_pca(pools.train.X)
    assert pca is not None and pca.k == 8
    assert np.allclose(pca.components @ pca.components.T, np.eye(8), atol=1e-5)
    assert fit_pca(np.zeros((10, 5000), np.float32)) is None  # too wide for a device


def test_edges_calibration_and_refusals() -> None:
    values = np.arange(1000, dtype=np.float64)
    edges = quantile_edges(values, 10)
    assert len(edges) == 9 and np.histogram(values, [-np.inf, *edges, np.inf])[0].min() >= 99
    assert quantile_edges(np.ones(50), 10) == (1.0,)  # ties: fewer bins, never none
    with pytest.raises(ExportError, match="holdout rows"):
        build_reference(
            lambda X: X,
            np.zeros((5, 4)),
            np.zeros((0, 4)),
            np.zeros(0),
            n_classes=2,
            value_range=(0, 1),
        )
    with pytest.raises(ExportError, match="expected 3 classes"):
        build_reference(
            lambda X: np.full((len(X), 2), 0.5),
            np.zeros((5, 4)),
            np.zeros((4, 4)),
            np.zeros(4, int),
            n_classes=3,
            value_range=(0, 1),
        )


def test_a_bin_with_few_rows_is_shrunk_towards_its_confidence() -> None:
    rng = np.random.default_rng(0)
    conf = np.concatenate([rng.uniform(0.95, 1.0, 200), [0.35]])
    correct = np.concatenate([np.ones(200, bool), [False]])
    base = build_reference(
        lambda X: np.tile([0.98, 0.02], (len(X), 1)),
        rng.uniform(0, 1, (50, 4)),
        rng.uniform(0, 1, (20, 4)),
        np.zeros(20, int),
        n_classes=2,
        value_range=(0, 1),
    )
    cal = calibrate(base, conf, correct, np.zeros(201, int))
    acc = dict(zip(base.signal("confidence").edges, cal.accuracy[1:], strict=True))
    assert 0.0 < acc[0.3] < 0.35  # one wrong row: shrunk off 0 %, not up to its confidence
    assert cal.accuracy[-1] > 0.99


def test_embed_refuses_a_reference_the_contract_would_refuse(champion_path: Path) -> None:
    raw = champion_path.read_bytes()
    ref = MonitoringReference.from_json(read_metadata(raw)[METADATA_KEY])
    broken = replace(ref, signals=ref.signals[1:])  # calibration without confidence
    with pytest.raises(ExportError, match="confidence signal"):
        embed_reference(raw, broken)
    again = embed_reference(raw, ref)
    assert read_metadata(again)[METADATA_KEY] == ref.to_json()
