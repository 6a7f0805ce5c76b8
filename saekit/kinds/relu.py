"""ReLU dictionaries with an L1 penalty: the sparse autoencoders of Bricken et al. (2023) and
Anthropic's April 2024 update, which weighs each code by its decoder column's norm.

    h = relu(z2), and the penalty
        l1           beta mean_i sum_j |h_ij|
        l1-decoder   beta mean_i sum_j |h_ij| ||W2[:, j]||   (the norm cannot shrink to dodge the penalty)
        contractive  beta mean_i ||dh_i/dx_i||_F^2
        none
"""

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from .base import Codes, ModelConfig, SparseAutoencoder
from .penalties import contractive


@dataclass
class ReLUConfig(ModelConfig):
    kind: ClassVar[str] = "relu"

    penalty: Literal["l1", "l1-decoder", "contractive", "none"] = "l1-decoder"
    """Penalty on the codes, weighted by beta: 'l1' (mean_i ||h_i||_1), 'l1-decoder' (L1 weighted by the decoder
    columns' norms), 'contractive' (mean_i ||dh_i/dx_i||_F^2) or 'none'."""
    beta: float = 0.05
    """Weight of the sparsity penalty (see --penalty); 0 turns it off."""

    def problems(self) -> list[str]:
        return super().problems() + self.at_least(0, "beta") + self.finite("beta")


class ReLU(SparseAutoencoder):
    Config = ReLUConfig
    cfg: ReLUConfig

    def sparsify(self, z2: torch.Tensor) -> torch.Tensor:
        return torch.relu(z2)

    def penalty(self, h: Codes, z2: torch.Tensor) -> torch.Tensor | None:
        cfg, h = self.cfg, self.dense_codes(h)
        if cfg.penalty == "l1":
            return cfg.beta * h.abs().sum(1).mean()
        if cfg.penalty == "l1-decoder":
            return cfg.beta * (h * self.W2.norm(dim=0)).abs().sum(1).mean()
        if cfg.penalty == "contractive":
            return cfg.beta * contractive((h > 0).to(h.dtype), self.W1)
        return None

    def decode_support(self, z2: torch.Tensor) -> torch.Tensor:
        return z2 > 0  # where the ReLU has a slope; elsewhere a code is 0 and stays so

    def kind_summary(self) -> str:
        return f"relu, penalty {self.cfg.penalty} (beta={self.cfg.beta})"

    saelens_architecture = "standard"

    @classmethod
    def from_saelens(cls, cfg: dict, tensors: dict, where: str) -> dict | None:
        activation_fn = cfg.get("activation_fn", cfg.get("activation_fn_str", "relu"))
        return {} if (cfg.get("architecture", "standard"), activation_fn) == ("standard", "relu") else None

    dictionary_learning_class = "AutoEncoder"

    @classmethod
    def from_dictionary_learning(cls, trainer: dict, state: dict, where: str) -> dict | None:
        # AutoEncoderNew: Anthropic's April update, the decoder's bias not subtracted before encoding
        return {} if trainer["dict_class"] in ("AutoEncoder", "AutoEncoderNew") else None
