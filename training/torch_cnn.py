"""The ``torch-cnn`` trainer: a small convolutional net over the flat 8x8 input.

The network takes the flat ``[N, 64]`` tensor the devices send, reshapes it to ``[N, 1, 8, 8]``
inside ``forward`` (so the ONNX model has the same input as every other trainer's) and ends in a
softmax, so its output *is* the probabilities tensor of the contract.

Training is deterministic on CPU: the global RNG is seeded inside ``torch.random.fork_rng`` (the
caller's RNG state is left untouched), minibatch order comes from a seeded generator, deterministic
algorithms are enforced and the thread count is pinned; all of it is restored afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from training.errors import TrainingError


class DigitsCNN(nn.Module):
    """Conv(3x3)+ReLU per entry of ``channels``, one 2x2 max-pool, then an MLP head and softmax."""

    def __init__(self, n_features: int, n_classes: int, channels: Sequence[int], hidden: int):
        super().__init__()
        side = math.isqrt(n_features)
        if side * side != n_features or side < 2:
            raise TrainingError(f"torch-cnn needs a square image input, got {n_features} features")
        self.side = side
        layers: list[nn.Module] = []
        prev = 1
        for c in channels:
            layers += [nn.Conv2d(prev, c, kernel_size=3, padding=1), nn.ReLU()]
            prev = c
        layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        pooled = side // 2
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(prev * pooled * pooled, hidden),
            nn.ReLU(),
            nn.Linear(hidden, n_classes),
        )

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Unnormalised class scores for flat input ``x`` [N, side*side]."""
        return self.head(self.features(x.reshape(-1, 1, self.side, self.side)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities [N, n_classes]; the exported graph is exactly this."""
        return torch.softmax(self.logits(x), dim=1)


@contextmanager
def deterministic_torch(seed: int, threads: int) -> Iterator[None]:
    """Seeded, deterministic, thread-pinned torch for the duration of the block; state restored."""
    prev_threads = torch.get_num_threads()
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)
            torch.set_num_threads(prev_threads)


@dataclass
class TorchModel:
    """A trained :class:`DigitsCNN` in eval mode."""

    net: DigitsCNN
    n_features: int

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            x = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
            return self.net(x).numpy()

    def to_onnx(self, *, input_name: str = "input") -> bytes:
        from training.export import torch_to_onnx

        return torch_to_onnx(self.net, n_features=self.n_features, input_name=input_name)


def fit_cnn(
    X: np.ndarray,
    y: np.ndarray,
    *,
    n_classes: int,
    seed: int,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    channels: Sequence[int],
    hidden: int,
    threads: int,
) -> TorchModel:
    """Train a :class:`DigitsCNN` with Adam and minibatches; same inputs give the same weights.

    Args:
        X: float [n, n_features] in the input range; y: int class indices [n].
        threads: CPU threads for torch (capped at 2: more buys nothing at this size and would
            compete with the server on a small machine).
    """
    n_features = int(X.shape[1])
    xt = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
    yt = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))
    with deterministic_torch(seed, min(threads, 2)):
        net = DigitsCNN(n_features, n_classes, channels, hidden)
        opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
        order = torch.Generator().manual_seed(seed)
        net.train()
        for _ in range(epochs):
            perm = torch.randperm(len(xt), generator=order)
            for start in range(0, len(xt), batch_size):
                idx = perm[start : start + batch_size]
                opt.zero_grad()
                loss = nn.functional.cross_entropy(net.logits(xt[idx]), yt[idx])
                loss.backward()
                opt.step()
        net.eval()
    return TorchModel(net, n_features)


__all__ = ["DigitsCNN", "TorchModel", "deterministic_torch", "fit_cnn"]
