"""Run configuration: one dataclass whose field docstrings are the command line's --help, and presets.

A preset is data: a name and the fields it changes from the defaults. The defaults themselves
are UFLDL's sparse autoencoder exercise (8x8 natural-image patches, 25 hidden units).
"""

import ast
import dataclasses
import types
import functools
import inspect
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError


@dataclass
class TrainConfig:
    # --- data
    data: str = "natural-patches"
    """Training data: 'natural-patches' (whitened photographs bundled with scikit-image, or IMAGES.mat with --images-mat), 'mnist', 'fashion-mnist', 'synthetic' (a known random dictionary, see --synthetic-atoms), or the path of vectors to stream: a .npy file, a .safetensors file or a folder of such shards."""
    data_key: str | None = None
    """Name of the tensor to read in .safetensors files (default: the only 2-D tensor)."""
    images_mat: str | None = None
    """Path to UFLDL's IMAGES.mat (512x512x10 whitened images); patches are then sampled from it."""
    data_dir: str | None = None
    """Folder holding the MNIST / Fashion-MNIST IDX files (default: $SAEKIT_DATA_DIR, else a download cache)."""
    n_examples: int = 10000
    """Number of training examples: patches sampled from the images, or the first MNIST training images."""
    digits: str | None = None
    """Keep only these classes of MNIST / Fashion-MNIST, e.g. '5-9' or '0,2,4' (before taking --n-examples)."""
    synthetic_inputs: int = 64
    """Synthetic data: width of the vectors."""
    synthetic_atoms: int = 256
    """Synthetic data: atoms in the true dictionary."""
    synthetic_k: int = 8
    """Synthetic data: atoms active in each example."""
    patch_size: int = 8
    """Side of the square image patches, in pixels."""
    corruption: str = "none"
    """Denoising autoencoder: corrupt the input, reconstruct the clean target: 'none', 'mask' (zero a fraction of inputs) or 'gaussian' (add noise)."""
    corruption_level: float = 0.3
    """Fraction of inputs zeroed ('mask'), or the noise's standard deviation ('gaussian')."""
    # --- model
    n_hidden: int = 25
    """Number of hidden units (the size of the sparse code)."""
    activation: str = "sigmoid"
    """Hidden activation: 'sigmoid' (UFLDL), 'relu', 'topk', 'batchtopk' or 'jumprelu'."""
    k: int = 32
    """topk / batchtopk: codes kept per example (on average over the batch for batchtopk)."""
    pre_bias: bool = False
    """Subtract the decoder bias b2 from the input before encoding (modern dictionaries)."""
    decoder_bias_init: str = "zeros"
    """Initial decoder bias b2: 'zeros', 'mean' or 'geometric-median' of the training data."""
    tied_init: bool = False
    """Start the decoder as the encoder's transpose, with unit-norm columns."""
    normalize_decoder: bool = False
    """Keep the decoder's columns at unit norm (the gradient's component along each column is removed)."""
    jumprelu_threshold: float = 0.001
    """jumprelu: initial threshold of every unit."""
    jumprelu_bandwidth: float = 0.001
    """jumprelu: width of the straight-through estimator's window."""
    output: str = "sigmoid"
    """Output activation: 'sigmoid' (UFLDL; inputs must lie in [0, 1]) or 'linear'."""
    # --- cost
    weight_decay: float = 1e-4
    """lambda: weight decay (lambda/2)(||W1||^2 + ||W2||^2); biases carry none."""
    rho: float = 0.01
    """Sparsity target: the mean activation each hidden unit should have, in (0, 1)."""
    beta: float = 3.0
    """Weight of the sparsity penalty (see --penalty); 0 turns it off."""
    penalty: str = "kl"
    """Penalty on the codes: 'kl' (beta * sum_j KL(rho || rho_hat_j)), 'l1' (beta * mean_i ||h_i||_1), 'l1-decoder' (beta * mean_i sum_j |h_ij| ||W2[:, j]||), 'l0' (jumprelu: beta * mean_i #active), 'contractive' (beta * mean_i ||dh_i/dx_i||_F^2) or 'none'."""
    aux_k: int = 0
    """topk / batchtopk: AuxK loss, reconstructing the residual from this many dead units (0: off)."""
    aux_coefficient: float = 0.03125
    """Weight of the AuxK loss."""
    dead_after: int = 10_000_000
    """A unit is dead when it has not fired in this many training examples."""
    # --- optimisation
    optimizer: str = "lbfgs"
    """'lbfgs' (full batch, as UFLDL's minFunc), 'adam' or 'sgd' (minibatches)."""
    max_iter: int = 400
    """L-BFGS iterations."""
    lbfgs_memory: int = 100
    """L-BFGS history length (minFunc's default is 100)."""
    epochs: int = 20
    """Passes over the data for minibatch training (adam, sgd)."""
    batch_size: int = 256
    """Examples per minibatch (adam, sgd)."""
    lr: float = 1e-3
    """Learning rate (adam, sgd)."""
    rho_momentum: float = 0.9
    """Minibatch training: weight of the old value in the running estimate of rho_hat."""
    steps: int = 0
    """Minibatch steps to train (0: --epochs passes over the data)."""
    shuffle_buffer: int = 65536
    """Minibatch training: rows held in memory for shuffling a streamed data set."""
    scale_inputs: bool = False
    """Scale inputs to unit mean squared norm while training; the scale is folded into the saved weights."""
    autocast: str = "none"
    """Mixed precision: 'none', 'bf16' or 'fp16' (torch.autocast on the --device)."""
    log_every: int = 50
    """Minibatch training: steps between rows of history.csv."""
    checkpoint_every: int = 500
    """Minibatch training: steps between checkpoints (one is also written at the end and on Ctrl-C)."""
    tensorboard: bool = False
    """Also log the history to TensorBoard, in RUN/tensorboard (pip install 'saekit[tensorboard]')."""
    # --- classification (MNIST / Fashion-MNIST)
    stack: str | None = None
    """Stacked autoencoder: hidden sizes of further autoencoders, each trained on the previous one's codes, e.g. '200'."""
    classify: str = "none"
    """After training: 'softmax' (a softmax on the codes, trained on the training images, tested on the test set), 'fine-tune' (then back-propagate through the encoders too), 'self-taught' (UFLDL: softmax on the first half of the training digits 0-4, tested on the second half, against raw pixels) or 'none'."""
    softmax_weight_decay: float = 1e-4
    """Weight decay of the softmax classifier."""
    softmax_max_iter: int = 100
    """L-BFGS iterations for the softmax classifier."""
    finetune_weight_decay: float = 1e-4
    """Weight decay while fine-tuning, on the softmax and (with finetune_decay_encoders) the encoders' weights."""
    finetune_decay_encoders: bool = True
    """Fine-tuning decays the encoders' weights too; false decays the softmax's only, as UFLDL's stackedAECost does (it overfits more with 1e-4)."""
    finetune_max_iter: int = 400
    """L-BFGS iterations of fine-tuning."""
    # --- run
    dtype: str = "float64"
    """Floating-point type of the model and the data: 'float64' or 'float32'."""
    device: str = "cpu"
    """Torch device: 'cpu' or 'cuda'."""
    seed: int = 0
    """Random seed: fixes the data sample, the initial weights and the minibatch order."""

    def __post_init__(self):
        problems = self._type_problems()
        if problems:  # comparisons below assume the types are right
            raise UserError("invalid configuration: " + "; ".join(problems) + ".")
        positive_ints = ("n_examples", "patch_size", "n_hidden", "max_iter", "lbfgs_memory", "epochs", "batch_size",
                         "k", "synthetic_inputs", "synthetic_atoms", "synthetic_k", "shuffle_buffer", "log_every",
                         "checkpoint_every", "dead_after", "softmax_max_iter", "finetune_max_iter")
        for name in ("steps", "aux_k"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                problems.append(f"--{dashed(name)} must be a whole number >= 0 (got {getattr(self, name)!r})")
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                problems.append(f"--{dashed(name)} must be a whole number >= 1 (got {value!r})")
        if not 0 < self.rho < 1:
            problems.append(f"--rho must lie strictly between 0 and 1 (got {self.rho})")
        for name in ("beta", "weight_decay", "aux_coefficient", "softmax_weight_decay", "finetune_weight_decay"):
            if not getattr(self, name) >= 0:  # also catches NaN
                problems.append(f"--{dashed(name)} must be >= 0 (got {getattr(self, name)})")
        for name in ("jumprelu_threshold", "jumprelu_bandwidth"):
            if not getattr(self, name) > 0:
                problems.append(f"--{dashed(name)} must be > 0 (got {getattr(self, name)})")
        if not self.lr > 0:
            problems.append(f"--lr must be > 0 (got {self.lr})")
        if not self.corruption_level >= 0 or (self.corruption == "mask" and not self.corruption_level < 1):
            problems.append(f"--corruption-level must be >= 0, and below 1 for 'mask' (got {self.corruption_level})")
        if not 0 <= self.rho_momentum < 1:
            problems.append(f"--rho-momentum must lie in [0, 1) (got {self.rho_momentum})")
        choices = {
            "corruption": ("none", "mask", "gaussian"),
            "activation": ("sigmoid", "relu", "topk", "batchtopk", "jumprelu"),
            "decoder_bias_init": ("zeros", "mean", "geometric-median"),
            "autocast": ("none", "bf16", "fp16"),
            "classify": ("none", "softmax", "fine-tune", "self-taught"),
            "output": ("sigmoid", "linear"),
            "penalty": ("kl", "l1", "l1-decoder", "l0", "contractive", "none"),
            "optimizer": ("lbfgs", "adam", "sgd"),
            "dtype": ("float64", "float32"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                problems.append(f"--{dashed(name)} must be one of {', '.join(allowed)} (got {getattr(self, name)!r})")
        if self.penalty == "kl" and self.activation != "sigmoid":
            problems.append("--penalty kl needs --activation sigmoid (rho_hat must be a mean firing rate in (0, 1)); use --penalty l1 with relu")
        if self.penalty == "l0" and self.activation != "jumprelu":
            problems.append("--penalty l0 needs --activation jumprelu (its threshold makes the count differentiable)")
        if self.penalty in ("contractive",) and self.activation not in ("sigmoid", "relu"):
            problems.append("--penalty contractive needs --activation sigmoid or relu")
        if self.activation in ("topk", "batchtopk", "jumprelu") and self.optimizer == "lbfgs":
            problems.append(f"--activation {self.activation} trains with minibatches: use --optimizer adam")
        if self.classify != "none" and self.data not in ("mnist", "fashion-mnist"):
            problems.append("--classify needs labelled data: --data mnist or fashion-mnist")
        try:
            stack_sizes(self.stack)
        except UserError as e:
            problems.append(str(e))
        if self.scale_inputs and self.output != "linear":
            problems.append("--scale-inputs needs --output linear (a sigmoid output cannot be rescaled)")
        if self.aux_k and self.activation not in ("topk", "batchtopk"):
            problems.append("--aux-k needs --activation topk or batchtopk")
        try:
            parse_digits(self.digits)
        except UserError as e:
            problems.append(str(e))
        problems += _device_problems(self.device)
        if problems:
            raise UserError("invalid configuration: " + "; ".join(problems) + ".")

    def _type_problems(self) -> list[str]:
        """Each setting must have its field's type (an int is accepted for a float, None for an optional)."""
        problems = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            allowed = f.type.__args__ if isinstance(f.type, types.UnionType) else (f.type,)
            if not any(_has_type(value, t) for t in allowed):
                names = " or ".join("None" if t is type(None) else t.__name__ for t in allowed)
                problems.append(f"--{dashed(f.name)} must be {names} (got {value!r})")
        return problems

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _has_type(value, t) -> bool:
    if isinstance(value, bool):  # bool is an int in Python, but not a number of examples
        return t is bool
    if t is float:
        return isinstance(value, (int, float))
    return isinstance(value, t)


def _device_problems(device: str) -> list[str]:
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        return [f"--device {device!r} is not a torch device; use 'cpu' or 'cuda' (or 'cuda:N')"]
    if kind == "cuda" and not torch.cuda.is_available():
        return ["--device cuda was asked for, but PyTorch sees no CUDA GPU here; use --device cpu"]
    return []


def stack_sizes(spec: str | None) -> list[int]:
    """'200' -> [200]; '200,100' -> [200, 100]; None -> []."""
    if spec is None:
        return []
    try:
        sizes = [int(part) for part in spec.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise UserError(f"--stack {spec!r} is not a list of hidden sizes such as '200' or '200,100'")
    return sizes


def parse_digits(spec: str | None) -> list[int] | None:
    """'5-9' -> [5, 6, 7, 8, 9]; '0,2,4' -> [0, 2, 4]; None -> None (all classes)."""
    if spec is None:
        return None
    try:
        digits = set()
        for part in spec.split(","):
            low, _, high = part.strip().partition("-")
            digits.update(range(int(low), int(high or low) + 1))
    except ValueError:
        digits = set()
    if not digits or not digits <= set(range(10)):
        raise UserError(f"--digits {spec!r} is not a list of classes 0-9 such as '5-9' or '0,2,4'")
    return sorted(digits)


def dashed(name: str) -> str:
    return name.replace("_", "-")


@functools.cache
def field_docs(cls=TrainConfig) -> dict[str, str]:
    """The docstring under each dataclass field, read from the source (they become --help)."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant):
            docs[node.target.id] = inspect.cleandoc(following.value.value)
    return docs


# Modern dictionaries: linear output, decoder bias subtracted before encoding and initialised at the
# geometric median, tied unit-norm decoder, inputs scaled to unit mean squared norm, Adam.
# By default they train on synthetic data with a known dictionary; give --data PATH for yours.
_MODERN = {
    "data": "synthetic", "n_examples": 100_000, "synthetic_inputs": 64, "synthetic_atoms": 256, "synthetic_k": 8,
    "output": "linear", "penalty": "none", "weight_decay": 0.0, "optimizer": "adam", "lr": 1e-3,
    "batch_size": 4096, "epochs": 10, "dtype": "float32", "n_hidden": 512, "k": 8, "pre_bias": True,
    "tied_init": True, "normalize_decoder": True, "decoder_bias_init": "geometric-median", "scale_inputs": True,
    "log_every": 10, "dead_after": 1_000_000,
}
CLASSIFIER_FIELDS = ("softmax_weight_decay", "softmax_max_iter", "finetune_weight_decay", "finetune_decay_encoders",
                     "finetune_max_iter")  # the settings of a run's classifier (`saekit classify` takes these)

_MNIST = {"data": "mnist", "n_examples": 10000, "n_hidden": 196, "rho": 0.1, "weight_decay": 3e-3, "beta": 3.0}

PRESETS: dict[str, dict] = {
    "ufldl-patches": {},  # the defaults: UFLDL's sparse autoencoder exercise
    # Batches of 100 and lr 3e-3: larger batches and lr 1e-2 stayed on the mean-image plateau for all 200 epochs.
    "ufldl-patches-adam": {"optimizer": "adam", "epochs": 200, "batch_size": 100, "lr": 3e-3},
    "ufldl-mnist": _MNIST,
    "undercomplete-mnist": {**_MNIST, "n_hidden": 64, "penalty": "none"},
    "denoising-mnist": {**_MNIST, "corruption": "mask", "corruption_level": 0.3},
    "contractive-mnist": {**_MNIST, "penalty": "contractive", "beta": 0.1},
    "lecture-l1": {"data": "mnist", "n_examples": 60000, "n_hidden": 400, "penalty": "l1", "beta": 0.1,
                   "weight_decay": 0.0, "optimizer": "sgd", "lr": 0.1, "epochs": 20, "batch_size": 1000,
                   "dtype": "float32", "log_every": 60, "classify": "fine-tune"},
    "ufldl-self-taught": {**_MNIST, "digits": "5-9", "n_examples": 29404, "n_hidden": 200, "classify": "self-taught"},
    "ufldl-stacked": {**_MNIST, "n_examples": 60000, "n_hidden": 200, "stack": "200", "classify": "fine-tune"},
    "topk": {**_MODERN, "activation": "topk", "aux_k": 64},
    "batchtopk": {**_MODERN, "activation": "batchtopk", "aux_k": 64},
    "jumprelu": {**_MODERN, "activation": "jumprelu", "penalty": "l0", "beta": 0.01, "tied_init": True},
    "relu-l1": {**_MODERN, "activation": "relu", "penalty": "l1-decoder", "beta": 0.05},
}
PRESET_HELP = {
    "ufldl-patches": "UFLDL's exercise: 10,000 8x8 whitened natural-image patches, 64-25-64, lambda 1e-4, beta 3, rho 0.01, 400 L-BFGS iterations.",
    "ufldl-patches-adam": "The same problem trained with minibatch Adam (batches of 100, lr 3e-3, 200 epochs) and a running estimate of rho_hat.",
    "ufldl-mnist": "UFLDL's vectorization exercise: the first 10,000 MNIST training digits, 784-196-784, rho 0.1, lambda 3e-3, beta 3, 400 L-BFGS iterations.",
    "undercomplete-mnist": "An under-complete autoencoder (seed 001): 784-64-784, no sparsity term, L-BFGS.",
    "denoising-mnist": "A denoising autoencoder (seed 001): 30% of the pixels zeroed, the clean digit as the target.",
    "contractive-mnist": "A contractive autoencoder (seed 001): penalty 0.1 * ||dh/dx||_F^2 in closed form, no KL term.",
    "lecture-l1": "Seed 003's exercise: 784-400-784 with an L1 penalty on the hidden activations, minibatch SGD (batch 1000, 20 epochs) on all 60,000 digits; then a softmax on the codes, fine-tuned with the encoder.",
    "ufldl-self-taught": "UFLDL's self-taught learning: features from the 29,404 training digits 5-9 (784-200), a softmax on the digits 0-4, against a softmax on raw pixels.",
    "ufldl-stacked": "UFLDL's stacked autoencoder 784-200-200-10: two sparse autoencoders trained greedily on all 60,000 digits, a softmax, then fine-tuning; tested on the 10,000 test digits.",
    "topk": "A TopK dictionary (k per example), AuxK for dead units; synthetic data unless --data PATH.",
    "batchtopk": "A BatchTopK dictionary (k per example on average over the batch), AuxK; synthetic data unless --data PATH.",
    "jumprelu": "A JumpReLU dictionary: learned thresholds, L0 penalty through a straight-through estimator.",
    "relu-l1": "A ReLU dictionary with an L1 penalty weighted by decoder column norms.",
}


def build_config(preset: str = "ufldl-patches", config_file: str | None = None, overrides: dict | None = None) -> TrainConfig:
    """Defaults, then the preset, then a JSON config file, then command-line overrides."""
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; `saekit presets` lists them: {', '.join(PRESETS)}.")
    values = dict(PRESETS[preset])
    if config_file is not None:
        values.update(read_config_file(config_file))
    values.update(overrides or {})
    return TrainConfig(**values)


def read_config_file(path: str) -> dict:
    """A JSON object of TrainConfig fields (a run folder's config.json works too)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {p} does not exist; give the path of a JSON file of settings.")
    try:
        values = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"config file {p} is not valid JSON ({e}); fix or regenerate it.") from None
    if not isinstance(values, dict):
        raise UserError(f"config file {p} must hold a JSON object of settings.")
    values = values.get("config", values)  # a run folder's config.json nests the settings
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"config file {p} has unknown settings {unknown}; known settings are {sorted(known)}.")
    return values
