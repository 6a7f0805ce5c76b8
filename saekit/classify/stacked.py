"""Stacked sparse autoencoders and UFLDL's two experiments with learned features.

Greedy layer-wise pre-training (seed 001): train a sparse autoencoder on the inputs, then the
next one on the first one's hidden activations, and so on. Each decoder serves only to train
its layer; `saekit.classify.FeatureClassifier` drops them, puts a softmax on the last layer
and fine-tunes the whole network.

The pipelines at the bottom are UFLDL's exercises, with its settings as defaults:
- `run_stacked`: the 784-200-200-10 stacked autoencoder on MNIST (UFLDL reports 87.7% test
  accuracy before fine-tuning, 97.6% after);
- `self_taught`: features learned on digits 5-9, a softmax on them for digits 0-4 (UFLDL:
  about 98% against about 96% for a softmax on the raw pixels).
"""

import dataclasses
import time
from typing import NamedTuple

import numpy as np
import torch

from ..errors import UserError
from ..kinds import ModelConfig, build
from ..kinds.sigmoid import SigmoidConfig
from ..train import OptimConfig, fit
from .softmax import FeatureClassifier, SoftmaxRegression, Solver, evaluate_classifier, to_rows


class Layers(NamedTuple):
    """How each autoencoder of a stack is trained: its kind's settings (n_hidden aside), the
    optimisation, and the seed of the first layer (layer i takes seed + i)."""

    model: ModelConfig
    optim: OptimConfig
    seed: int = 0


def ufldl_layers(max_iter: int = 400) -> Layers:
    """UFLDL's settings for each autoencoder of both exercises: rho 0.1, lambda 3e-3, beta 3, L-BFGS."""
    return Layers(SigmoidConfig(rho=0.1, weight_decay=3e-3, beta=3.0), OptimConfig(max_iter=max_iter))


def pretrain_stack(
    x,
    layer_sizes=(200, 200),
    layers: Layers | None = None,
    *,
    dtype: torch.dtype = torch.float64,
    device="cpu",
    progress: bool = True,
):
    """Train one sparse autoencoder per entry of layer_sizes, each on the previous one's features.

    x: (m, n_inputs), taken in dtype on device. `layers` says how every layer is trained (its
    n_hidden comes from layer_sizes); it defaults to `ufldl_layers()`. Returns the trained
    autoencoders, input side first.
    """
    model_cfg, optim, seed = layers or ufldl_layers()
    if len(layer_sizes) == 0:
        raise UserError("layer_sizes is empty; give the number of hidden units of each layer, e.g. [200, 200].")
    h = to_rows(x, dtype, device)
    trained = []
    for i, n_hidden in enumerate(layer_sizes):
        if model_cfg.output == "sigmoid" and (h.min() < 0 or h.max() > 1):
            raise UserError(
                f"layer {i} gets inputs outside [0, 1], which sigmoid outputs cannot reconstruct; "
                "rescale x to [0, 1] or use output 'linear'."
            )
        sae = build(
            dataclasses.replace(model_cfg, n_hidden=n_hidden), h.shape[1], dtype=h.dtype, device=h.device, seed=seed + i
        )
        if fit(sae, h, optim, seed=seed, progress=progress).interrupted:
            raise KeyboardInterrupt
        trained.append(sae)
        with torch.no_grad():
            h = sae.features(h)
    return trained


def _n_classes(*labels) -> int:
    return int(max(np.max(y) for y in labels)) + 1


# ----------------------------------------------------------------------------------------
# UFLDL's pipelines


