"""Evaluation of trained dictionaries: the loss and reconstruction metrics over data (`metrics`)."""

from .metrics import evaluate, evaluate_stream, fraction

__all__ = ["evaluate", "evaluate_stream", "fraction"]
