"""Drift scores of a window of traffic against the model's reference, per signal.

Statistics, on binned counts. Both histograms get :data:`SMOOTHING` pseudo-counts per bin before
they become proportions ``r`` (reference) and ``w`` (window), so an empty bin is finite:

- PSI (population stability index) ``= sum_i (w_i - r_i) * ln(w_i / r_i)``;
- JS, the Jensen-Shannon *distance* (square root of the divergence, base 2, in [0, 1]), as
  Evidently reports it.

Why a fixed threshold cries wolf: under no drift, PSI (a symmetric KL divergence) is about
``chi2(K - 1) * (1/n + 1/N)`` for ``K`` bins, a window of ``n`` and a reference of ``N`` samples,
so its mean is ``(K - 1) * (1/n + 1/N)``: 0.099 with 10 bins, ``n = 100`` and ``N = 1000``.
"PSI > 0.1" then fires on about four unchanged windows in ten at 100 samples (more for every
further signal it watches), and almost never at 1,000+ samples, where it misses real drift below
0.1. The null distribution depends on ``n``; so does the threshold here.

Calibration (:class:`NullCalibrator`): for a signal and a window size ``n``, draw
:data:`NULL_DRAWS` pairs under "no drift" from the (smoothed) reference proportions ``p``: a
reference replicate of the reference's own size ``N`` and a window of ``n``, both multinomial, and
compute the statistic between them. Resampling the reference too accounts for the reference
being a finite sample (300 holdout rows make PSI noisy by themselves); drawing only windows would
under-state the null spread and fire on clean traffic when ``n >> N``. The threshold is the
``1 - alpha_test`` quantile of those draws, cached per (reference histogram, ``n`` bucket, number
of signals): signals with the same reference histogram share one calibration; buckets are the
powers of ``2 ** (1 / BUCKETS_PER_OCTAVE)`` and a window uses the bucket at or below its ``n``:
fewer samples mean a higher (more conservative) threshold.

False-alarm arithmetic: a window runs ``m`` tests (two statistics on each of its signals) and
breaches if any exceeds its threshold. With ``alpha_test = alpha / m`` (Bonferroni) the chance
that an unchanged window breaches is at most ``m * alpha_test = alpha`` whatever the dependence
between the signals (they share samples: the more they move together, the further below
``alpha`` the true rate falls). With ``alpha = 0.01``, one unchanged window in a hundred or fewer
breaches; the alert rule then asks for ``k`` consecutive breaching windows
(:mod:`server.monitoring.rules`), about ``alpha ** k`` per window for independent windows: 1e-4
with k = 2, i.e. one false alert in ~10,000 windows of one group (a week of 1-minute windows).
The reference is shared by every window, so an unlucky reference makes breaches of one signal
correlated; resampling it in the null keeps the *average* rate at ``alpha`` but not every
reference's. All of this assumes a window's samples are independent draws; traffic that repeats
itself (one scene seen many times, or a simulator resampling a small pool) breaches more often,
and ``dispersion`` holds a window of ``n`` to the threshold of ``n / dispersion`` samples. The
quantile comes from a finite number of draws, so the stated rate holds to within its Monte Carlo
error (at 40,000 draws and ``alpha_test`` ~3.6e-4, about 14 draws lie beyond the threshold).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.spatial.distance import jensenshannon

from server.monitoring._errors import MonitoringError

SMOOTHING = 0.5  # pseudo-count added to every bin of both histograms (Jeffreys prior)
DEFAULT_ALPHA = 0.01  # per-window false-alarm rate of a verdict (all signals, both statistics)
NULL_DRAWS = 40_000  # resampled (reference, window) pairs per threshold
BUCKETS_PER_OCTAVE = 4  # window-size buckets per doubling of n (thresholds are cached per bucket)
MIN_WINDOW_SAMPLES = 30  # samples below which a window gets no verdict
MAX_NULL_N = 10_000_000  # window sizes above this use this bucket's threshold (samples)
FIXED_PSI_THRESHOLD = 0.1  # the common fixed rule "PSI > 0.1", kept as a baseline
STATISTICS = ("psi", "js")


def _proportions(counts: np.ndarray, smoothing: float) -> np.ndarray:
    c = np.asarray(counts, np.float64) + smoothing
    return c / c.sum(axis=-1, keepdims=True)


def psi(
    reference: Sequence[int] | np.ndarray,
    window: Sequence[int] | np.ndarray,
    *,
    smoothing: float = SMOOTHING,
) -> np.ndarray | float:
    """Population stability index between count histograms (last axis: bins; leading axes
    broadcast, so a batch of windows is one call)."""
    r = _proportions(np.asarray(reference), smoothing)
    w = _proportions(np.asarray(window), smoothing)
    out = np.sum((w - r) * np.log(w / r), axis=-1)
    return float(out) if np.ndim(out) == 0 else out


def js_distance(
    reference: Sequence[int] | np.ndarray,
    window: Sequence[int] | np.ndarray,
    *,
    smoothing: float = SMOOTHING,
) -> np.ndarray | float:
    """Jensen-Shannon distance (base 2, in [0, 1]) between count histograms (last axis: bins)."""
    r = _proportions(np.asarray(reference), smoothing)
    w = _proportions(np.asarray(window), smoothing)
    r, w = np.broadcast_arrays(r, w)
    out = jensenshannon(r, w, base=2, axis=-1)
    return float(out) if np.ndim(out) == 0 else np.asarray(out)


def n_bucket(n: int) -> int:
    """The window size whose threshold a window of ``n`` samples uses: the largest power of
    ``2 ** (1 / BUCKETS_PER_OCTAVE)`` (rounded down to an integer) not above ``n``."""
    if n < 1:
        raise MonitoringError(f"window size must be >= 1, got {n}")
    n = min(n, MAX_NULL_N)
    step = math.floor(math.log2(n) * BUCKETS_PER_OCTAVE) + 2  # above the answer; walk down
    while True:
        b = math.floor(2 ** (step / BUCKETS_PER_OCTAVE) + 1e-9)
        if b <= n:
            return max(b, 1)
        step -= 1


@dataclass(frozen=True)
class Thresholds:
    """The calibrated thresholds of a reference histogram at one window-size bucket."""

    psi: float
    js: float
    n: int  # the bucket's window size
    alpha_test: float  # false-alarm rate of each of the two tests


class NullCalibrator:
    """Thresholds calibrated by resampling the reference (see the module docstring).

    Args:
        reference: each signal's reference bin counts.
        alpha: per-window false-alarm rate of the whole verdict (all its tests).
        draws: resampled pairs per threshold.
        seed: fixes the draws: the same reference and seed give the same thresholds, in any
            call order.
        dispersion: how much more a real window varies than independent samples would (>= 1):
            a window of ``n`` is held to the threshold of ``n / dispersion`` samples. Traffic is
            rarely independent (a camera sees one scene many times); 1 trusts it is.

    Raises:
        MonitoringError: an empty reference, a signal with fewer than 2 bins, or alpha outside
            (0, 1).
    """

    def __init__(
        self,
        reference: Mapping[str, Sequence[int] | np.ndarray],
        *,
        alpha: float = DEFAULT_ALPHA,
        draws: int = NULL_DRAWS,
        seed: int = 0,
        smoothing: float = SMOOTHING,
        dispersion: float = 1.0,
    ) -> None:
        if not dispersion >= 1.0:
            raise MonitoringError(f"dispersion must be >= 1, got {dispersion}")
        if not 0.0 < alpha < 1.0:
            raise MonitoringError(f"alpha must be within (0, 1), got {alpha}")
        if draws < 100:
            raise MonitoringError(f"draws must be >= 100, got {draws}")
        if not reference:
            raise MonitoringError("the reference has no signals")
        self.reference: dict[str, np.ndarray] = {}
        for name, counts in reference.items():
            arr = np.asarray(counts, np.int64)
            if arr.ndim != 1 or arr.size < 2 or arr.sum() < 1 or (arr < 0).any():
                raise MonitoringError(f"reference of {name!r} must be >= 2 non-negative counts")
            self.reference[name] = arr
        self.alpha = alpha
        self.draws = draws
        self.seed = seed
        self.smoothing = smoothing
        self.dispersion = dispersion
        self._cache: dict[tuple[bytes, int, int], Thresholds] = {}

    def alpha_test(self, signals: int) -> float:
        """Each test's false-alarm rate when a window runs both statistics on ``signals``."""
        return self.alpha / (len(STATISTICS) * max(signals, 1))

    def thresholds(self, signal: str, n: int, *, signals: int | None = None) -> Thresholds:
        """The thresholds for ``signal`` in a window of ``n`` samples that scores ``signals``
        signals (default: all of the reference's).

        Raises:
            MonitoringError: an unknown signal or n < 1.
        """
        ref = self.reference.get(signal)
        if ref is None:
            raise MonitoringError(f"no reference for signal {signal!r}")
        bucket = n_bucket(max(1, math.floor(n / self.dispersion)))
        m = len(self.reference) if signals is None else signals
        # Keyed by the histogram, not the name: equal-mass signals (every principal component)
        # share one null distribution, and so one calibration.
        key = (ref.tobytes(), bucket, m)
        hit = self._cache.get(key)
        if hit is None:
            hit = self._cache[key] = self._calibrate(ref, bucket, self.alpha_test(m))
        return hit

    def _calibrate(self, ref: np.ndarray, n: int, alpha_test: float) -> Thresholds:
        rng = np.random.default_rng([self.seed, n, zlib.crc32(ref.tobytes())])
        p = _proportions(ref, self.smoothing)
        ref_draws = rng.multinomial(int(ref.sum()), p, size=self.draws)
        win_draws = rng.multinomial(n, p, size=self.draws)
        q = 1.0 - alpha_test
        stat_psi = psi(ref_draws, win_draws, smoothing=self.smoothing)
        stat_js = js_distance(ref_draws, win_draws, smoothing=self.smoothing)
        return Thresholds(
            psi=float(np.quantile(stat_psi, q, method="higher")),
            js=float(np.quantile(stat_js, q, method="higher")),
            n=n,
            alpha_test=alpha_test,
        )


