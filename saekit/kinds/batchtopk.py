"""BatchTopK dictionaries (Bussmann et al. 2024): the batch shares a budget of k codes per example.

In training, the k * batch largest pre-activations of the whole batch are kept, so an example
may use more or fewer than k codes; the loss is TopK's (reconstruction + AuxK). For inference a
running mean of the smallest kept value becomes one threshold for every unit, and the
dictionary acts as a JumpReLU with that threshold: codes no longer depend on the batch. That is
also how it is saved for SAELens (a "jumprelu" SAE whose thresholds are all that value).
"""

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed
from ..kernels.sparse import at_least, ragged_codes
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
        return self.batch_topk(z2)

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

    def forward(self, z2: torch.Tensor):
        """Training: SparseCodes of the kept codes, each row's in column order, with its length.
        Inference: dense codes z2 * (z2 > threshold)."""
        if not self.training:
            keep = z2 > self.threshold.clamp_min(0)
            return z2 * keep
        n_keep = self.k * z2.shape[0] * distributed.world_size()
        counts, values, columns = _candidates(z2, n_keep)
        flat = distributed.all_gather_cat(values)
        threshold = flat.topk(min(n_keep, flat.numel()), sorted=False).values.min()
        keep = (values >= threshold) & (values > 0)
        kept_before = F.pad(keep.cumsum(0), (1, 0))  # kept_before[i]: kept candidates before candidate i
        ends = counts.cumsum(0)
        lengths = kept_before[ends] - kept_before[ends - counts]
        width = distributed.max_int(max(1, int(lengths.max())))  # at least one (zero) code per row
        with torch.no_grad():
            smallest = threshold.clamp_min(0).to(self.threshold.dtype)
            self.threshold.copy_(
                smallest if self.threshold < 0 else self.momentum * self.threshold + (1 - self.momentum) * smallest
            )
        return ragged_codes(lengths, values[keep], columns[keep], width)


def _candidates(z2: torch.Tensor, n_keep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`at_least(z2, low)` for a bound low that at least n_keep entries of the global batch reach, so that
    every kept entry is among these candidates, and that not many more reach: about 2 * n_keep.

    low is read from an evenly spread sample of about 2^18 entries (its stride shares no factor with
    the row length, so the sample visits every unit); where too few reach it, a lower bound is tried.
    """
    flat = z2.reshape(-1)
    stride = max(1, flat.numel() >> 18)
    while math.gcd(stride, z2.shape[1]) != 1:
        stride += 1
    sample = flat[::stride]
    share = n_keep / (flat.numel() * distributed.world_size())  # the kept share of the entries
    take = 2 * share * sample.numel() + 64
    while True:
        low = sample.new_tensor(-math.inf)
        if take < sample.numel():
            low = sample.topk(int(take), sorted=False).values.min()
        low = distributed.all_gather_cat(low[None]).min()  # one bound for every process
        counts, values, columns = at_least(z2, float(low))
        reached = int(distributed.all_reduce_sum(counts.sum()[None]))
        if reached >= n_keep or low == -math.inf:
            return counts, values, columns
        take *= 4
