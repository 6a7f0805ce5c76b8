"""JumpReLU dictionaries (Rajamanoharan et al. 2024): ReLU above a learned threshold per unit.

    h = z2 * H(z2 - theta),  theta = exp(log_threshold) (n_hidden,)
    penalty 'l0': beta * mean_i #{j : h_ij > 0}

The step H has no useful derivative, so theta learns through straight-through estimators with a
rectangle kernel of width `bandwidth`: the codes' gradient with respect to theta, and the L0
count's (`_JumpReLUFunction`, `_StepFunction`).
"""

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import nn

from .base import Codes, ModelConfig, SparseAutoencoder


@dataclass
class JumpReLUConfig(ModelConfig):
    kind: ClassVar[str] = "jumprelu"
    minibatch_only: ClassVar[bool] = True

    penalty: Literal["l0", "none"] = "l0"
    """Penalty on the codes, weighted by beta: 'l0' (mean number of active units per example) or 'none'."""
    beta: float = 0.01
    """Weight of the L0 penalty."""
    jumprelu_threshold: float = 0.001
    """Initial threshold of every unit."""
    jumprelu_bandwidth: float = 0.001
    """Width of the straight-through estimator's window."""

    def problems(self) -> list[str]:
        problems = super().problems() + self.at_least(0, "beta") + self.finite("beta")
        for name in ("jumprelu_threshold", "jumprelu_bandwidth"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                problems.append(f"--{name.replace('_', '-')} must be a finite number > 0 (got {value})")
        return problems


class JumpReLU(SparseAutoencoder):
    Config = JumpReLUConfig
    cfg: JumpReLUConfig
    jumprelu: "Threshold"

    def add_kind_modules(self, dtype, device) -> None:
        self.jumprelu = Threshold(
            self.n_hidden, self.cfg.jumprelu_threshold, self.cfg.jumprelu_bandwidth, dtype=dtype, device=device
        )

    def sparsify(self, z2: torch.Tensor) -> torch.Tensor:
        return self.jumprelu(z2)

    def penalty(self, h: Codes, z2: torch.Tensor) -> torch.Tensor | None:
        return self.cfg.beta * self.jumprelu.l0(z2) if self.cfg.penalty == "l0" else None

    def decode_support(self, z2: torch.Tensor) -> torch.Tensor:
        """Codes above the threshold, and those within the straight-through window below it (their
        dL/dh moves the threshold, though they are 0)."""
        return z2 > self.jumprelu.log_threshold.exp().detach() - self.cfg.jumprelu_bandwidth / 2

    def kind_summary(self) -> str:
        return f"jumprelu, penalty {self.cfg.penalty} (beta={self.cfg.beta})"

    saelens_architecture = "jumprelu"

    def saelens_tensors(self) -> dict[str, torch.Tensor]:
        return {"threshold": self.jumprelu.log_threshold.exp()}

    @classmethod
    def from_saelens(cls, cfg: dict, tensors: dict, where: str) -> dict | None:
        if cfg.get("architecture") != "jumprelu":
            return None
        metadata = cfg.get("metadata")
        saekit = metadata.get("saekit_architecture") if isinstance(metadata, dict) else None
        bandwidth = saekit.get("jumprelu_bandwidth") if isinstance(saekit, dict) else None
        return {} if not isinstance(bandwidth, (int, float)) else {"jumprelu_bandwidth": float(bandwidth)}

    def load_saelens_tensors(self, tensors: dict) -> None:
        with torch.no_grad():
            self.jumprelu.log_threshold.copy_(log_threshold(tensors["threshold"]))

    dictionary_learning_class = "JumpReluAutoEncoder"

    def dictionary_learning_buffers(self) -> dict[str, torch.Tensor]:
        return self.saelens_tensors()  # threshold (n_hidden,), as SAELens keeps it

    def load_dictionary_learning_buffers(self, state: dict) -> None:
        self.load_saelens_tensors(state)

    @classmethod
    def from_dictionary_learning(cls, trainer: dict, state: dict, where: str) -> dict | None:
        if trainer["dict_class"] != cls.dictionary_learning_class:
            return None
        bandwidth = trainer.get("bandwidth")  # its JumpReluTrainer's, the same rectangle window as saekit's
        if isinstance(bandwidth, (int, float)) and 0 < bandwidth < math.inf:
            return {"jumprelu_bandwidth": float(bandwidth)}
        return {}


def log_threshold(theta: torch.Tensor) -> torch.Tensor:
    """log theta (-inf for theta <= 0), moved by up to two ulps so that exp of it is theta exactly
    wherever some float allows: saekit keeps log theta, SAELens theta, and a pre-activation equal to
    the threshold must fire (or not) in both."""
    log = theta.clamp_min(0).log()
    candidates = [log]
    for direction in (-torch.inf, torch.inf):
        step = log
        for _ in range(2):
            step = torch.nextafter(step, torch.full_like(step, direction))
            candidates.append(step)
    stacked = torch.stack(candidates)
    best = (stacked.exp() - theta.clamp_min(0)).abs().argmin(0)  # the first of ties: log itself
    return stacked.gather(0, best[None])[0]


class _JumpReLUFunction(torch.autograd.Function):
    """z * H(z - theta); d/dz = H(z - theta); d/dtheta = -(theta / eps) K((z - theta) / eps)."""

    @staticmethod
    def forward(ctx, z, theta, bandwidth):
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return z * (z > theta)

    @staticmethod
    def backward(ctx, grad):
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        window = ((z - theta).abs() < eps / 2).to(grad.dtype)
        grad_theta = -(theta / eps) * window * grad
        return grad * (z > theta), grad_theta.sum(0), None


class _StepFunction(torch.autograd.Function):
    """H(z - theta); d/dz = 0; d/dtheta = -(1 / eps) K((z - theta) / eps): the L0 count's estimator."""

    @staticmethod
    def forward(ctx, z, theta, bandwidth):
        ctx.save_for_backward(z, theta)
        ctx.bandwidth = bandwidth
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad):
        z, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        window = ((z - theta).abs() < eps / 2).to(grad.dtype)
        return None, (-(1 / eps) * window * grad).sum(0), None


class Threshold(nn.Module):
    """h = z2 * H(z2 - theta) with a learned threshold theta = exp(log_threshold) per hidden unit."""

    def __init__(self, n_hidden: int, initial_threshold: float = 0.001, bandwidth: float = 0.001, **kw):
        super().__init__()
        self.bandwidth = bandwidth
        self.log_threshold = nn.Parameter(torch.full((n_hidden,), float(initial_threshold), **kw).log())

    def forward(self, z2: torch.Tensor) -> torch.Tensor:
        return _JumpReLUFunction.apply(z2, self.log_threshold.exp(), self.bandwidth)

    def l0(self, z2: torch.Tensor) -> torch.Tensor:
        """Mean number of active units per example, differentiable in theta (straight-through)."""
        return _StepFunction.apply(z2, self.log_threshold.exp(), self.bandwidth).sum(1).mean()