@dataclass(frozen=True)
class SignalScore:
    """One signal of one window: its statistics and the thresholds they are held to."""

    signal: str
    psi: float
    js: float
    psi_threshold: float
    js_threshold: float

    @property
    def breach(self) -> bool:
        return self.psi > self.psi_threshold or self.js > self.js_threshold

    @property
    def fixed_psi_breach(self) -> bool:
        """The baseline rule: PSI over :data:`FIXED_PSI_THRESHOLD`, whatever the window size."""
        return self.psi > FIXED_PSI_THRESHOLD


@dataclass(frozen=True)
class WindowVerdict:
    """The drift verdict of one window (one model version, device group and time window)."""

    samples: int
    alpha: float  # stated per-window false-alarm rate
    scores: tuple[SignalScore, ...] = field(default=())
    min_samples: int = MIN_WINDOW_SAMPLES

    @property
    def enough(self) -> bool:
        """Whether the window has the samples a verdict needs."""
        return self.samples >= self.min_samples

    @property
    def breach(self) -> bool:
        """Drift: some signal over its calibrated threshold, in a window with enough samples."""
        return self.enough and any(s.breach for s in self.scores)

    @property
    def fixed_psi_breach(self) -> bool:
        """The baseline "any signal's PSI > 0.1" on the same window."""
        return self.enough and any(s.fixed_psi_breach for s in self.scores)

    @property
    def drifted(self) -> tuple[str, ...]:
        """Signals over their thresholds, worst first (by PSI over its threshold)."""
        hot = [s for s in self.scores if s.breach]
        hot.sort(key=lambda s: s.psi / max(s.psi_threshold, 1e-12), reverse=True)
        return tuple(s.signal for s in hot)

    def to_dict(self) -> dict[str, object]:
        return {
            "samples": self.samples,
            "alpha": self.alpha,
            "enough": self.enough,
            "breach": self.breach,
            "drifted": list(self.drifted),
            "scores": [
                {
                    "signal": s.signal,
                    "psi": s.psi,
                    "js": s.js,
                    "psi_threshold": s.psi_threshold,
                    "js_threshold": s.js_threshold,
                    "breach": s.breach,
                }
                for s in self.scores
            ],
        }


