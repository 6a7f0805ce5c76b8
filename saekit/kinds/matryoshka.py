"""Matryoshka BatchTopK dictionaries (Bussmann et al. 2025, arXiv 2503.17547): nested dictionaries
in one.

The first m_1 < m_2 < ... < m_G = n_hidden units (the prefixes) are each trained to reconstruct
the input on their own, from the same BatchTopK codes h:

    x_hat_g = h[:, :m_g] W2[:, :m_g]^T + b2                     (g = 1..G; x_hat_G is the whole dictionary's)
    loss = sum_g 0.5 mean_i ||x_hat_g,i - y_i||^2 + aux_coefficient * AuxK

so the first units must carry what matters most on their own: general features land early,
their specialisations later, and a parent's direction is not absorbed into its children's
atoms, since the small prefixes that hold the parent do not hold the children. The loss sums
the prefixes' errors as the paper and SAELens do (dictionary_learning averages them, a factor G).

The loss terms report it so: `reconstruction` is the whole dictionary's error (what FVU and the
history measure), `auxiliary` the smaller prefixes' errors plus AuxK; their sum is the objective.
Selection, AuxK and the inference threshold are BatchTopK's (`saekit.kinds.batchtopk`), and the
prefixes cost one more embedding bag: the selected codes are sorted by prefix group within each
row, each (row, group) is one bag, and a cumulative sum over groups gives every x_hat_g.

In evaluation the codes are BatchTopK's thresholded ones, and the dictionary is saved for SAELens
as BatchTopK is (a "jumprelu" SAE whose thresholds are all the inference threshold), which is
how SAELens saves its Matryoshka BatchTopK SAEs.
"""

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..kernels.sparse import SparseCodes, sparse_encode
from .base import OUTPUTS, Codes, Output
from .batchtopk import BatchTopK, BatchTopKConfig
from .topk import auxk_loss


