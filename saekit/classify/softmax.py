"""Classifiers on learned features: softmax regression, alone or on top of a stack of encoders.

UFLDL's softmax regression models p(y = c | x) = exp(theta_c . x + b_c) / sum_k exp(theta_k . x + b_k)
and minimises

    J = -(1/m) sum_i log p(y_i | x_i) + (lambda/2) ||theta||^2

UFLDL's model has no bias b; ours has one, with no weight decay, like every bias in saekit. It
costs one parameter per class and lets the model fit the class priors without bending theta.
Freeze it at zero (`model.b.requires_grad_(False)`) and it is UFLDL's model: training only
ever moves the parameters that require gradients.

`FeatureClassifier` is seed 003's recipe and UFLDL's self-taught learning and stacked
autoencoder: drop the decoders, feed each encoder's hidden activations to the next, and put a
softmax on the last one. It trains the softmax on the frozen features, and can then fine-tune
the whole network by back-propagation. Fine-tuning decays only theta by default, as UFLDL's
stackedAECost does: decaying the encoders' W1 too (`decay_encoders`) at UFLDL's lambda = 3e-3
pulls them far from their pre-trained values, because the NLL (about 0.1-0.4) is small beside
||W1||^2. On MNIST 784-200-200-10 that took test accuracy from 92.1% to 91.4% instead of up.

Both are trained full-batch with L-BFGS (`saekit.train.train_lbfgs`, UFLDL's minFunc) or with
minibatch Adam (`Solver`). Examples are rows: x (m, n_features) and integer labels y (m,) in
0..n_classes-1. Ctrl-C stops training, keeps the last accepted parameters and re-raises
KeyboardInterrupt, so a pipeline does not go on with a half-trained model.
"""

import copy
import time
import typing
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import UserError
from ..kinds import SparseAutoencoder
from ..kinds.penalties import weight_decay
from ..train.lbfgs import Evaluated, train_lbfgs

# ----------------------------------------------------------------------------------------
# Inputs


def to_rows(x, dtype: torch.dtype, device, width: int | None = None, name: str = "x") -> torch.Tensor:
    """x (m, n_features), NumPy or torch, as a finite tensor of the given dtype, or a UserError."""
    x = torch.as_tensor(x).to(dtype=dtype, device=device)
    if x.ndim != 2 or x.shape[0] == 0:
        raise UserError(f"{name} must be a non-empty 2-D array (n_examples, n_features); got shape {tuple(x.shape)}.")
    if width is not None and x.shape[1] != width:
        raise UserError(f"{name} has {x.shape[1]} features per row but the model takes {width}; pass matching data.")
    if not torch.isfinite(x).all():
        raise UserError(f"{name} contains NaN or infinite values; clean the data first.")
    return x


def to_labels(y, m: int, n_classes: int, device) -> torch.Tensor:
    """y (m,) of whole numbers in 0..n_classes-1 as an int64 tensor, or a UserError."""
    y = torch.as_tensor(y)
    if y.ndim != 1 or y.shape[0] != m:
        raise UserError(f"labels must be a 1-D array with one label per example ({m}); got shape {tuple(y.shape)}.")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise UserError(f"labels must be integers 0..{n_classes - 1}; got dtype {y.dtype}.")
    if y.min() < 0 or y.max() >= n_classes:
        raise UserError(
            f"labels must lie in 0..{n_classes - 1}; got {int(y.min())}..{int(y.max())}. "
            "Relabel the classes 0..k-1 or raise n_classes."
        )
    return y.to(dtype=torch.int64, device=device)


# ----------------------------------------------------------------------------------------
# Optimisation


