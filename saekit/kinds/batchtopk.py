"""BatchTopK dictionaries (Bussmann et al. 2024): the batch shares a budget of k codes per example.

In training, the k * batch largest pre-activations of the whole batch are kept, so an example
may use more or fewer than k codes; the loss is TopK's (reconstruction + AuxK). For inference a
running mean of the smallest kept value becomes one threshold for every unit, and the
dictionary acts as a JumpReLU with that threshold: codes no longer depend on the batch. That is
also how it is saved for SAELens (a "jumprelu" SAE whose thresholds are all that value).
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .. import distributed
from ..kernels.sparse import SparseCodes, sorted_row_topk
from .base import Output, SparseAutoencoder
from .topk import TopK, TopKConfig

THRESHOLD_MOMENTUM = 0.9  # the inference threshold's running mean over steps (see the module docstring)


@dataclass
class BatchTopKConfig(TopKConfig):
    kind: ClassVar[str] = "batchtopk"


class BatchTopK(TopK):
    Config = BatchTopKConfig
    batch_topk: "BatchSelection"

    def add_kind_modules(self, dtype, device) -> None:
        self.batch_topk = BatchSelection(self.cfg.k, dtype=dtype, device=device)

    def selection(self):
        return self.batch_topk

    def sparsify(self, z2: torch.Tensor):
        """Training: SparseCodes of the batch's selection; inference: dense codes z2 * (z2 > threshold)."""
        return SparseCodes(*self.batch_topk(z2)) if self.training else self.batch_topk(z2)

    def forward(
        self, x: torch.Tensor, target: torch.Tensor | None = None, *, dead: torch.Tensor | None = None
    ) -> Output:
        if self.training:
            return super().forward(x, target, dead=dead)  # the fused k-sparse encoder, AuxK
        return SparseAutoencoder.forward(self, x, target, dead=dead)  # the threshold: dense codes

    saelens_architecture = "jumprelu"

    def saelens_fields(self) -> dict:
        return {}

    def saelens_tensors(self) -> dict[str, torch.Tensor]:
        return {"threshold": self.batch_topk.threshold.to(self.W1.dtype).expand(self.n_hidden)}

    @classmethod
    def from_saelens(cls, cfg: dict, tensors: dict, where: str) -> dict | None:
        """A "jumprelu" SAE that saekit exported from a dictionary of this kind (its metadata says so)."""
        metadata = cfg.get("metadata")
        saekit = metadata.get("saekit_architecture") if isinstance(metadata, dict) else None
        if cfg.get("architecture") != "jumprelu" or not isinstance(saekit, dict):
            return None
        threshold = tensors.get("threshold")
        one_threshold = threshold is not None and threshold.ndim == 1 and bool((threshold == threshold[0]).all())
        k = saekit.get("k")
        if saekit.get("kind", saekit.get("activation")) != cls.Config.kind or not one_threshold or type(k) is not int:
            return None
        return {"k": k}

    def load_saelens_tensors(self, tensors: dict) -> None:
        with torch.no_grad():
            self.batch_topk.threshold.copy_(tensors["threshold"][0])

    sparsify_activation = None  # sparsify's coders keep each example's k largest codes: TopK, not this

    dictionary_learning_class = "BatchTopKSAE"  # whose inference is the same threshold, on relu(z2)

    def dictionary_learning_buffers(self) -> dict[str, torch.Tensor]:
        return super().dictionary_learning_buffers() | {"threshold": self.batch_topk.threshold}

    def load_dictionary_learning_buffers(self, state: dict) -> None:
        with torch.no_grad():
            self.batch_topk.threshold.copy_(state["threshold"])


class BatchSelection(nn.Module):
    """Keep the k * batch largest pre-activations of the batch (in training); a threshold in inference.

    With several processes the batch is the global one: the threshold is found among every
    process's candidates, so 2 processes select exactly what 1 process would on their union.
    """

    def __init__(self, k: int, momentum: float = THRESHOLD_MOMENTUM, dtype: torch.dtype = torch.float32, device="cpu"):
        super().__init__()
        self.k, self.momentum = k, momentum
        self.threshold: torch.Tensor
        self.register_buffer("threshold", torch.tensor(-1.0, dtype=dtype, device=device))  # -1: not estimated yet

    def _batch_threshold(self, candidates: torch.Tensor, n_keep: int) -> torch.Tensor:
        flat = distributed.all_gather_cat(candidates.reshape(-1))
        return flat.topk(min(n_keep, flat.numel()), sorted=False).values.min()

    def forward(self, z2: torch.Tensor):
        """Training: (values, indices) of the kept codes, zero-padded to the widest row.
        Inference: dense codes z2 * (z2 > threshold)."""
        if not self.training:
            keep = z2 > self.threshold.clamp_min(0)
            return z2 * keep
        batch, n_hidden = z2.shape
        n_keep = self.k * batch * distributed.world_size()
        # Each row's top `width` candidates hold every kept value unless the row is "full" (all its
        # candidates kept): then it may hold more. Only full rows are searched wider, so a few rows of
        # large norm (which may take hundreds of codes) cost little; the rest keep 4k candidates.
        width = min(4 * self.k, n_hidden)
        values, indices = sorted_row_topk(z2, width)
        while True:
            threshold = self._batch_threshold(values, n_keep)
            full = values[:, -1] >= threshold  # every process has the same width, so all stop together
            if width == n_hidden or not distributed.any_true(bool(full.any())):
                break
            width = min(2 * width, n_hidden)
            values, indices = _widen(values, indices, width)
            rows = full.nonzero().squeeze(1)
            values[rows], indices[rows] = sorted_row_topk(z2[rows], width)
        keep = (values >= threshold) & (values > 0)
        used = distributed.max_int(max(1, int(keep.sum(1).max())))  # at least one (zero) code per row
        values, indices, keep = values[:, :used], indices[:, :used], keep[:, :used]
        values = values.masked_fill(~keep, 0)  # also the -inf of the rows' padding
        with torch.no_grad():
            smallest = threshold.clamp_min(0).to(self.threshold.dtype)
            self.threshold.copy_(
                smallest if self.threshold < 0 else self.momentum * self.threshold + (1 - self.momentum) * smallest
            )
        return values, indices


def _widen(values: torch.Tensor, indices: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates (batch, n) padded to (batch, width) with -inf values (never kept) and index 0."""
    pad = width - values.shape[1]
    return (
        torch.nn.functional.pad(values, (0, pad), value=-float("inf")),
        torch.nn.functional.pad(indices, (0, pad), value=0),
    )
