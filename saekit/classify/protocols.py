"""The classification protocols a run can end with, on the codes of its trained encoders.

    softmax      a softmax on the top codes, trained on the run's training images, tested on the test set
    fine-tune    the same, then back-propagation through the encoders too (UFLDL's stacked autoencoder)
    self-taught  UFLDL's self-taught learning: a softmax on the first half of the training digits
                 0-4, tested on the second half, against a softmax on the raw pixels

Each returns a `Classification`; the run folder (saekit.run) writes it.
"""

from typing import NamedTuple

import torch

from ..data import DataConfig, load_test_data, parse_digits
from ..data.idx import CLASS_NAMES, load_digits
from .config import ClassifyConfig
from .softmax import FeatureClassifier, SoftmaxRegression, Solver, evaluate_classifier
from .stacked import self_taught_split


class Confusion(NamedTuple):
    name: str  # the picture's file stem
    result: dict  # evaluate_classifier's result
    title: str


class Classification(NamedTuple):
    result: dict  # accuracies, protocol, per-class results and settings, as JSON
    model: FeatureClassifier  # the trained classifier
    class_names: list[str]
    confusions: list[Confusion]  # the confusion matrices to draw


def _summary(result: dict) -> dict:
    """evaluate_classifier's result as JSON: the confusion matrix as lists."""
    return {**result, "confusion_matrix": result["confusion_matrix"].tolist()}


def classify(
    layers: list, cfg: ClassifyConfig, data: DataConfig, x: torch.Tensor, labels: torch.Tensor, progress: bool = True
) -> Classification:
    """Train and test a classifier on the codes of `layers` (trained on x, labels) as cfg.classify says."""
    protocol = self_taught if cfg.classify == "self-taught" else softmax_then_fine_tune
    result, model, names, confusions = protocol(layers, cfg, data, x, labels, progress)
    result["settings"] = cfg.classifier_settings()
    return Classification(result, model, names, confusions)


def self_taught(layers, cfg: ClassifyConfig, data: DataConfig, x, labels, progress: bool):
    softmax = Solver(max_iter=cfg.softmax_max_iter)
    images, all_labels = load_digits(data.data, "train", data.data_dir)
    _, x_train, y_train, x_test, y_test = self_taught_split(images, all_labels)
    n_classes = int(y_train.max()) + 1
    names = CLASS_NAMES[data.data][:n_classes]
    model = FeatureClassifier(layers, n_classes, cfg.softmax_weight_decay)
    model.fit_softmax(x_train, y_train, softmax, progress)
    raw = SoftmaxRegression(layers[0].n_inputs, n_classes, cfg.softmax_weight_decay, layers[0].W1.dtype)
    raw.fit(x_train, y_train, softmax, progress)
    features = evaluate_classifier(model, x_test, y_test, names)
    pixels = evaluate_classifier(raw, x_test, y_test, names)
    result = {
        "protocol": "UFLDL self-taught learning: train on the first half of training digits 0-4, "
        "test on the second half",
        "accuracy": features["accuracy"],
        "accuracy_raw_pixels": pixels["accuracy"],
        "features": _summary(features),
        "raw_pixels": _summary(pixels),
    }
    confusion = Confusion("confusion", features, "Self-taught learning: softmax on the learned features")
    return result, model, names, [confusion]


def softmax_then_fine_tune(layers, cfg: ClassifyConfig, data: DataConfig, x, labels, progress: bool):
    test = load_test_data(data, layers[0].W1.dtype, layers[0].W1.device)
    digits = parse_digits(data.digits)
    n_classes = 10 if digits is None else max(digits) + 1
    names = CLASS_NAMES[data.data][:n_classes]
    model = FeatureClassifier(layers, n_classes, cfg.softmax_weight_decay)
    model.fit_softmax(x, labels, Solver(max_iter=cfg.softmax_max_iter), progress)
    before = evaluate_classifier(model, *test.labelled(), names)
    result = {
        "protocol": f"softmax on the codes, trained on {x.shape[0]} training images, tested on "
        f"{test.source.n} test images",
        "softmax": _summary(before),
        "accuracy": before["accuracy"],
    }
    confusions = [Confusion("confusion", before, "Softmax on the learned features")]
    if cfg.classify == "fine-tune":
        model.fine_tune(
            x,
            labels,
            Solver(max_iter=cfg.finetune_max_iter),
            cfg.finetune_weight_decay,
            progress,
            decay_encoders=cfg.finetune_decay_encoders,
        )
        after = evaluate_classifier(model, *test.labelled(), names)
        result.update(
            {
                "fine_tuned": _summary(after),
                "accuracy_before_fine_tuning": before["accuracy"],
                "accuracy": after["accuracy"],
            }
        )
        confusions.append(Confusion("confusion_fine_tuned", after, "After fine-tuning the encoders"))
    return result, model, names, confusions


__all__ = ["Classification", "Confusion", "classify"]
