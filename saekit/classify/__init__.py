"""Classifiers on learned features: softmax regression, stacked encoders with fine-tuning, and
the protocols a run ends with (UFLDL's stacked autoencoder and self-taught learning, seed 003's
classifier)."""

from .config import ClassifyConfig
from .protocols import Classification, classify
from .softmax import FeatureClassifier, SoftmaxRegression, Solver, evaluate_classifier
from .stacked import Layers, pretrain_stack, run_stacked, self_taught, self_taught_split, ufldl_layers

__all__ = [
    "Classification",
    "ClassifyConfig",
    "FeatureClassifier",
    "Layers",
    "SoftmaxRegression",
    "Solver",
    "classify",
    "evaluate_classifier",
    "pretrain_stack",
    "run_stacked",
    "self_taught",
    "self_taught_split",
    "ufldl_layers",
]
