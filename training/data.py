"""Base data and realistic drift for the default ``digits`` model line.

The base data set is scikit-learn's bundled digits (1,797 8x8 images, no download). It is split
once, deterministically, into three disjoint pools:

- ``train``:  what the first model is trained on (the base of every dataset version);
- ``golden``: the fixed golden holdout every champion and challenger is gated on; never trained on;
- ``field``:  what simulated devices see in the field (with or without drift).

Drift is made with torchvision transforms on the 8x8 image (rotation, blur, contrast loss), the kind
a camera that was knocked askew and went out of focus produces.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

N_FEATURES = 64
IMAGE_SHAPE = (1, 8, 8)
LABELS = tuple(str(i) for i in range(10))
SPLIT_SEED = 20261122


@dataclass(frozen=True)
class Split:
    X: np.ndarray  # float32 [n, 64] in [0, 1]
    y: np.ndarray  # int64 [n]


@dataclass(frozen=True)
class DigitsPools:
    train: Split
    golden: Split
    field: Split


@lru_cache(maxsize=1)
def digits_pools() -> DigitsPools:
    """The three fixed pools (sizes 1000 / 300 / 497)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    X = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    idx = np.random.default_rng(SPLIT_SEED).permutation(len(X))
    tr, go, fi = idx[:1000], idx[1000:1300], idx[1300:]
    return DigitsPools(Split(X[tr], y[tr]), Split(X[go], y[go]), Split(X[fi], y[fi]))


def drift(X: np.ndarray, *, severity: float = 1.0, seed: int = 0) -> np.ndarray:
    """Apply camera drift to flat 8x8 images with torchvision: rotation, blur, contrast loss.

    ``severity`` 0 returns the input unchanged; 1 is a rotation of 20-35 degrees either way,
    a 3x3 Gaussian blur and 35% contrast loss.
    """
    import torch
    from torchvision.transforms.v2 import functional as F

    if severity <= 0:
        return X.astype(np.float32, copy=True)
    gen = torch.Generator().manual_seed(seed)
    imgs = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32)).reshape(-1, *IMAGE_SHAPE)
    out = torch.empty_like(imgs)
    for i in range(imgs.shape[0]):
        angle = float(torch.empty(1).uniform_(20.0, 35.0, generator=gen)) * severity
        if torch.rand(1, generator=gen).item() < 0.5:
            angle = -angle
        im = F.rotate(imgs[i], angle)
        im = F.gaussian_blur(im, [3, 3], [0.3 + 0.5 * severity] * 2)
        # Contrast loss around the mid-level: faded strokes, grey background.
        out[i] = F.adjust_contrast(im.repeat(3, 1, 1), 1.0 - 0.35 * severity)[:1]
    return out.reshape(-1, N_FEATURES).clamp(0.0, 1.0).numpy()
