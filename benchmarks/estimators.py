"""Label-free accuracy estimators under the simulator's camera drift: which one holds at 1.0?

    .venv/bin/python -m benchmarks.estimators [--drift-seeds 1 2 3] [--json PATH]

The digits line's first model, trained and exported by the pipeline (``benchmarks.monitoring``'s
``train_model``), its embedded reference (holdout: the 300 golden rows), and the 497-row field
pool drifted with ``training.data.drift`` at severities 0 .. 1. Everything an estimator fits is
fitted on the training rows or the golden holdout only; the drifted pools are unlabelled at
estimate time (their labels only give the true accuracy the estimates are judged against).

Estimators (each a fraction of correct predictions):

- ``cbpe``: the shipped CBPE (``server.monitoring.estimate``) on the window's confidence
  histogram, binned by the reference as a device bins it.
- ``atc_mc`` / ``atc_ne``: average thresholded confidence (Garg et al. 2022): the threshold on
  the score (max confidence / negative entropy) above which the holdout's share equals its
  accuracy; the estimate is the share of the window above it.
- ``doc``: difference of confidences (Guillory et al. 2021): holdout accuracy minus the drop in
  mean confidence.
- ``gde_*``: agreement of the served model with a second model that could ship in the bundle
  (Jiang et al. 2022): another MLP seed, a logistic regression, or a logistic regression / small
  MLP on the 8-d PCA projection the reference already ships. ``gde_*`` is the raw agreement;
  ``gdec_*`` shifts it by the holdout's gap (accuracy - agreement).
- ``iw_*``: importance-weighted holdout accuracy, weights the window/holdout density ratio of one
  monitored signal's histogram (``iw_<signal>``) or the product over all signals (``iw_all``, a
  naive-Bayes ratio: the device only sends marginals).
- ``prior_bound``: the label-free ceiling ``sum_k min(predicted share, class prior)`` (an upper
  bound, not an estimate).

Last, how often the drift verdict breaches on windows of ``--window`` inferences drawn from each
pool (the judge of ``benchmarks.monitoring``: alpha 0.01, dispersion ``1 + window / 497``): a
breaching window's estimate is marked untrusted (``server.monitoring.estimate.estimate_trusted``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

SEVERITIES = (0.0, 0.25, 0.5, 0.75, 1.0)


def _entropy_score(P: np.ndarray) -> np.ndarray:
    return (P * np.log(np.clip(P, 1e-12, 1.0))).sum(axis=1)  # negative entropy


def atc_threshold(score: np.ndarray, correct: np.ndarray) -> float:
    """The t with mean(score > t) == mean(correct) on the holdout (Garg et al. 2022)."""
    return float(np.quantile(score, 1.0 - correct.mean()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="estimators", description=__doc__.splitlines()[0])
    ap.add_argument("--drift-seeds", type=int, nargs="+", default=[1])
    ap.add_argument("--window", type=int, default=120, help="inferences per judged window")
    ap.add_argument("--windows", type=int, default=200, help="windows judged per severity")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier

    from benchmarks.monitoring import train_model
    from contract.monitoring import METADATA_KEY, MonitoringReference
    from server.monitoring.drift import NullCalibrator, score_window
    from server.monitoring.estimate import class_prior_bound, estimate_accuracy, estimate_trusted
    from training.data import digits_pools, drift
    from training.export import onnx_predict_proba, read_metadata
    from training.trainers import train

    pools = digits_pools()
    with tempfile.TemporaryDirectory(prefix="estimators-") as tmp:
        onnx = train_model(Path(tmp)).read_bytes()
    ref = MonitoringReference.from_json(read_metadata(onnx)[METADATA_KEY])
    cal, pca = ref.calibration, ref.pca
    assert cal is not None and pca is not None

    Xtr, ytr = pools.train.X, pools.train.y
    Xho, yho = pools.golden.X, pools.golden.y

    def proba(X: np.ndarray) -> np.ndarray:
        return onnx_predict_proba(onnx, X)

    def project(X: np.ndarray) -> np.ndarray:
        return (X - pca.mean) @ pca.components.T

    # Second models: trained on the training rows only.
    second: dict[str, Any] = {}
    mlp1, _ = train("sklearn-mlp", Xtr, ytr, n_classes=10, seed=1)
    second["mlp_seed1"] = mlp1.predict_proba
    mlp_small = MLPClassifier((16,), max_iter=2000, random_state=2).fit(Xtr, ytr)
    second["mlp16"] = mlp_small.predict_proba
    logreg, _ = train("sklearn-logreg", Xtr, ytr, n_classes=10, seed=0)
    second["logreg"] = logreg.predict_proba
    lr_pca = LogisticRegression(max_iter=5000).fit(project(Xtr), ytr)
    second["pca_logreg"] = lambda X: lr_pca.predict_proba(project(X))
    mlp_pca = MLPClassifier((32,), max_iter=3000, random_state=0).fit(project(Xtr), ytr)
    second["pca_mlp"] = lambda X: mlp_pca.predict_proba(project(X))

    # Holdout statistics.
    P_ho = proba(Xho)
    pred_ho = P_ho.argmax(1)
    correct_ho = pred_ho == yho
    acc_ho = float(correct_ho.mean())
    mc_ho, ne_ho = P_ho.max(1), _entropy_score(P_ho)
    t_mc, t_ne = atc_threshold(mc_ho, correct_ho), atc_threshold(ne_ho, correct_ho)
    agree_ho = {k: float((f(Xho).argmax(1) == pred_ho).mean()) for k, f in second.items()}
    second_acc_ho = {k: float((f(Xho).argmax(1) == yho).mean()) for k, f in second.items()}
    hist_ho = ref.histogram(Xho, P_ho)
    # input signals' reference counts include training rows; for the weights we need each
    # holdout row's bin, so recompute the holdout's own histogram and row bins.
    vals_ho = ref.values(Xho, P_ho)
    bins_ho = {}
    for s in ref.signals:
        v = vals_ho[s.name]
        bins_ho[s.name] = (
            np.clip(v, 0, s.bins - 1)
            if s.categorical
            else np.searchsorted(np.asarray(s.edges), v, side="right")
        )

    calibrator = NullCalibrator(
        {s.name: s.counts for s in ref.signals},
        alpha=0.01,
        dispersion=1.0 + args.window / len(pools.field.y),
    )
    rows: list[dict[str, Any]] = []
    for dseed in args.drift_seeds:
        for sev in SEVERITIES:
            X = drift(pools.field.X, severity=sev, seed=dseed) if sev else pools.field.X
            y = pools.field.y
            P = proba(X)
            pred = P.argmax(1)
            true = float((pred == y).mean())
            hist = ref.histogram(X, P)
            est: dict[str, float] = {}
            est["cbpe"] = estimate_accuracy(hist["confidence"], cal).accuracy  # type: ignore[union-attr]
            est["atc_mc"] = float((P.max(1) > t_mc).mean())
            est["atc_ne"] = float((_entropy_score(P) > t_ne).mean())
            est["doc"] = acc_ho - (float(mc_ho.mean()) - float(P.max(1).mean()))
            for k, f in second.items():
                agree = float((f(X).argmax(1) == pred).mean())
                est[f"gde_{k}"] = agree
                est[f"gdec_{k}"] = agree + (acc_ho - agree_ho[k])
            # importance weights from histogram ratios (window / holdout), per holdout row
            logw_all = np.zeros(len(Xho))
            for s in ref.signals:
                h_ho = hist_ho[s.name].astype(float) + 0.5
                h_w = hist[s.name].astype(float) + 0.5
                ratio = (h_w / h_w.sum()) / (h_ho / h_ho.sum())
                w = ratio[bins_ho[s.name]]
                logw_all += np.log(w)
                if s.name in ("confidence", "input_ink", "input_std", "pc0", "predicted"):
                    est[f"iw_{s.name}"] = float((w * correct_ho).sum() / w.sum())
            w = np.exp(logw_all - logw_all.max())
            est["iw_all"] = float((w * correct_ho).sum() / w.sum())
            est["prior_bound"] = class_prior_bound(hist["predicted"], cal.labels) or float("nan")
            rng = np.random.default_rng([dseed, int(sev * 100)])
            untrusted, cbpe_err = 0, []
            for _ in range(args.windows):
                idx = rng.integers(0, len(X), args.window)
                h = ref.histogram(X[idx], P[idx])
                w_est = estimate_accuracy(h["confidence"], cal)
                assert w_est is not None
                verdict = score_window(calibrator, h, min_samples=100)
                untrusted += estimate_trusted(w_est.accuracy, verdict.to_dict()) is False
                cbpe_err.append(abs(w_est.accuracy - float((pred[idx] == y[idx]).mean())))
            rows.append(
                {
                    "drift_seed": dseed,
                    "severity": sev,
                    "true": true,
                    "est": est,
                    "untrusted_share": untrusted / args.windows,
                    "window_cbpe_error_p95": float(np.percentile(cbpe_err, 95)),
                }
            )

    methods = list(rows[0]["est"])
    print(f"holdout: {len(Xho)} rows, accuracy {acc_ho:.3f}; ATC thresholds mc {t_mc:.3f}")
    print("second models (holdout accuracy / agreement with served):")
    for k in second:
        print(f"  {k:12s} {second_acc_ho[k]:.3f} / {agree_ho[k]:.3f}")
    for dseed in args.drift_seeds:
        sel = [r for r in rows if r["drift_seed"] == dseed]
        print(f"\ndrift seed {dseed}: est (|est - true|) per severity")
        head = f"{'method':18s}" + "".join(
            f"{'sev ' + format(r['severity'], 'g'):>16s}" for r in sel
        )
        print(head + f"{'max err':>9s}")
        print(f"{'true':18s}" + "".join(f"{r['true']:16.3f}" for r in sel))
        for m in methods:
            errs = [abs(r["est"][m] - r["true"]) for r in sel]
            cells = "".join(f"{r['est'][m]:9.3f} ({e:.3f})" for r, e in zip(sel, errs, strict=True))
            print(f"{m:18s}{cells}{max(errs):9.3f}")
        print(f"windows of {args.window}: untrusted (drift verdict breaches), CBPE p95 error")
        for r in sel:
            print(
                f"  sev {r['severity']:<5g} untrusted {r['untrusted_share']:6.1%}"
                f"   p95 |cbpe - true| {r['window_cbpe_error_p95']:.3f}"
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
