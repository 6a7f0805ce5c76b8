"""What a run does after its autoencoder is trained: more stacked layers, then a classifier on the codes.

    stack     UFLDL's greedy layer-wise pre-training: each further autoencoder (same settings,
              its own hidden size) is trained on the codes of the one below.
    classify  'softmax' or 'fine-tune': a softmax on the top codes, trained on the run's training
              images and tested on the test set (fine-tune then back-propagates through the
              encoders too); 'self-taught': UFLDL's self-taught learning protocol.

Results go to RUN/classification.json and confusion-matrix pictures, the trained classifier
to RUN/classifier.safetensors (runs.load_classifier reads it back).
"""

import dataclasses
from pathlib import Path

import torch

from . import runs
from .classifier import FeatureClassifier, SoftmaxRegression, Solver, evaluate_classifier, save_confusion_png
from .config import CLASSIFIER_FIELDS, TrainConfig, parse_digits, stack_sizes
from .data import load_test_data
from .data.idx import CLASS_NAMES, load_digits
from .stacked import pretrain_stack, self_taught_split


def _summary(result: dict) -> dict:
    """evaluate_classifier's result as JSON: the confusion matrix as lists."""
    return {**result, "confusion_matrix": result["confusion_matrix"].tolist()}


def train_stack(run_dir: Path, cfg: TrainConfig, first, x: torch.Tensor, progress: bool) -> list:
    """The run's autoencoder and the further layers of cfg.stack, trained greedily; saved as layerN.safetensors."""
    layers = [first]
    sizes = stack_sizes(cfg.stack)
    if sizes:
        with torch.no_grad():
            codes = first.dense_codes(first.sparsify(first.encode(x)))
        layer_cfg = dataclasses.replace(cfg, corruption="none")
        layers += pretrain_stack(codes, sizes, layer_cfg, progress)
        for i, layer in enumerate(layers[1:], start=2):
            runs.save_model(run_dir, layer, f"layer{i}.safetensors")
    return layers


def classify(run_dir: Path, cfg: TrainConfig, layers: list, x: torch.Tensor, labels: torch.Tensor, progress: bool) -> dict:
    """Train and test a classifier on the codes of `layers` as cfg.classify says; writes its results."""
    softmax = Solver(max_iter=cfg.softmax_max_iter)
    names = CLASS_NAMES[cfg.data]
    if cfg.classify == "self-taught":
        images, all_labels = load_digits(cfg.data, "train", cfg.data_dir)
        _, x_train, y_train, x_test, y_test = self_taught_split(images, all_labels)
        n_classes = int(y_train.max()) + 1
        model = FeatureClassifier(layers, n_classes, cfg.softmax_weight_decay)
        model.fit_softmax(x_train, y_train, softmax, progress)
        raw = SoftmaxRegression(layers[0].n_inputs, n_classes, cfg.softmax_weight_decay, layers[0].W1.dtype)
        raw.fit(x_train, y_train, softmax, progress)
        features = evaluate_classifier(model, x_test, y_test, names[:n_classes])
        pixels = evaluate_classifier(raw, x_test, y_test, names[:n_classes])
        result = {"protocol": "UFLDL self-taught learning: train on the first half of training digits 0-4, test on the second half",
                  "accuracy": features["accuracy"], "accuracy_raw_pixels": pixels["accuracy"],
                  "features": _summary(features), "raw_pixels": _summary(pixels)}
        save_confusion_png(features, run_dir / "confusion.png", "Self-taught learning: softmax on the learned features")
    else:
        test = load_test_data(cfg)
        digits = parse_digits(cfg.digits)
        n_classes = 10 if digits is None else max(digits) + 1
        model = FeatureClassifier(layers, n_classes, cfg.softmax_weight_decay)
        model.fit_softmax(x, labels, softmax, progress)
        before = evaluate_classifier(model, test.x, test.labels, names[:n_classes])
        result = {"protocol": f"softmax on the codes, trained on {x.shape[0]} training images, tested on {test.x.shape[0]} test images",
                  "softmax": _summary(before), "accuracy": before["accuracy"]}
        save_confusion_png(before, run_dir / "confusion.png", "Softmax on the learned features")
        if cfg.classify == "fine-tune":
            model.fine_tune(x, labels, Solver(max_iter=cfg.finetune_max_iter), cfg.finetune_weight_decay, progress,
                            decay_encoders=cfg.finetune_decay_encoders)
            after = evaluate_classifier(model, test.x, test.labels, names[:n_classes])
            result.update({"fine_tuned": _summary(after), "accuracy_before_fine_tuning": before["accuracy"],
                           "accuracy": after["accuracy"]})
            save_confusion_png(after, run_dir / "confusion_fine_tuned.png", "After fine-tuning the encoders")
    runs.save_classifier(run_dir, model, names[:n_classes])
    result["settings"] = {name: getattr(cfg, name) for name in CLASSIFIER_FIELDS}
    runs.write_json(run_dir / "classification.json", result)
    return result