def score_window(
    calibrator: NullCalibrator,
    window: Mapping[str, Sequence[int] | np.ndarray],
    *,
    min_samples: int = MIN_WINDOW_SAMPLES,
) -> WindowVerdict:
    """Score a window's histograms (summaries already added up, see
    ``contract.monitoring.merge_counts``) against the calibrator's reference.

    Signals missing from the window are not scored; the Bonferroni split is over the signals
    scored. A window below ``min_samples`` gets scores but no breach.

    Raises:
        MonitoringError: a signal the reference lacks, other bin counts, or signals whose
            counts disagree on the window's sample count.
    """
    names = [name for name in calibrator.reference if name in window]
    unknown = set(window) - set(calibrator.reference)
    if unknown:
        raise MonitoringError(f"signals without a reference: {sorted(unknown)}")
    if not names:
        return WindowVerdict(samples=0, alpha=calibrator.alpha, min_samples=min_samples)
    arrays = {name: np.asarray(window[name], np.int64) for name in names}
    totals = {int(a.sum()) for a in arrays.values()}
    if len(totals) != 1:
        raise MonitoringError(f"signals disagree on the window's samples: {sorted(totals)}")
    n = totals.pop()
    scores = []
    for name in names:
        ref, win = calibrator.reference[name], arrays[name]
        if win.shape != ref.shape:
            raise MonitoringError(f"signal {name!r}: {win.size} bins, the reference {ref.size}")
        if n == 0:
            continue
        th = calibrator.thresholds(name, n, signals=len(names))
        scores.append(
            SignalScore(
                signal=name,
                psi=float(psi(ref, win, smoothing=calibrator.smoothing)),
                js=float(js_distance(ref, win, smoothing=calibrator.smoothing)),
                psi_threshold=th.psi,
                js_threshold=th.js,
            )
        )
    return WindowVerdict(
        samples=n, alpha=calibrator.alpha, scores=tuple(scores), min_samples=min_samples
    )


__all__ = [
    "DEFAULT_ALPHA",
    "FIXED_PSI_THRESHOLD",
    "MIN_WINDOW_SAMPLES",
    "NULL_DRAWS",
    "SMOOTHING",
    "NullCalibrator",
    "SignalScore",
    "Thresholds",
    "WindowVerdict",
    "js_distance",
    "n_bucket",
    "psi",
    "score_window",
]
