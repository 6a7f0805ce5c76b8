"""Presets: named settings to start a run from, as data. Each is a one-line description and the
flat settings it changes from the defaults (which are UFLDL's exercise on 8x8 natural-image
patches). `saekit presets` prints them; any setting can be overridden on the command line."""

from typing import NamedTuple


class Preset(NamedTuple):
    help: str
    settings: dict


_MNIST = {"data": "mnist", "n_examples": 10000, "n_hidden": 196, "rho": 0.1, "weight_decay": 3e-3, "beta": 3.0}
# Modern dictionaries: linear output, decoder bias subtracted before encoding and initialised at the
# geometric median, tied unit-norm decoder, inputs scaled to unit mean squared norm, Adam (at the
# kind's learning rate: for the TopK family, scaled with the width; 1e-3 for the others).
# By default they train on synthetic data with a known dictionary; give --data PATH for yours.
_MODERN = {
    "data": "synthetic",
    "n_examples": 100_000,
    "synthetic_inputs": 64,
    "synthetic_atoms": 256,
    "synthetic_k": 8,
    "output": "linear",
    "weight_decay": 0.0,
    "optimizer": "adam",
    "batch_size": 4096,
    "epochs": 10,
    "dtype": "float32",
    "n_hidden": 512,
    "pre_bias": True,
    "tied_init": True,
    "normalize_decoder": True,
    "decoder_bias_init": "geometric-median",
    "scale_inputs": True,
    "log_every": 10,
}

# The TopK family's recipe, chosen on MiniLM activations (README, "The default recipe"): AuxK over 512
# units at weight 1/64; Adam with beta1 0.8; the learning rate held, then falling linearly to 0 over the
# last fifth of the steps, or over all but the first 160 in longer runs (held longer, more units die);
# the learning rate and when a unit counts as dead follow from the width and k (TopKConfig).
_TOPK_RECIPE = {
    "aux_k": 512,
    "aux_coefficient": 1 / 64,
    "adam_beta1": 0.8,
    "lr_decay": "linear",
    "lr_decay_fraction": 0.2,
    "lr_hold_steps": 160,
}

PRESETS: dict[str, Preset] = {
    "ufldl-patches": Preset(
        "UFLDL's exercise: 10,000 8x8 whitened natural-image patches, 64-25-64, lambda 1e-4, beta 3, rho 0.01, "
        "400 L-BFGS iterations.",
        {},
    ),
    # Batches of 100 and lr 3e-3: larger batches and lr 1e-2 stayed on the mean-image plateau for all 200 epochs.
    "ufldl-patches-adam": Preset(
        "The same problem trained with minibatch Adam (batches of 100, lr 3e-3, 200 epochs) and a running "
        "estimate of rho_hat.",
        {"optimizer": "adam", "epochs": 200, "batch_size": 100, "lr": 3e-3},
    ),
    "ufldl-mnist": Preset(
        "UFLDL's vectorization exercise: the first 10,000 MNIST training digits, 784-196-784, rho 0.1, "
        "lambda 3e-3, beta 3, 400 L-BFGS iterations.",
        _MNIST,
    ),
    "undercomplete-mnist": Preset(
        "An under-complete autoencoder (seed 001): 784-64-784, no sparsity term, L-BFGS.",
        {**_MNIST, "n_hidden": 64, "penalty": "none"},
    ),
    "denoising-mnist": Preset(
        "A denoising autoencoder (seed 001): 30% of the pixels zeroed, the clean digit as the target.",
        {**_MNIST, "corruption": "mask", "corruption_level": 0.3},
    ),
    "contractive-mnist": Preset(
        "A contractive autoencoder (seed 001): penalty 0.1 * ||dh/dx||_F^2 in closed form, no KL term.",
        {**_MNIST, "penalty": "contractive", "beta": 0.1},
    ),
    "lecture-l1": Preset(
        "Seed 003's exercise: 784-400-784 with an L1 penalty on the hidden activations, minibatch SGD (batch "
        "1000, 20 epochs) on all 60,000 digits; then a softmax on the codes, fine-tuned with the encoder.",
        {
            "data": "mnist",
            "n_examples": 60000,
            "n_hidden": 400,
            "penalty": "l1",
            "beta": 0.1,
            "weight_decay": 0.0,
            "optimizer": "sgd",
            "lr": 0.1,
            "epochs": 20,
            "batch_size": 1000,
            "dtype": "float32",
            "log_every": 60,
            "classify": "fine-tune",
        },
    ),
    "ufldl-self-taught": Preset(
        "UFLDL's self-taught learning: features from the 29,404 training digits 5-9 (784-200), a softmax on the "
        "digits 0-4, against a softmax on raw pixels.",
        {**_MNIST, "digits": "5-9", "n_examples": 29404, "n_hidden": 200, "classify": "self-taught"},
    ),
    "ufldl-stacked": Preset(
        "UFLDL's stacked autoencoder 784-200-200-10: two sparse autoencoders trained greedily on all 60,000 "
        "digits, a softmax, then fine-tuning; tested on the 10,000 test digits.",
        {**_MNIST, "n_examples": 60000, "n_hidden": 200, "stack": "200", "classify": "fine-tune"},
    ),
    "topk": Preset(
        "A TopK dictionary (k per example), AuxK for dead units; synthetic data unless --data PATH.",
        {**_MODERN, **_TOPK_RECIPE, "kind": "topk", "k": 8},
    ),
    "batchtopk": Preset(
        "A BatchTopK dictionary (k per example on average over the batch), AuxK; synthetic data unless --data PATH.",
        {**_MODERN, **_TOPK_RECIPE, "kind": "batchtopk", "k": 8},
    ),
    "matryoshka": Preset(
        "A Matryoshka BatchTopK dictionary: nested prefixes of 32, 128 and 512 units each learn to reconstruct, so "
        "general features are not absorbed into specific ones; AuxK; synthetic data unless --data PATH.",
        {**_MODERN, **_TOPK_RECIPE, "kind": "matryoshka", "k": 8, "matryoshka_prefixes": "32,128"},
    ),
    "jumprelu": Preset(
        "A JumpReLU dictionary: learned thresholds, L0 penalty through a straight-through estimator.",
        {**_MODERN, "kind": "jumprelu", "penalty": "l0", "beta": 0.01, "dead_after": 1_000_000},
    ),
    "relu-l1": Preset(
        "A ReLU dictionary with an L1 penalty weighted by decoder column norms.",
        {**_MODERN, "kind": "relu", "penalty": "l1-decoder", "beta": 0.05, "dead_after": 1_000_000},
    ),
}
