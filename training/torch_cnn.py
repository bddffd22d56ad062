"""The torch trainers: ``torch-cnn`` (a small CNN) and ``torch-mobilenet`` (mobilenet_v3_small).

Each network takes the input the devices send (flat ``[N, F]`` or ``[N, C, H, W]``, whatever the
input spec says), reshapes it to ``[N, C, H, W]`` inside ``forward`` and ends in a softmax, so its
output *is* the probabilities tensor of the contract. A flat ``[-1, 64]`` spec is the 1x8x8 digits
image; a ``[-1, C, H, W]`` spec is taken as is.

Training is deterministic on CPU: the global RNG is seeded inside ``torch.random.fork_rng`` (the
caller's RNG state is left untouched), minibatch order comes from a seeded generator, deterministic
algorithms are enforced and the thread count is pinned; all of it is restored afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from training.errors import TrainingError


def image_shape_of(sample_shape: Sequence[int]) -> tuple[int, int, int]:
    """(C, H, W) for one sample's shape: ``(F,)`` with F a square, or ``(C, H, W)``.

    Raises:
        TrainingError: the input is not an image.
    """
    dims = tuple(int(d) for d in sample_shape)
    if len(dims) == 1:
        side = math.isqrt(dims[0])
        if side * side == dims[0] and side >= 2:
            return 1, side, side
    elif len(dims) == 3 and all(d >= 2 for d in dims[1:]):
        return dims  # type: ignore[return-value]
    raise TrainingError(
        f"torch trainers need a square flat input or [C, H, W], got sample shape {list(dims)}"
    )


class ImageNet(nn.Module):
    """Base of the torch models: reshape to [N, C, H, W], ``logits``, softmax in ``forward``."""

    def __init__(self, image_shape: tuple[int, int, int]):
        super().__init__()
        self.image_shape = image_shape

    def body(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Unnormalised class scores for input ``x`` (flat or image-shaped)."""
        return self.body(x.reshape(-1, *self.image_shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities [N, n_classes]; the exported graph is exactly this."""
        return torch.softmax(self.logits(x), dim=1)


class DigitsCNN(ImageNet):
    """Conv(3x3)+ReLU per entry of ``channels``, one 2x2 max-pool, then an MLP head and softmax."""

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        n_classes: int,
        channels: Sequence[int],
        hidden: int,
    ):
        super().__init__(image_shape)
        c_in, h, w = image_shape
        layers: list[nn.Module] = []
        prev = c_in
        for c in channels:
            layers += [nn.Conv2d(prev, c, kernel_size=3, padding=1), nn.ReLU()]
            prev = c
        layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(prev * (h // 2) * (w // 2), hidden),
            nn.ReLU(),
            nn.Linear(hidden, n_classes),
        )

    def body(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class MobileNetSmall(ImageNet):
    """torchvision's mobilenet_v3_small, untrained (no weight download); grey input is
    repeated to three channels."""

    def __init__(self, image_shape: tuple[int, int, int], n_classes: int, dropout: float):
        from torchvision.models import mobilenet_v3_small

        super().__init__(image_shape)
        self.net = mobilenet_v3_small(weights=None, num_classes=n_classes, dropout=dropout)

    def body(self, x: torch.Tensor) -> torch.Tensor:
        if self.image_shape[0] == 1:
            x = x.repeat(1, 3, 1, 1)
        out: torch.Tensor = self.net(x)
        return out


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
    """A trained torch network in eval mode."""

    net: ImageNet
    sample_shape: tuple[int, ...]  # one sample's shape in the ONNX input (batch excluded)
    warm_started: bool = False

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            x = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
            out: np.ndarray = self.net(x).numpy()
            return out

    def to_onnx(self, *, input_name: str = "input") -> bytes:
        from training.export import torch_to_onnx

        return torch_to_onnx(self.net, sample_shape=self.sample_shape, input_name=input_name)

    def state(self) -> dict[str, np.ndarray]:
        """The weights as numpy arrays (saved as ``weights.npz`` for warm starts)."""
        return {k: v.detach().cpu().numpy() for k, v in self.net.state_dict().items()}


def _load_state(net: nn.Module, init: dict[str, np.ndarray] | None) -> bool:
    """Load ``init`` into ``net`` if every name and shape matches; True when loaded."""
    if not init:
        return False
    own = net.state_dict()
    if set(own) != set(init) or any(tuple(own[k].shape) != init[k].shape for k in own):
        return False
    net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in init.items()})
    return True


def fit_torch(
    make_net: Callable[[], ImageNet],
    X: np.ndarray,
    y: np.ndarray,
    *,
    sample_shape: tuple[int, ...],
    seed: int,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    threads: int,
    max_steps: int = 0,
    init: dict[str, np.ndarray] | None = None,
) -> TorchModel:
    """Train ``make_net()`` with Adam and minibatches; same inputs give the same weights.

    Args:
        X: float [n, n_features] in the input range; y: int class indices [n].
        threads: CPU threads for torch (capped at 2: more buys nothing at this size and would
            compete with the server on a small machine).
        max_steps: stop after this many optimiser steps (0: no limit).
        init: weights to start from (the champion's), used when they fit the network.
    """
    xt = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
    yt = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))
    steps = 0
    with deterministic_torch(seed, min(threads, 2)):
        net = make_net()
        warm = _load_state(net, init)
        opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
        order = torch.Generator().manual_seed(seed)
        net.train()
        for _ in range(epochs):
            perm = torch.randperm(len(xt), generator=order)
            for start in range(0, len(xt), batch_size):
                idx = perm[start : start + batch_size]
                if len(idx) < 2:  # batch norm cannot train on a batch of one
                    continue
                opt.zero_grad()
                loss = nn.functional.cross_entropy(net.logits(xt[idx]), yt[idx])
                loss.backward()
                opt.step()
                steps += 1
                if max_steps and steps >= max_steps:
                    break
            if max_steps and steps >= max_steps:
                break
        net.eval()
    return TorchModel(net, sample_shape, warm_started=warm)


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
    sample_shape: tuple[int, ...] | None = None,
    init: dict[str, np.ndarray] | None = None,
) -> TorchModel:
    """Train a :class:`DigitsCNN` (see :func:`fit_torch`)."""
    shape = sample_shape or (int(X.shape[1]),)
    chw = image_shape_of(shape)
    return fit_torch(
        lambda: DigitsCNN(chw, n_classes, channels, hidden),
        X,
        y,
        sample_shape=shape,
        seed=seed,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        threads=threads,
        init=init,
    )


def fit_mobilenet(
    X: np.ndarray,
    y: np.ndarray,
    *,
    n_classes: int,
    seed: int,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    dropout: float,
    threads: int,
    max_steps: int,
    sample_shape: tuple[int, ...] | None = None,
    init: dict[str, np.ndarray] | None = None,
) -> TorchModel:
    """Train torchvision's mobilenet_v3_small from scratch or from ``init`` (no downloads)."""
    shape = sample_shape or (int(X.shape[1]),)
    chw = image_shape_of(shape)
    return fit_torch(
        lambda: MobileNetSmall(chw, n_classes, dropout),
        X,
        y,
        sample_shape=shape,
        seed=seed,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        threads=threads,
        max_steps=max_steps,
        init=init,
    )


__all__ = [
    "DigitsCNN",
    "ImageNet",
    "MobileNetSmall",
    "TorchModel",
    "deterministic_torch",
    "fit_cnn",
    "fit_mobilenet",
    "fit_torch",
    "image_shape_of",
]
