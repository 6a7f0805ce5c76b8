"""A scikit-learn-style estimator, so a sparse autoencoder drops into existing pipelines.

    sae = SparseAutoencoderEstimator(n_hidden=25).fit(X)      # X: (n_samples, n_features)
    H = sae.transform(X)                                       # hidden activations (n_samples, n_hidden)
    X_hat = sae.inverse_transform(H)                           # reconstructions
    sae.score(X)                                               # minus the mean squared reconstruction error

Hyper-parameters are saekit's settings (see `saekit train --help`), given to __init__ and stored
unchanged; learned attributes end in `_`. The kind's own settings (penalty, beta, rho, k, ...)
default to None, which means the kind's default; one the kind does not have is an error. It works
on NumPy arrays and needs no scikit-learn (get_params and set_params make it usable with
scikit-learn's tools where those are installed).

    SparseAutoencoderEstimator(kind="topk", n_hidden=512, k=8, optimizer="adam", dtype="float32")
"""

import inspect

import numpy as np
import torch

from .config import TrainConfig
from .errors import UserError
from .eval import evaluate
from .kinds import build
from .train import fit as train


class SparseAutoencoderEstimator:
    def __init__(
        self,
        kind="sigmoid",
        n_hidden=25,
        output=None,
        penalty=None,
        beta=None,
        rho=None,
        k=None,
        aux_k=None,
        weight_decay=None,
        rho_momentum=None,
        optimizer="lbfgs",
        max_iter=400,
        lbfgs_memory=100,
        epochs=20,
        steps=0,
        batch_size=256,
        lr=1e-3,
        scale_inputs=False,
        dtype="float64",
        device="cpu",
        seed=0,
        progress=False,
    ):
        self.kind, self.n_hidden, self.output, self.penalty, self.beta, self.rho = (
            kind,
            n_hidden,
            output,
            penalty,
            beta,
            rho,
        )
        self.k, self.aux_k, self.weight_decay, self.rho_momentum = k, aux_k, weight_decay, rho_momentum
        self.optimizer, self.max_iter, self.lbfgs_memory, self.epochs = optimizer, max_iter, lbfgs_memory, epochs
        self.steps, self.batch_size, self.lr, self.scale_inputs = steps, batch_size, lr, scale_inputs
        self.dtype, self.device, self.seed, self.progress = dtype, device, seed, progress

    def get_params(self, deep=True) -> dict:
        return {name: getattr(self, name) for name in inspect.signature(type(self)).parameters}

    def set_params(self, **params):
        for name, value in params.items():
            if name not in self.get_params():
                raise UserError(f"unknown parameter {name!r}; known: {sorted(self.get_params())}.")
            setattr(self, name, value)
        return self

    def _config(self) -> TrainConfig:
        return TrainConfig.from_flat({k: v for k, v in self.get_params().items() if k != "progress" and v is not None})

    def _tensor(self, X, width: int | None = None) -> torch.Tensor:
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[0] == 0:
            raise UserError(f"X must be a non-empty 2-D array (n_samples, n_features); got shape {X.shape}.")
        if width is not None and X.shape[1] != width:
            raise UserError(f"X has {X.shape[1]} features; this estimator was fitted on {width}.")
        if not np.isfinite(X).all():
            raise UserError("X contains NaN or infinite values; clean it first.")
        return torch.as_tensor(X, dtype=getattr(torch, self.dtype), device=self.device)

    def fit(self, X, y=None):
        """Train on X (n_samples, n_features). y is ignored (the target is X itself)."""
        cfg = self._config()
        cfg.run.require_device()
        x = self._tensor(X)
        if cfg.model.output == "sigmoid" and (x.min() < 0 or x.max() > 1):
            raise UserError("output='sigmoid' reconstructs values in [0, 1]; rescale X or use output='linear'.")
        self.model_ = build(cfg.model, x.shape[1], dtype=x.dtype, device=x.device, seed=cfg.run.seed)
        self.history_, _ = train(self.model_, x, cfg.optim, seed=cfg.run.seed, progress=self.progress)
        self.n_features_in_ = x.shape[1]
        self.metrics_ = evaluate(self.model_, x)
        return self

    def _check_fitted(self):
        if not hasattr(self, "model_"):
            raise UserError("this estimator is not fitted yet; call fit(X) first.")

    @torch.no_grad()
    def transform(self, X) -> np.ndarray:
        """Hidden activations h (n_samples, n_hidden): the learned features."""
        self._check_fitted()
        self.model_.eval()
        return self.model_.features(self._tensor(X, self.n_features_in_)).cpu().numpy()

    @torch.no_grad()
    def inverse_transform(self, H) -> np.ndarray:
        """Reconstructions x_hat (n_samples, n_features) from hidden activations (n_samples, n_hidden)."""
        self._check_fitted()
        return self.model_.decode(self._tensor(H, self.model_.n_hidden)).cpu().numpy()

    def fit_transform(self, X, y=None) -> np.ndarray:
        return self.fit(X).transform(X)

    @torch.no_grad()
    def score(self, X, y=None) -> float:
        """Minus the mean squared reconstruction error per value (higher is better, as scikit-learn expects)."""
        self._check_fitted()
        x = self._tensor(X, self.n_features_in_)
        self.model_.eval()
        return -float((self.model_(x).x_hat - x).pow(2).mean())
