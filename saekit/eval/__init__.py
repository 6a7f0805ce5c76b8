"""Evaluation of trained dictionaries: the loss and reconstruction metrics over data (`metrics`), and the
dictionary spliced into the model it was trained on (`spliced`)."""

from .metrics import evaluate, evaluate_stream, fraction
from .spliced import spliced_eval

__all__ = ["evaluate", "evaluate_stream", "fraction", "spliced_eval"]
