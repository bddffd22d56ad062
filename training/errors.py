"""Exception family of the training package.

Every failure a job can hit is one of these, so the CLI maps them to an exit code and a one-line
message, and the server sees a crash only for a genuine bug. A challenger that is merely worse than
the champion, or whose ONNX export disagrees with the framework, is *not* an error: the job still
succeeds and its report says ``passed: false``.

Exception tree::

    TrainingError              (root: the job could not produce a report)
    ├── SpecError              (the job spec or its hyperparameters are invalid: fix the request)
    ├── SampleError            (the samples file is unreadable or does not match the spec)
    ├── ChampionError          (the champion's ONNX file cannot be loaded or run)
    ├── ExportError            (the challenger could not be converted to a valid ONNX model)
    └── ParityError            (ORT cannot run the exported model, or its output is malformed)
"""

from __future__ import annotations


class TrainingError(Exception):
    """A training job could not produce a report."""


class SpecError(TrainingError):
    """The job spec (or a hyperparameter in it) is invalid; retrying the same spec cannot help."""


class SampleError(TrainingError):
    """The uploaded-samples file is missing, unreadable or malformed."""


class ChampionError(TrainingError):
    """The champion model named by the spec cannot be loaded or run with ONNX Runtime."""


class ExportError(TrainingError):
    """Converting the trained challenger to ONNX failed or produced an invalid model."""


class ParityError(TrainingError):
    """The exported model cannot be run by ONNX Runtime, or its output has the wrong form."""


__all__ = [
    "ChampionError",
    "ExportError",
    "ParityError",
    "SampleError",
    "SpecError",
    "TrainingError",
]