@dataclass(frozen=True)
class Solver:
    """How a classifier's cost is minimised."""

    optimizer: str = "lbfgs"  # 'lbfgs' (full batch, UFLDL's minFunc) or 'adam' (shuffled minibatches)
    max_iter: int = 100  # L-BFGS iterations (UFLDL: 100 for a softmax, 400 for fine-tuning)
    memory: int = 100  # L-BFGS history length
    epochs: int = 20  # Adam: passes over the data
    batch_size: int = 256  # Adam: examples per step
    lr: float = 1e-3  # Adam: learning rate
    seed: int = 0  # Adam: minibatch order

    def __post_init__(self):
        if self.optimizer not in ("lbfgs", "adam"):
            raise UserError(f"optimizer must be 'lbfgs' or 'adam' (got {self.optimizer!r}).")
        for name in ("max_iter", "memory", "epochs", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise UserError(f"solver setting {name} must be a whole number >= 1 (got {value!r}).")
        if not self.lr > 0:
            raise UserError(f"solver setting lr must be > 0 (got {self.lr}).")


def _row(step: int, cost: float, nll: float, decay: float, seconds: float) -> dict:
    return {"step": step, "cost": cost, "nll": nll, "weight_decay": decay, "seconds": seconds}


def _floats(terms) -> list[float]:
    """(J, nll, decay) tensors, which carry autograd history, as plain numbers."""
    return torch.stack(terms).detach().tolist()


def trainable(module: nn.Module) -> list[nn.Parameter]:
    """The parameters training moves: those that require gradients."""
    return [p for p in module.parameters() if p.requires_grad]


def minimize(params: list[nn.Parameter], cost, x, y, solver: Solver, progress: bool = False) -> list[dict]:
    """Minimise cost(x, y) -> (J, nll, decay) over params, in place; returns the history.

    One history row per L-BFGS iteration or Adam epoch: step, cost, nll, weight_decay, seconds.
    """
    if solver.optimizer == "lbfgs":
        return _lbfgs(params, cost, x, y, solver, progress)
    return _adam(params, cost, x, y, solver, progress)


def _lbfgs(params, cost, x, y, solver: Solver, progress: bool) -> list[dict]:
    def objective() -> Evaluated:
        terms = cost(x, y)
        grads = torch.autograd.grad(terms[0], params)
        J, nll, decay = _floats(terms)
        return Evaluated(J, list(grads), {"cost": J, "nll": nll, "weight_decay": decay})

    history, interrupted = train_lbfgs(params, objective, solver.max_iter, solver.memory, progress)
    if interrupted:
        raise KeyboardInterrupt
    return history


def _adam(params, cost, x, y, solver: Solver, progress: bool) -> list[dict]:
    optimizer = torch.optim.Adam(params, lr=solver.lr)
    generator = torch.Generator().manual_seed(solver.seed)
    history, started, m = [], time.perf_counter(), x.shape[0]
    with tqdm(total=solver.epochs, desc="adam", unit="epoch", disable=not progress, dynamic_ncols=True) as bar:
        for epoch in range(1, solver.epochs + 1):
            totals = np.zeros(3)  # example-weighted sums of J, nll, decay
            for rows in torch.randperm(m, generator=generator).to(x.device).split(solver.batch_size):
                terms = cost(x[rows], y[rows])
                optimizer.zero_grad(set_to_none=True)
                terms[0].backward()
                optimizer.step()
                totals += np.array(_floats(terms)) * len(rows)
            J, nll, decay = (totals / m).tolist()
            history.append(_row(epoch, J, nll, decay, round(time.perf_counter() - started, 3)))
            bar.update(1)
            bar.set_postfix(cost=f"{history[-1]['cost']:.6g}", refresh=False)
    return history


# ----------------------------------------------------------------------------------------
# Models


class SoftmaxRegression(nn.Module):
    """Softmax regression: logits = x theta^T + b, theta (n_classes, n_features), b (n_classes,)."""

    def __init__(
        self,
        n_features: int,
        n_classes: int,
        weight_decay: float = 1e-4,
        dtype: torch.dtype = torch.float64,
        device="cpu",
        seed: int = 0,
    ):
        super().__init__()
        if n_features < 1 or n_classes < 2:
            raise UserError(f"a softmax needs n_features >= 1 and n_classes >= 2 (got {n_features}, {n_classes}).")
        if not weight_decay >= 0:
            raise UserError(f"weight_decay must be >= 0 (got {weight_decay}).")
        self.n_features, self.n_classes, self.weight_decay = n_features, n_classes, weight_decay
        gen = torch.Generator().manual_seed(seed)
        # UFLDL's start: theta = 0.005 * randn. The cost is convex, so this only breaks ties.
        theta = 0.005 * torch.randn(n_classes, n_features, generator=gen, dtype=torch.float64)
        self.theta = nn.Parameter(theta.to(dtype=dtype, device=device))
        self.b = nn.Parameter(torch.zeros(n_classes, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (batch, n_classes); log_softmax of them is log p(y | x)."""
        return torch.addmm(self.b, x, self.theta.t())

    def cost(self, x: torch.Tensor, y: torch.Tensor):
        """(J, nll, weight decay) on x (m, n_features), y (m,), as tensors for autograd."""
        nll = F.cross_entropy(self(x), y)
        decay = weight_decay(self.weight_decay, self.theta)
        return nll + decay, nll, decay

    def fit(self, x, y, solver: Solver = Solver(), progress: bool = False) -> list[dict]:
        """Train on x (m, n_features) and labels y (m,); returns the history (see `minimize`)."""
        x = to_rows(x, self.theta.dtype, self.theta.device, self.n_features)
        y = to_labels(y, x.shape[0], self.n_classes, x.device)
        return minimize(trainable(self), self.cost, x, y, solver, progress)

    @torch.no_grad()
    def predict(self, x) -> np.ndarray:
        """The most probable class of each row of x: (m,) int64."""
        x = to_rows(x, self.theta.dtype, self.theta.device, self.n_features)
        return self(x).argmax(1).cpu().numpy()


class FeatureClassifier(nn.Module):
    """Encoders in order, then a softmax on the last one's codes: x (batch, n_inputs) -> logits.

    It holds copies of the autoencoders, so fine-tuning leaves the given ones as they were, and
    runs only their encoding half. The decoders are dropped from training: W2 (and b2, unless
    the autoencoder subtracts it before encoding) are frozen, so fine-tuning moves each
    encoder's W1 and b1 (b2 with pre_bias, a JumpReLU's thresholds) and the softmax. The
    encoders run in inference mode (a batchtopk autoencoder then uses its threshold).
    """

    def __init__(self, encoders: list[SparseAutoencoder], n_classes: int, weight_decay: float = 1e-4, seed: int = 0):
        super().__init__()
        if len(encoders) == 0:
            raise UserError("a FeatureClassifier needs at least one trained autoencoder.")
        for i, (lower, upper) in enumerate(zip(encoders, encoders[1:])):
            if upper.n_inputs != lower.n_hidden:
                raise UserError(
                    f"autoencoder {i + 1} takes {upper.n_inputs} inputs but autoencoder {i} has "
                    f"{lower.n_hidden} hidden units; each layer must be trained on the previous one's features."
                )
        self.encoders = nn.ModuleList(copy.deepcopy(sae) for sae in encoders)
        for sae in self.autoencoders:
            sae.W2.requires_grad_(False)
            sae.b2.requires_grad_(sae.cfg.pre_bias)
        W1 = encoders[0].W1
        self.softmax = SoftmaxRegression(encoders[-1].n_hidden, n_classes, weight_decay, W1.dtype, W1.device, seed)
        self.n_inputs, self.n_classes = encoders[0].n_inputs, n_classes
        self.train(False)

    @property
    def autoencoders(self) -> list[SparseAutoencoder]:
        """The (copied) autoencoders whose encoders run, input side first."""
        return [typing.cast(SparseAutoencoder, sae) for sae in self.encoders]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last encoder's codes: (batch, n_inputs) -> (batch, n_hidden of the last)."""
        for sae in self.autoencoders:
            x = sae.features(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (batch, n_classes)."""
        return self.softmax(self.features(x))

    def cost(self, x: torch.Tensor, y: torch.Tensor, lambda_: float, decay_encoders: bool = True):
        """Fine-tuning's (J, nll, weight decay): (lambda/2) ||theta||^2, plus every encoder's ||W1||^2 with
        decay_encoders."""
        nll = F.cross_entropy(self(x), y)
        encoder_weights = [sae.W1 for sae in self.autoencoders] if decay_encoders else []
        decay = weight_decay(lambda_, self.softmax.theta, *encoder_weights)
        return nll + decay, nll, decay

    def _data(self, x, y):
        x = to_rows(x, self.softmax.theta.dtype, self.softmax.theta.device, self.n_inputs)
        return x, to_labels(y, x.shape[0], self.n_classes, x.device)

    def fit(
        self,
        x,
        y,
        fine_tune: bool = False,
        softmax_solver: Solver = Solver(max_iter=100),
        fine_tune_solver: Solver = Solver(max_iter=400),
        fine_tune_lambda: float = 1e-4,
        progress: bool = False,
        *,
        decay_encoders: bool = True,
    ) -> dict:
        """Train the softmax on the frozen features, then (if fine_tune) the whole network.

        Returns {"softmax": history, "fine_tune": history or None}.
        """
        history = {"softmax": self.fit_softmax(x, y, softmax_solver, progress), "fine_tune": None}
        if fine_tune:
            history["fine_tune"] = self.fine_tune(
                x, y, fine_tune_solver, fine_tune_lambda, progress, decay_encoders=decay_encoders
            )
        return history

    def fit_softmax(self, x, y, solver: Solver = Solver(max_iter=100), progress: bool = False) -> list[dict]:
        """Train only the softmax, on the encoders' features (with the softmax's own weight decay)."""
        x, y = self._data(x, y)
        with torch.no_grad():
            features = self.features(x)
        return self.softmax.fit(features, y, solver, progress)

    def fine_tune(
        self,
        x,
        y,
        solver: Solver = Solver(max_iter=400),
        lambda_: float = 1e-4,
        progress: bool = False,
        *,
        decay_encoders: bool = True,
    ) -> list[dict]:
        """Back-propagate through the whole network, with weight decay lambda_ on theta and the encoders' W1.

        UFLDL's stackedAECost decays theta only (decay_encoders=False, lambda_ 3e-3). On MNIST
        784-200-200-10 that reached 97.7%, and theta-only 1e-4 overfits (97.5%); decaying every
        weight with 1e-4 reached 98.3% (fine-tuned on 50,000 digits, 400 L-BFGS iterations).
        """
        if not lambda_ >= 0:
            raise UserError(f"fine-tuning weight decay must be >= 0 (got {lambda_}).")
        x, y = self._data(x, y)
        return minimize(
            trainable(self), lambda xb, yb: self.cost(xb, yb, lambda_, decay_encoders), x, y, solver, progress
        )

    @torch.no_grad()
    def predict(self, x) -> np.ndarray:
        """The most probable class of each row of x (m, n_inputs): (m,) int64."""
        x = to_rows(x, self.softmax.theta.dtype, self.softmax.theta.device, self.n_inputs)
        return self(x).argmax(1).cpu().numpy()


# ----------------------------------------------------------------------------------------
# Evaluation


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts (n_classes, n_classes) int64: rows are the true class, columns the predicted one."""
    pairs = np.asarray(y_true, dtype=np.int64) * n_classes + np.asarray(y_pred, dtype=np.int64)
    return np.bincount(pairs, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def evaluate_classifier(model, x, y, class_names=None) -> dict:
    """Accuracy of model.predict on x (m, n_features) against labels y (m,).

    Returns n_examples, accuracy, per_class_accuracy ({class name: recall}, NaN for a class with
    no examples), confusion_matrix (k, k) int64 (rows true, columns predicted) and class_names.
    """
    k = model.n_classes
    names = [str(c) for c in range(k)] if class_names is None else [str(c) for c in class_names]
    if len(names) != k:
        raise UserError(f"class_names has {len(names)} names but the model has {k} classes; give one name per class.")
    predicted = model.predict(x)
    y = to_labels(y, len(predicted), k, "cpu").numpy()
    cm = confusion_matrix(y, predicted, k)
    support = cm.sum(1)
    recall = np.divide(np.diag(cm), support, out=np.full(k, np.nan), where=support > 0)
    return {
        "n_examples": len(y),
        "accuracy": float(np.trace(cm) / len(y)),
        "per_class_accuracy": dict(zip(names, recall.tolist())),
        "confusion_matrix": cm,
        "class_names": names,
    }
