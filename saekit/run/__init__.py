"""Runs: the run folder that owns every file (`folder`) and the lifecycle that fills it (`train`).

from saekit.run import train_run, resume_run, load_model
"""

from .folder import RunFolder, load_classifier, load_model
from .train import RESUMABLE, Interrupted, RunResult, resume_run, train_run, write_classification

__all__ = [
    "RESUMABLE",
    "Interrupted",
    "RunFolder",
    "RunResult",
    "load_classifier",
    "load_model",
    "resume_run",
    "train_run",
    "write_classification",
]
