"""ImageFolder base data: ``<root>/<class>/*.png`` read into the flat float32 rows of the contract.

Layout (the torchvision ``ImageFolder`` convention, one folder per label)::

    <root>/train/<label>/*.png|jpg|jpeg|bmp     the base training pool
    <root>/golden/<label>/...                   the golden holdout (optional)

Without ``golden/``, every image under ``<root>/<label>/`` (or ``<root>/train/<label>/``) goes to
the golden holdout when ``sha256(relative path)`` falls under :data:`GOLDEN_FRACTION`, so the split
is a function of the file names alone. Images are converted to the input spec's channel count,
resized to its height and width, scaled to [0, 1] and flattened in C, H, W order: exactly the
vector a device sends and the model reshapes to ``input_spec.shape``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from training.data import Split
from training.errors import SpecError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
GOLDEN_FRACTION = 0.2  # share of images held out when the folder has no golden/ split
MAX_IMAGES = 200_000  # images per base data set; past this, use a real data loader


def image_shape(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(C, H, W) of an input spec shape ``[-1, C, H, W]``. Raises SpecError otherwise."""
    if len(shape) != 4 or shape[0] != -1 or shape[1] not in (1, 3):
        raise SpecError(
            f"imagefolder data needs an input_spec shape [-1, C, H, W] with C 1 or 3, "
            f"got {list(shape)}"
        )
    return int(shape[1]), int(shape[2]), int(shape[3])


def _class_dirs(root: Path, labels: tuple[str, ...]) -> dict[str, Path]:
    found = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if sorted(labels) != found:
        raise SpecError(
            f"class folders of {str(root)!r} are {found}; the line's labels are {sorted(labels)}"
        )
    return {name: root / name for name in labels}


def _files(dirs: dict[str, Path], labels: tuple[str, ...]) -> list[tuple[Path, int]]:
    out: list[tuple[Path, int]] = []
    for idx, name in enumerate(labels):
        files = sorted(p for p in dirs[name].rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        out.extend((p, idx) for p in files)
    if len(out) > MAX_IMAGES:
        raise SpecError(f"{len(out)} images, limit {MAX_IMAGES}")
    return out


def _load(files: list[tuple[Path, int]], shape: tuple[int, int, int]) -> Split:
    from PIL import Image, UnidentifiedImageError

    c, h, w = shape
    X = np.empty((len(files), c * h * w), np.float32)
    y = np.empty(len(files), np.int64)
    for i, (path, label) in enumerate(files):
        try:
            with Image.open(path) as raw:
                im = raw.convert("L" if c == 1 else "RGB").resize((w, h), Image.Resampling.BILINEAR)
                arr = np.asarray(im, dtype=np.float32) / 255.0
        except (OSError, UnidentifiedImageError) as exc:
            raise SpecError(f"cannot read image {path}: {exc}") from exc
        X[i] = (arr[None] if c == 1 else arr.transpose(2, 0, 1)).reshape(-1)
        y[i] = label
    return Split(X, y)


def _is_golden(root: Path, path: Path) -> bool:
    rel = path.relative_to(root).as_posix().encode("utf-8")
    digest = hashlib.sha256(b"edgeloop-imagefolder/v1|" + rel).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < GOLDEN_FRACTION


def load_imagefolder(
    root: str | Path, labels: tuple[str, ...], shape: tuple[int, ...]
) -> tuple[Split, Split]:
    """The (train, golden) pools of an ImageFolder tree for a line with ``labels``.

    Raises:
        SpecError: the folder is missing, its classes differ from the labels, an image cannot be
            read, or a pool would be empty.
    """
    root = Path(root)
    chw = image_shape(shape)
    if not root.is_dir():
        raise SpecError(f"imagefolder {str(root)!r} is not a directory")
    train_root = root / "train" if (root / "train").is_dir() else root
    train_files = _files(_class_dirs(train_root, labels), labels)
    if (root / "golden").is_dir():
        golden_files = _files(_class_dirs(root / "golden", labels), labels)
    else:
        golden_files = [f for f in train_files if _is_golden(train_root, f[0])]
        train_files = [f for f in train_files if not _is_golden(train_root, f[0])]
    if not train_files or not golden_files:
        raise SpecError(f"imagefolder {str(root)!r} needs images for both training and golden")
    return _load(train_files, chw), _load(golden_files, chw)


__all__ = ["GOLDEN_FRACTION", "image_shape", "load_imagefolder"]