def run_stacked(
    x_train,
    y_train,
    x_test,
    y_test,
    layer_sizes=(200, 200),
    layers: Layers | None = None,
    n_pretrain: int | None = None,
    softmax_lambda: float = 1e-4,
    softmax_solver: Solver = Solver(max_iter=100),
    fine_tune_lambda: float = 1e-4,
    fine_tune_solver: Solver = Solver(max_iter=400),
    class_names=None,
    progress: bool = True,
    *,
    decay_encoders: bool = True,
) -> dict:
    """UFLDL's stacked autoencoder: pre-train, train a softmax on the top features, fine-tune.

    Pre-training uses the first n_pretrain training examples (all by default); the softmax and
    fine-tuning use them all. Fine-tuning decays theta and the encoders' W1 (theta only, as
    UFLDL does, with decay_encoders=False; see `FeatureClassifier.fine_tune`). Returns
    accuracy_before and accuracy_after (test accuracy before and after fine-tuning), the full
    results of `evaluate_classifier` as before and after, seconds and training history per
    stage, and the trained layers and classifier.
    """
    started = time.perf_counter()
    trained = pretrain_stack(x_train[:n_pretrain], layer_sizes, layers, progress=progress)
    seconds = {"pretrain": time.perf_counter() - started}

    classifier = FeatureClassifier(trained, _n_classes(y_train, y_test), softmax_lambda)
    started = time.perf_counter()
    history = {"softmax": classifier.fit_softmax(x_train, y_train, softmax_solver, progress)}
    seconds["softmax"] = time.perf_counter() - started
    before = evaluate_classifier(classifier, x_test, y_test, class_names)

    started = time.perf_counter()
    history["fine_tune"] = classifier.fine_tune(
        x_train, y_train, fine_tune_solver, fine_tune_lambda, progress, decay_encoders=decay_encoders
    )
    seconds["fine_tune"] = time.perf_counter() - started
    after = evaluate_classifier(classifier, x_test, y_test, class_names)
    return {
        "accuracy_before": before["accuracy"],
        "accuracy_after": after["accuracy"],
        "before": before,
        "after": after,
        "seconds": seconds,
        "history": history,
        "layers": trained,
        "classifier": classifier,
    }


def self_taught_split(images, labels):
    """UFLDL's split of one labelled set (its MNIST training set): digits 5-9 unlabelled, digits
    0-4 halved in order into training and test examples.

    Returns (x_unlabeled, x_train, y_train, x_test, y_test); the y are 0..4.
    """
    labels = np.asarray(labels)
    labeled = np.flatnonzero(labels <= 4)
    half = (len(labeled) + 1) // 2  # MATLAB's round(numel(labeledSet)/2): halves round up
    train, test = labeled[:half], labeled[half:]
    return images[labels >= 5], images[train], labels[train], images[test], labels[test]


def self_taught(
    x_unlabeled,
    x_train,
    y_train,
    x_test,
    y_test,
    n_hidden: int = 200,
    layers: Layers | None = None,
    softmax_lambda: float = 1e-4,
    solver: Solver = Solver(max_iter=100),
    class_names=None,
    progress: bool = True,
) -> dict:
    """UFLDL's self-taught learning: an autoencoder learns features from unlabelled x, a softmax
    classifies the labelled examples by those features, and another softmax by the raw inputs.

    Returns accuracy (on the features) and accuracy_raw (on the raw inputs), the full results of
    `evaluate_classifier` as features and raw, seconds and training history per stage, and the
    autoencoder and both classifiers.
    """
    started = time.perf_counter()
    (sae,) = pretrain_stack(x_unlabeled, [n_hidden], layers, progress=progress)
    seconds = {"pretrain": time.perf_counter() - started}
    n_classes = _n_classes(y_train, y_test)

    classifier = FeatureClassifier([sae], n_classes, softmax_lambda)
    started = time.perf_counter()
    history = {"softmax": classifier.fit_softmax(x_train, y_train, solver, progress)}
    seconds["softmax"] = time.perf_counter() - started
    features = evaluate_classifier(classifier, x_test, y_test, class_names)

    raw_classifier = SoftmaxRegression(classifier.n_inputs, n_classes, softmax_lambda, sae.W1.dtype, sae.W1.device)
    started = time.perf_counter()
    history["softmax_raw"] = raw_classifier.fit(x_train, y_train, solver, progress)
    seconds["softmax_raw"] = time.perf_counter() - started
    raw = evaluate_classifier(raw_classifier, x_test, y_test, class_names)
    return {
        "accuracy": features["accuracy"],
        "accuracy_raw": raw["accuracy"],
        "features": features,
        "raw": raw,
        "seconds": seconds,
        "history": history,
        "autoencoder": sae,
        "classifier": classifier,
        "raw_classifier": raw_classifier,
    }
