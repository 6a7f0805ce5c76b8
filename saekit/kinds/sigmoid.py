"""The sigmoid autoencoder of UFLDL and the lectures: sigmoid codes and a penalty on them.

    h = sigmoid(z2), and the penalty
        kl           beta sum_j KL(rho || rho_hat_j)      UFLDL's sparse autoencoder
        l1           beta mean_i ||h_i||_1                 seed 003's lecture
        contractive  beta mean_i ||dh_i/dx_i||_F^2         seed 001's contractive autoencoder
        none                                               under-complete and denoising autoencoders

rho_hat_j is unit j's mean activation. In evaluation mode (full-batch L-BFGS, metrics) it is
exact over the batch. A minibatch does not see the whole training set, so in training mode the
KL term uses a running estimate (`rho_momentum`, see `penalties.RunningRhoHat`): its gradient is
KL's slope at the running estimate times the gradient of the batch mean, and its reported value
is KL at the running estimate.

Fast path: an autoencoder (not a transcoder) with a sigmoid output, no pre_bias and a penalty of
kl, l1 or none: the gradient is UFLDL's closed form (`saekit.kernels.classic`), about twice as
fast as autograd.
"""

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from .. import distributed
from ..kernels import classic
from .base import Codes, LossTerms, ModelConfig, Output, SparseAutoencoder
from .penalties import RunningRhoHat, contractive, kl_divergence, kl_term


@dataclass
class SigmoidConfig(ModelConfig):
    kind: ClassVar[str] = "sigmoid"

    output: Literal["sigmoid", "linear"] = "sigmoid"
    """Output activation: 'sigmoid' (UFLDL; inputs must lie in [0, 1]) or 'linear'."""
    weight_decay: float = 1e-4
    """lambda: weight decay (lambda/2)(||W1||^2 + ||W2||^2); biases carry none."""
    penalty: Literal["kl", "l1", "contractive", "none"] = "kl"
    """Penalty on the codes, weighted by beta: 'kl' (sum_j KL(rho || rho_hat_j)), 'l1' (mean_i ||h_i||_1),
    'contractive' (mean_i ||dh_i/dx_i||_F^2) or 'none'."""
    beta: float = 3.0
    """Weight of the sparsity penalty (see --penalty); 0 turns it off."""
    rho: float = 0.01
    """Sparsity target of the KL penalty: the mean activation each hidden unit should have, in (0, 1)."""
    rho_momentum: float = 0.9
    """Minibatch training with the KL penalty: weight of the old value in the running estimate of rho_hat."""

    def problems(self) -> list[str]:
        problems = (
            super().problems()
            + self.at_least(0, "beta")
            + self.finite("beta")
            + self.from_zero_below_one("rho_momentum")
        )
        if not 0 < self.rho < 1:
            problems.append(f"--rho must lie strictly between 0 and 1 (got {self.rho})")
        return problems


class Sigmoid(SparseAutoencoder):
    Config = SigmoidConfig
    cfg: SigmoidConfig

    def add_kind_modules(self, dtype, device) -> None:
        self.running = RunningRhoHat(self.n_hidden, self.cfg.rho_momentum)
        self._workspace: classic.Workspace | None = None  # the closed form's buffers, reused from step to step

    def sparsify(self, z2: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(z2)

    def penalty(self, h: Codes, z2: torch.Tensor) -> torch.Tensor | None:
        cfg, h = self.cfg, self.dense_codes(h)
        if cfg.penalty == "kl":
            if not self.training:
                return cfg.beta * kl_divergence(cfg.rho, h.mean(0)).sum()
            surrogate, reported = self.running.penalty(h, cfg.rho, cfg.beta, reduce=distributed.all_reduce_sum)
            return surrogate - surrogate.detach() + reported  # the value reported, the surrogate's gradient
        if cfg.penalty == "l1":
            return cfg.beta * h.abs().sum(1).mean()
        if cfg.penalty == "contractive":
            return cfg.beta * contractive(h * (1 - h), self.W1)
        return None

    def closed_form_gradients(self, x: torch.Tensor, target: torch.Tensor | None) -> Output | None:
        """UFLDL's closed form where it applies; the codes returned live in a reused buffer."""
        cfg = self.cfg
        if cfg.output != "sigmoid" or cfg.pre_bias or cfg.penalty == "contractive" or self.transcoder:
            return None
        params = (self.W1, self.b1, self.W2, self.b2)
        result, workspace = classic.cost_and_grad(
            self.W1.detach(),
            self.b1.detach(),
            self.W2.detach(),
            self.b2.detach(),
            x,
            cfg.weight_decay,
            self._sparsity(x.shape[0]),
            target=target,
            workspace=self._workspace,
        )
        self._workspace = workspace
        for p, g in zip(params, result.grads):
            p.grad = g  # the workspace's buffers: the next call overwrites them, after the optimizer has read them
        reconstruction, sparsity, decay = (
            torch.tensor(v, dtype=torch.float64) for v in (result.reconstruction, result.sparsity, result.weight_decay)
        )
        return Output(
            None, workspace.a2, LossTerms(reconstruction, sparsity, torch.zeros((), dtype=torch.float64), decay)
        )

    def _sparsity(self, batch: int):
        """The penalty as the closed form takes it: rho_hat -> (slope per unit, value)."""
        cfg = self.cfg
        if cfg.penalty == "kl" and not self.training:
            return kl_term(cfg.rho, cfg.beta)

        def sparsity(rho_hat: torch.Tensor) -> tuple[torch.Tensor, float]:
            if cfg.penalty == "kl":
                self.running.observe(rho_hat * batch, batch, reduce=distributed.all_reduce_sum)
                slope, value = self.running.slope_and_value(cfg.rho, cfg.beta)
                return slope, float(value)
            if cfg.penalty == "l1":  # beta * mean_i sum_j |a2_ij| = beta * sum_j rho_hat_j
                return torch.full_like(rho_hat, cfg.beta), cfg.beta * float(rho_hat.sum())
            return torch.zeros_like(rho_hat), 0.0

        return sparsity

    def activity(self, h: Codes) -> torch.Tensor:
        return self.dense_codes(h)  # a sigmoid unit's activation is its firing rate

    def training_state(self) -> dict:
        return self.running.state_dict()

    def load_training_state(self, state: dict) -> None:
        self.running.load_state_dict(state)

    def history_stats(self) -> dict[str, float]:
        if self.cfg.penalty != "kl" or self.running.rho_hat is None:
            return {}
        return {"rho_hat_mean": float(self.running.rho_hat.mean())}

    def kind_summary(self) -> str:
        cfg = self.cfg
        rho = f", rho={cfg.rho}" if cfg.penalty == "kl" else ""
        return f"sigmoid, penalty {cfg.penalty} (beta={cfg.beta}{rho})"
