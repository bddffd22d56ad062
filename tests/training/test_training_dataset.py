"""Dataset versions: content-addressed, order-independent, split by sample-id hash."""

from __future__ import annotations

import numpy as np
import pytest

from tests.training.training_testkit import make_samples
from training.data import digits_pools
from training.dataset import build_dataset, field_bucket, is_field
from training.errors import SampleError
from training.samples import Samples, load_samples


@pytest.fixture(scope="module")
def base():
    return digits_pools().train


@pytest.fixture(scope="module")
def samples() -> Samples:
    field = digits_pools().field
    return make_samples(field.X[:200], field.y[:200])


def _subset(s: Samples, rows: np.ndarray) -> Samples:
    return Samples(s.X[rows], s.y[rows], s.sample_ids[rows], s.device_ids[rows])


def test_version_is_deterministic_and_order_independent(base, samples):
    a = build_dataset(base, samples)
    b = build_dataset(base, samples)
    shuffled = _subset(samples, np.random.default_rng(1).permutation(len(samples)))
    c = build_dataset(base, shuffled)

    assert a.version == b.version == c.version
    assert len(a.version) == 64
    # The canonical row order makes the training arrays themselves identical too.
    np.testing.assert_array_equal(a.X_train, c.X_train)
    np.testing.assert_array_equal(a.y_train, c.y_train)
    np.testing.assert_array_equal(a.X_field, c.X_field)
    assert a.manifest == c.manifest


def test_version_changes_when_a_sample_is_added_or_altered(base, samples):
    v = build_dataset(base, _subset(samples, np.arange(199))).version
    assert build_dataset(base, samples).version != v

    relabelled = Samples(samples.X, samples.y.copy(), samples.sample_ids, samples.device_ids)
    relabelled.y[0] = (relabelled.y[0] + 1) % 10
    assert build_dataset(base, relabelled).version != build_dataset(base, samples).version


def test_version_depends_on_base_and_split_parameters(base, samples):
    v = build_dataset(base, samples).version
    assert build_dataset(base, samples, field_fraction=0.3).version != v
    smaller = type(base)(base.X[:-1], base.y[:-1])
    assert build_dataset(smaller, samples).version != v


def test_split_by_sample_id_hash_is_stable(base, samples):
    full = build_dataset(base, samples)
    part = build_dataset(base, _subset(samples, np.arange(0, 200, 2)))

    # A sample lands on the same side whatever else is in the dataset.
    full_field = set(full.field_sample_ids)
    for sid in part.field_sample_ids:
        assert sid in full_field
    for sid in part.train_sample_ids:
        assert sid not in full_field
    assert set(full.field_sample_ids) == {s for s in samples.sample_ids if is_field(s)}
    assert field_bucket("abc") == field_bucket("abc")

    # About a fifth held out, and the counts add up.
    assert 0.1 < full.field_eval_count / len(samples) < 0.3
    assert full.train_count == len(base.y) + len(full.train_sample_ids)
    assert full.sample_count == len(samples)
    assert full.field_eval_count == len(full.field_sample_ids)


def test_no_samples_gives_the_base_pool(base):
    ds = build_dataset(base, Samples.empty(64))
    assert ds.train_count == len(base.y) == ds.base_count
    assert ds.field_eval_count == 0
    assert ds.summary() == {
        "base": "digits-train",
        "base_count": 1000,
        "sample_count": 0,
        "train_count": 1000,
        "field_eval_count": 0,
        "rejected_count": 0,
    }


def test_bad_rows_are_rejected_and_listed(base, samples):
    X, y = samples.X[:6].copy(), samples.y[:6].copy()
    ids = np.array(["ok-1", "nan", "range", "label", "dup", "dup"])
    devices = np.array(["d1", "d1", "d2", "d2", "d3", "d3"])
    X[1, 0] = np.nan
    X[2, 5] = 1.5
    y[3] = 10
    X[5] = X[4] * 0.5  # same id, different content
    ds = build_dataset(base, Samples(X, y, ids, devices))

    assert ds.sample_count == 1
    reasons = dict(ds.rejected)
    assert set(reasons) == {"nan", "range", "label", "dup"}
    assert "non-finite" in reasons["nan"]
    assert "outside" in reasons["range"]
    assert "label index 10" in reasons["label"]
    assert "different content" in reasons["dup"]
    assert ds.manifest["samples"]["rejected"][0]["sample_id"] == "dup"
    assert ds.manifest["devices"] == {"d1": 1}


def test_exact_duplicates_count_once(base, samples):
    doubled = Samples(
        np.concatenate([samples.X, samples.X]),
        np.concatenate([samples.y, samples.y]),
        np.concatenate([samples.sample_ids, samples.sample_ids]),
        np.concatenate([samples.device_ids, samples.device_ids]),
    )
    once = build_dataset(base, samples)
    twice = build_dataset(base, doubled)
    assert twice.version == once.version
    assert twice.sample_count == len(samples)


def test_manifest_records_ids_devices_and_base(base, samples):
    ds = build_dataset(base, samples)
    m = ds.manifest
    assert m["dataset_version"] == ds.version
    assert m["base"]["count"] == 1000 and len(m["base"]["sha256"]) == 64
    assert sorted(m["samples"]["train_ids"] + m["samples"]["field_ids"]) == sorted(
        samples.sample_ids.tolist()
    )
    assert sum(m["devices"].values()) == len(samples)
    assert m["split"]["field_fraction"] == 0.2


def test_load_samples_round_trip_and_errors(tmp_path, samples):
    path = tmp_path / "s.npz"
    np.savez(
        path, X=samples.X, y=samples.y, sample_ids=samples.sample_ids, device_ids=samples.device_ids
    )
    loaded = load_samples(path, 64)
    np.testing.assert_array_equal(loaded.X, samples.X)
    assert loaded.sample_ids.tolist() == samples.sample_ids.tolist()

    np.savez(
        tmp_path / "empty.npz",
        X=np.zeros((0, 64), np.float32),
        y=np.zeros(0, np.int64),
        sample_ids=np.array([], dtype=str),
        device_ids=np.array([], dtype=str),
    )
    assert len(load_samples(tmp_path / "empty.npz", 64)) == 0

    np.savez(
        tmp_path / "noy.npz",
        X=samples.X,
        sample_ids=samples.sample_ids,
        device_ids=samples.device_ids,
    )
    with pytest.raises(SampleError, match="missing array"):
        load_samples(tmp_path / "noy.npz", 64)

    np.savez(
        tmp_path / "wide.npz",
        X=np.zeros((2, 65), np.float32),
        y=np.zeros(2, np.int64),
        sample_ids=np.array(["a", "b"]),
        device_ids=np.array(["d", "d"]),
    )
    with pytest.raises(SampleError, match=r"X must be float \[n, 64\]"):
        load_samples(tmp_path / "wide.npz", 64)

    np.savez(
        tmp_path / "obj.npz",
        X=samples.X[:2],
        y=samples.y[:2],
        sample_ids=np.array(["a", "b"], dtype=object),
        device_ids=np.array(["d", "d"]),
    )
    with pytest.raises(SampleError):
        load_samples(tmp_path / "obj.npz", 64)

    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(SampleError, match="cannot read"):
        load_samples(tmp_path / "junk.npz", 64)
