"""edgeloop training: versioned datasets, trainers, champion/challenger gate, ONNX export.

The server runs ``python -m training --spec spec.json`` for each job (see
:mod:`training.__main__`); :func:`run_job` is the same thing in-process. Heavy dependencies
(torch, skl2onnx, onnxruntime) load lazily, so ``import training`` stays cheap.
"""

from training.errors import (
    ChampionError,
    ExportError,
    ParityError,
    SampleError,
    SpecError,
    TrainingError,
)

__all__ = [
    "ChampionError",
    "ExportError",
    "ParityError",
    "SampleError",
    "SpecError",
    "TrainingError",
]
