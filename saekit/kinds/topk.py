"""TopK dictionaries (Gao et al. 2024): each example keeps its k largest pre-activations.

    h = relu(the k largest of z2 in each row), as SparseCodes (values and indices, k per row)
    loss = reconstruction + aux_coefficient * AuxK

No penalty is needed: k bounds the number of active units. Units that have not fired for a
while ("dead", `dead_after` examples) are revived by AuxK: the aux_k largest pre-activations
among dead units try to rebuild the residual y - x_hat, normalised by the residual's variance.

Only the encoder's forward product is dense: the selection's backward pass and the decoding are
k-sparse (`saekit.kernels.sparse`), so a step costs little beyond that one product.
"""

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from .. import distributed
from ..errors import UserError
from ..kernels.sparse import SparseCodes, row_topk, sparse_decode, sparse_encode
from .base import ModelConfig, Output, SparseAutoencoder


@dataclass
class TopKConfig(ModelConfig):
    kind: ClassVar[str] = "topk"
    minibatch_only: ClassVar[bool] = True

    n_hidden: int = 512
    """Number of hidden units: the size of the sparse code, the dictionary's width."""
    penalty: Literal["none"] = "none"
    """'none': k bounds the number of active units, no penalty is needed."""
    k: int = 32
    """Codes kept per example (on average over the batch for batchtopk)."""
    aux_k: int = 0
    """AuxK loss: reconstruct the residual from this many dead units (0: off)."""
    aux_coefficient: float = 0.03125
    """Weight of the AuxK loss."""

    @classmethod
    def optim_defaults(cls, n_hidden: int, k: int | None) -> dict:
        """The learning rate 4e-3 at 4,096 units, scaled by 1/sqrt(width) as Gao et al. (2024) find for TopK
        dictionaries, and a unit dead after 32 * n_hidden / k examples without firing: 32 times the wait
        between firings of a unit that fired its fair share, k / n_hidden. Both were chosen on MiniLM
        activations at width 4,096, k = 32 (README, "The default recipe")."""
        return {"lr": 4e-3 * math.sqrt(4096 / n_hidden), "dead_after": max(1, 32 * n_hidden // (k or cls.k))}

    def problems(self) -> list[str]:
        problems = (
            super().problems()
            + self.at_least(1, "k")
            + self.at_least(0, "aux_k", "aux_coefficient")
            + self.finite("aux_coefficient")
        )
        if self.k > self.n_hidden:
            problems.append(f"--k must lie between 1 and --n-hidden = {self.n_hidden} (got {self.k})")
        return problems


class TopK(SparseAutoencoder):
    Config = TopKConfig
    cfg: TopKConfig

    def sparsify(self, z2: torch.Tensor) -> SparseCodes:
        values, indices = row_topk(z2, self.cfg.k)
        return SparseCodes(values.relu(), indices)

    def selection(self):
        """How the fused encoder selects codes from z2 in this mode: None for each row's k largest."""
        return None

    def forward(
        self, x: torch.Tensor, target: torch.Tensor | None = None, *, dead: torch.Tensor | None = None
    ) -> Output:
        cfg = self.cfg
        h, aux = sparse_encode(x, self.W1, self.b1, self.subtracted_b2, cfg.k, self.selection(), dead, cfg.aux_k)
        x_hat = self.decode(h, x)
        error = self.error(x_hat, x, target)
        auxiliary = None if aux is None else cfg.aux_coefficient * auxk_loss(error.detach(), aux, self.W2)
        return self.output(x_hat, h, error, auxiliary=auxiliary)

    def kind_summary(self) -> str:
        aux = f", aux_k={self.cfg.aux_k}" if self.cfg.aux_k else ""
        return f"{self.cfg.kind}, k={self.cfg.k}{aux}"

    saelens_architecture = "topk"

    def saelens_fields(self) -> dict:
        return {"k": self.cfg.k, "rescale_acts_by_decoder_norm": False}

    @classmethod
    def from_saelens(cls, cfg: dict, tensors: dict, where: str) -> dict | None:
        architecture = cfg.get("architecture", "standard")
        activation_fn = cfg.get("activation_fn", cfg.get("activation_fn_str", "relu"))
        if architecture != "topk" and (architecture, activation_fn) != ("standard", "topk"):
            return None
        kwargs = cfg.get("activation_fn_kwargs")
        k = whole_k(cfg.get("k", kwargs.get("k") if isinstance(kwargs, dict) else None), where)
        if cfg.get("rescale_acts_by_decoder_norm"):
            # SAELens selects on hidden_pre * ||W_dec row|| and decodes codes / ||W_dec row||: fold both in.
            norms = tensors["W_dec"].norm(dim=1)
            tensors["W_enc"], tensors["b_enc"] = tensors["W_enc"] * norms, tensors["b_enc"] * norms
            tensors["W_dec"] = tensors["W_dec"] / norms[:, None]
        return {"k": k}

    sparsify_activation: ClassVar[str | None] = "topk"

    def sparsify_fields(self) -> dict:
        return {"k": self.cfg.k}

    @classmethod
    def from_sparsify(cls, cfg: dict, where: str) -> dict | None:
        return {"k": whole_k(cfg["k"], where)} if cfg["activation"] == cls.sparsify_activation else None

    dictionary_learning_class = "AutoEncoderTopK"

    def dictionary_learning_buffers(self) -> dict[str, torch.Tensor]:
        """k, and threshold -1: dictionary_learning's "not estimated" (its TopK encodes with k unless asked)."""
        return {"k": torch.tensor(self.cfg.k, dtype=torch.int32), "threshold": self.W1.new_tensor(-1.0)}

    @classmethod
    def from_dictionary_learning(cls, trainer: dict, state: dict, where: str) -> dict | None:
        if trainer["dict_class"] != cls.dictionary_learning_class:
            return None
        k = state.get("k")
        if not isinstance(k, torch.Tensor) or k.ndim != 0 or k.is_floating_point() or k.dtype == torch.bool:
            got = f"{k.dtype} of shape {tuple(k.shape)}" if isinstance(k, torch.Tensor) else repr(k)
            raise UserError(f"{where}: k must be a whole number (a 0-d integer tensor), got {got}.")
        k = whole_k(int(k), where)
        if trainer.get("k", k) != k:
            raise UserError(f"{where} has k = {k}, but its config.json says k = {trainer['k']!r}.")
        return {"k": k}


def whole_k(k, where: str) -> int:
    """k, read from another library's file, if it is a whole number >= 1."""
    if type(k) is not int or k < 1:
        raise UserError(f"{where}: k must be a whole number >= 1 (got {k!r}).")
    return k


def auxk_loss(residual: torch.Tensor, aux: SparseCodes, W2: torch.Tensor) -> torch.Tensor:
    """AuxK: how well the dead units' codes rebuild the residual e = y - x_hat, normalised by e's variance.

    residual is x_hat - y (batch, n_outputs), detached. The variance is the global batch's, so
    several processes compute the same loss as one.
    """
    e = -residual  # y - x_hat
    e_hat = sparse_decode(aux.values.to(W2.dtype), aux.indices, W2.t())
    total = distributed.all_reduce_sum(torch.cat([e.sum(0), e.new_tensor([e.shape[0]])]))
    variance = distributed.all_reduce_sum((e - total[:-1] / total[-1]).pow(2).sum())
    # Gradients are averaged over processes, so each one weighs its part by the process count.
    return distributed.world_size() * (e_hat - e).pow(2).sum() / variance.clamp_min(1e-30)