@dataclass
class MatryoshkaConfig(BatchTopKConfig):
    kind: ClassVar[str] = "matryoshka"

    matryoshka_prefixes: str = "auto"
    """Widths of the nested dictionaries that each learn to reconstruct, ascending, e.g. '32,128' (the whole width
    always comes last); 'auto': n_hidden/16, n_hidden/4 and n_hidden."""

    def prefixes(self) -> list[int]:
        """The prefix widths m_1 < ... < m_G = n_hidden."""
        if self.matryoshka_prefixes == "auto":
            return sorted({self.n_hidden // 16, self.n_hidden // 4, self.n_hidden} - {0})
        try:
            widths = [int(part) for part in self.matryoshka_prefixes.split(",")]
        except ValueError:
            widths = [0]  # refused below
        widths += [] if widths[-1] == self.n_hidden else [self.n_hidden]
        if min(widths) < 1 or any(a >= b for a, b in zip(widths, widths[1:])):
            raise UserError(
                f"--matryoshka-prefixes {self.matryoshka_prefixes!r} is not a list of ascending widths below "
                f"--n-hidden = {self.n_hidden}, such as '32,128', or 'auto'"
            )
        return widths

    def problems(self) -> list[str]:
        problems = super().problems()
        try:
            self.prefixes()
        except UserError as e:
            problems.append(str(e))
        return problems


class Matryoshka(BatchTopK):
    Config = MatryoshkaConfig
    cfg: MatryoshkaConfig

    def forward(
        self, x: torch.Tensor, target: torch.Tensor | None = None, *, dead: torch.Tensor | None = None
    ) -> Output:
        cfg = self.cfg
        aux = None
        if self.training:  # BatchTopK's fused k-sparse encoder, with the AuxK codes of dead units
            h, aux = sparse_encode(x, self.W1, self.b1, self.subtracted_b2, cfg.k, self.selection(), dead, cfg.aux_k)
        else:  # the inference threshold: dense codes
            h = self.sparsify(self.pre_activations(x))
        x_hats = self.prefix_reconstructions(h, x)
        error = self.error(x_hats[-1], x, target)
        errors = (self.error(x_hat, x, target) for x_hat in x_hats[:-1])  # the smaller prefixes'
        inner = sum((0.5 * e.pow(2).sum() / e.shape[0] for e in errors), error.new_zeros(()))
        if aux is not None:
            inner = inner + cfg.aux_coefficient * auxk_loss(error.detach(), aux, self.W2)
        return self.output(x_hats[-1], h, error, auxiliary=inner)

    def prefix_reconstructions(self, h: Codes, x: torch.Tensor | None = None) -> torch.Tensor:
        """(G, batch, n_outputs): x_hat_g from the codes of the first m_g units, for each prefix g (a
        skip-transcoder's skip term, which needs the input x, is in every prefix's)."""
        widths = self.cfg.prefixes()
        atoms = self.W2.t()  # (n_hidden, n_outputs), one atom per row
        if isinstance(h, SparseCodes):
            parts = _group_sums(h, atoms, widths)
        else:
            bounds = [0, *widths]
            parts = torch.stack([h[:, a:b] @ atoms[a:b] for a, b in zip(bounds, bounds[1:])], 1)
        offset = self.output_offset(x)  # (n_outputs,) or (batch, n_outputs)
        return OUTPUTS[self.cfg.output](offset.unsqueeze(-2) + parts.cumsum(1)).transpose(0, 1)

    def kind_summary(self) -> str:
        return f"{super().kind_summary()}, prefixes {','.join(map(str, self.cfg.prefixes()))}"

    @classmethod
    def from_saelens(cls, cfg: dict, tensors: dict, where: str) -> dict | None:
        """A "jumprelu" SAE that saekit exported from a matryoshka dictionary: k and the prefixes from its metadata."""
        settings = super().from_saelens(cfg, tensors, where)
        if settings is None:
            return None
        prefixes = cfg["metadata"]["saekit_architecture"].get("matryoshka_prefixes")
        return settings | ({"matryoshka_prefixes": prefixes} if isinstance(prefixes, str) else {})

    dictionary_learning_class = "MatryoshkaBatchTopKSAE"

    def dictionary_learning_buffers(self) -> dict[str, torch.Tensor]:
        widths = self.cfg.prefixes()
        sizes = torch.tensor([b - a for a, b in zip([0, *widths], widths)])  # its group_sizes (int64)
        return super().dictionary_learning_buffers() | {"group_sizes": sizes}

    @classmethod
    def from_dictionary_learning(cls, trainer: dict, state: dict, where: str) -> dict | None:
        """k (BatchTopK's), and the prefixes: the cumulative sums of its group_sizes."""
        settings = super().from_dictionary_learning(trainer, state, where)
        if settings is None:
            return None
        sizes = state.get("group_sizes")
        if not isinstance(sizes, torch.Tensor) or sizes.ndim != 1 or sizes.is_floating_point() or (sizes < 1).any():
            raise UserError(f"{where}: group_sizes must be whole numbers >= 1 (got {sizes!r}).")
        return settings | {"matryoshka_prefixes": ",".join(str(int(m)) for m in sizes.cumsum(0))}


def _group_sums(h: SparseCodes, atoms: torch.Tensor, widths: list[int]) -> torch.Tensor:
    """(batch, G, n_inputs): sum_j values[b, j] atoms[indices[b, j]] over the codes of each group
    [m_(g-1), m_g), as one embedding bag per (row, group) after sorting the codes (not the rows'
    padding beyond their lengths) by row and group."""
    batch, width = h.values.shape
    n_groups = len(widths)
    row = torch.arange(batch, device=h.indices.device)[:, None].expand(batch, width)
    bounds = torch.tensor(widths[:-1], device=h.indices.device)
    bag = row * n_groups + torch.bucketize(h.indices, bounds, right=True)  # (batch, width) in [0, batch * G)
    if h.lengths is not None:  # only the codes
        codes = torch.arange(width, device=row.device) < h.lengths[:, None]
        bag, values, indices = bag[codes], h.values[codes], h.indices[codes]
    else:
        bag, values, indices = bag.reshape(-1), h.values.reshape(-1), h.indices.reshape(-1)
    bag, order = bag.sort(stable=True)
    offsets = torch.searchsorted(bag, torch.arange(batch * n_groups, device=bag.device))
    sums = F.embedding_bag(indices[order], atoms, offsets, mode="sum", per_sample_weights=values[order].to(atoms.dtype))
    return sums.view(batch, n_groups, -1)
