"""The sparse autoencoder every kind shares: encode, sparsify, decode, and its loss terms.

    x (batch, n_inputs) --encode--> z2 (batch, n_hidden) --sparsify--> h (codes) --decode--> x_hat
    loss = reconstruction(x_hat, y) + sparsity(h) + auxiliary + weight decay

Parameters follow UFLDL's names: z2 = x W1^T + b1, h = f(z2), x_hat = g(h W2^T + b2), with
W1 (n_hidden, n_inputs) and W2 (n_inputs, n_hidden). A kind (one file in this folder) is a
subclass that chooses the sparsify step f and the penalty on the codes; its settings are a
`ModelConfig` subclass. The forward pass returns the loss terms (`LossTerms`), so a trainer
computes `sum(out.terms)` and never asks which kind it holds.

Modes. In training mode a kind may use statistics of the training stream (the sigmoid kind's
running rho_hat, BatchTopK's batch-wide selection). In evaluation mode its loss is a
deterministic function of the batch given: that is what metrics report and what full-batch
L-BFGS minimises (its line searches need the same function at every evaluation).

Modern dictionaries subtract the decoder bias b2 before encoding (`pre_bias`): the encoder sees
x - b2 and the decoder adds b2 back. It is folded into the encoder's bias, b1 - W1 b2, so the
encoder stays one fused matrix product.

W2 is stored as the transpose of a contiguous (n_hidden, n_inputs) tensor: each hidden unit's
decoder column ("dictionary atom") is then one contiguous row in memory, which is what sparse
decoding and column normalisation want, and its flat storage is exactly MATLAB's W2(:).

Transcoders. Built with `n_outputs`, a model reads one place of a network (x, n_inputs wide) and
reconstructs another (y, n_outputs wide: an MLP's output from its input): W2 is then (n_outputs,
n_hidden) and b2 (n_outputs,), and b2 is never subtracted from x (it lives in y's space). With
`skip`, a linear skip connection W_skip (n_outputs, n_inputs), zero at the start, adds x W_skip^T
to the output (a skip-transcoder: the sparse codes need only explain what a linear map cannot).
"""

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..kernels.sparse import SparseCodes, dense_codes, row_support, sparse_decode
from ..settings import Settings
from .penalties import weight_decay

Codes = torch.Tensor | SparseCodes  # dense (batch, n_hidden), or k per row for the TopK family
SPARSE_DECODE_SHARE = 8  # dense codes decode sparsely when no row has more than n_hidden / this in use
OUTPUTS = {"sigmoid": torch.sigmoid, "linear": lambda z: z}


@dataclass
class ModelConfig(Settings):
    """The settings every kind has; a kind's own settings are the fields of its subclass."""

    kind: ClassVar[str] = ""  # the registry's name of the kind
    minibatch_only: ClassVar[bool] = False  # True where full-batch L-BFGS does not apply

    n_hidden: int = 25
    """Number of hidden units: the size of the sparse code, the dictionary's width."""
    output: Literal["sigmoid", "linear"] = "linear"
    """Output activation: 'sigmoid' (UFLDL; inputs must lie in [0, 1]) or 'linear'."""
    pre_bias: bool = False
    """Subtract the decoder bias b2 from the input before encoding (modern dictionaries; a transcoder never does,
    its b2 lives in the output's space)."""
    tied_init: bool = False
    """Start the decoder as the encoder's transpose, with unit-norm columns (a transcoder's: at 0)."""
    skip: bool = False
    """Transcoder: add a linear skip connection x W_skip^T from the input to the output (a skip-transcoder)."""
    weight_decay: float = 0.0
    """lambda: weight decay (lambda/2)(||W1||^2 + ||W2||^2); biases carry none."""

    @classmethod
    def optim_defaults(cls, n_hidden: int, k: int | None) -> dict:
        """Optimisation settings a run of this kind derives from its width (and k) where none are given."""
        return {}

    def problems(self) -> list[str]:
        """The common checks; a kind's config extends them with its own."""
        return self.at_least(1, "n_hidden") + self.at_least(0, "weight_decay") + self.finite("weight_decay")

    def to_dict(self) -> dict:
        return {"kind": self.kind, **dataclasses.asdict(self)}


class LossTerms(NamedTuple):
    """The loss on a batch, term by term; their sum is what training minimises.

    Each is a 0-d tensor whose value is the reported number; where a kind estimates a gradient
    (a running rho_hat, a straight-through estimator), the tensor carries that gradient.
    """

    reconstruction: torch.Tensor  # 0.5 mean_i ||x_hat_i - y_i||^2
    sparsity: torch.Tensor  # the kind's penalty on the codes: beta KL, L1, L0, contractive; 0 for TopK
    auxiliary: torch.Tensor  # the kind's auxiliary loss (AuxK for the TopK family), else 0
    weight_decay: torch.Tensor  # (lambda/2)(||W1||^2 + ||W2||^2)

    def numbers(self) -> list[float]:
        """The terms' values as plain numbers, in order."""
        return [float(t.detach()) for t in self]

    @property
    def total(self) -> float:
        """The loss: the sum of the terms' values."""
        return sum(self.numbers())


class Output(NamedTuple):
    x_hat: torch.Tensor | None  # (batch, n_outputs) reconstruction; None from a closed form, which reuses its buffer
    codes: Codes  # the codes h
    terms: LossTerms


class SparseAutoencoder(nn.Module):
    """Base of every kind: W1, b1, W2, b2 and what they compute. Build one with `saekit.kinds.build`."""

    Config: ClassVar[type[ModelConfig]] = ModelConfig

    def __init__(
        self,
        cfg: ModelConfig,
        n_inputs: int,
        *,
        n_outputs: int | None = None,
        dtype: torch.dtype = torch.float64,
        device: str | torch.device = "cpu",
        seed: int | None = 0,
    ):
        super().__init__()
        if n_inputs < 1 or (n_outputs is not None and n_outputs < 1):
            raise UserError(f"n_inputs and n_outputs must be at least 1 (got {n_inputs} and {n_outputs}).")
        if cfg.skip and n_outputs is None:
            raise UserError(
                "--skip makes a skip-transcoder, which needs targets to reconstruct: give --target-key "
                "(the targets of a harvest with --target-layer or --target-hook-module), or leave --skip out."
            )
        self.cfg, self.n_inputs, self.n_hidden = cfg, n_inputs, cfg.n_hidden
        self.transcoder = n_outputs is not None
        self.n_outputs = n_inputs if n_outputs is None else n_outputs
        kw: dict[str, Any] = dict(dtype=dtype, device=device)
        self.W1 = nn.Parameter(torch.empty(cfg.n_hidden, n_inputs, **kw))
        self.b1 = nn.Parameter(torch.zeros(cfg.n_hidden, **kw))
        self.W2 = nn.Parameter(torch.empty(cfg.n_hidden, self.n_outputs, **kw).t())
        self.b2 = nn.Parameter(torch.zeros(self.n_outputs, **kw))
        self.W_skip = nn.Parameter(torch.zeros(self.n_outputs, n_inputs, **kw)) if cfg.skip else None
        self.add_kind_modules(dtype=dtype, device=device)
        self.reset_parameters(seed)

    def add_kind_modules(self, dtype: torch.dtype, device) -> None:
        """Create the kind's own parameters and buffers (thresholds). Override in a kind."""

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = 0) -> None:
        """UFLDL's initializeParameters: W ~ U(-r, r) with r = sqrt(6 / (n_in + n_hidden + 1)), b = 0.

        With tied_init the decoder starts as the encoder's transpose, with unit-norm columns
        (the initialisation of TopK and JumpReLU dictionaries); a transcoder's decoder, which
        cannot be a transpose, starts at 0 instead, as sparsify starts its transcoders: on MiniLM's
        MLP (README, "Transcoders") that left 38% of the units silent where random unit columns
        left 73%. W_skip starts at 0.
        """
        gen = torch.Generator(device="cpu").manual_seed(0 if seed is None else seed)
        r = math.sqrt(6.0 / (self.n_inputs + self.n_hidden + 1))
        for W in (self.W1, self.W2):
            W.copy_((torch.rand(W.shape, generator=gen, dtype=torch.float64) * 2 - 1) * r)
        if self.cfg.tied_init and self.transcoder:
            self.W2.zero_()
        elif self.cfg.tied_init:
            self.W2.t().copy_(F.normalize(self.W1, dim=1))
            self.W1.copy_(self.W2.t())
        self.b1.zero_()
        self.b2.zero_()
        if self.W_skip is not None:
            self.W_skip.zero_()

    # --- what every kind computes the same way

    def encoder_bias(self) -> torch.Tensor:
        """b1, or b1 - W1 b2 when the decoder bias is subtracted before encoding: a vector, in the parameters'
        precision even under autocast (which would cast all of W1 for it: 8 ms at width 16,384, d 512)."""
        if not self.subtracts_b2:
            return self.b1
        with torch.autocast(self.b1.device.type, enabled=False):
            return self.b1 - self.W1 @ self.b2

    @property
    def subtracted_b2(self) -> torch.Tensor | None:
        """b2 where the encoder sees x - b2 (see subtracts_b2), else None: for the k-sparse encoder."""
        return self.b2 if self.subtracts_b2 else None

    @property
    def subtracts_b2(self) -> bool:
        """Whether the encoder sees x - b2: pre_bias, in an autoencoder (a transcoder's b2 is in y's space)."""
        return self.cfg.pre_bias and not self.transcoder

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """z2 = (x - b2 if pre_bias) W1^T + b1: (batch, n_inputs) -> (batch, n_hidden), one fused matmul."""
        return torch.addmm(self.encoder_bias(), x, self.W1.t())

    def encode(self, x: torch.Tensor) -> Codes:
        """The codes h of x (batch, n_inputs)."""
        return self.sparsify(self.pre_activations(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The codes of x as a dense (batch, n_hidden) tensor: the learned features."""
        return self.dense_codes(self.encode(x))

    def decode(self, h: Codes, x: torch.Tensor | None = None) -> torch.Tensor:
        """x_hat = g(h W2^T + b2 (+ x W_skip^T)) (batch, n_outputs); SparseCodes decode at a cost
        proportional to k, not n_hidden. A skip-transcoder needs the input x (batch, n_inputs) too."""
        offset = self.output_offset(x)
        if isinstance(h, SparseCodes):
            return OUTPUTS[self.cfg.output](sparse_decode(h.values, h.indices, self.W2.t(), lengths=h.lengths) + offset)
        return OUTPUTS[self.cfg.output](torch.addmm(offset, h, self.W2.t()))

    def output_offset(self, x: torch.Tensor | None) -> torch.Tensor:
        """What the output adds to the decoded codes: b2 (n_outputs,), or for a skip-transcoder
        b2 + x W_skip^T (batch, n_outputs)."""
        if self.W_skip is None:
            return self.b2
        if x is None:
            raise UserError("a skip-transcoder's output needs its input x besides the codes: decode(h, x).")
        return torch.addmm(self.b2, x, self.W_skip.t())

    def forward(
        self, x: torch.Tensor, target: torch.Tensor | None = None, *, dead: torch.Tensor | None = None
    ) -> Output:
        """Encode, sparsify, decode, and the loss terms against target (default: x itself).

        `dead` (n_hidden,) bool marks units that have not fired for long (kinds with an
        auxiliary loss for them use it; others ignore it).
        """
        z2 = self.pre_activations(x)
        h = self.sparsify(z2)
        x_hat = self.decode(self._sparse_view(h, z2), x)
        return self.output(x_hat, h, self.error(x_hat, x, target), self.penalty(h, z2))

    def _sparse_view(self, h: Codes, z2: torch.Tensor) -> Codes:
        """Dense codes h as SparseCodes where few are in the kind's decode support, so that decoding and its
        gradients cost batch x (codes in use) x n_inputs instead of batch x n_hidden x n_inputs.

        The view is exact: it gathers h at the support (padded to the widest row), and the codes
        outside it have no gradient (see decode_support).
        """
        support = self.decode_support(z2)
        if support is None or not isinstance(h, torch.Tensor):
            return h
        widest = int(support.sum(1).max())
        if widest * SPARSE_DECODE_SHARE > self.n_hidden:
            return h
        indices = row_support(support, max(widest, 1))
        return SparseCodes(h.gather(1, indices), indices)

    def decode_support(self, z2: torch.Tensor) -> torch.Tensor | None:
        """(batch, n_hidden) bool: the codes whose gradient can be non-zero (where the kind's activation
        has a slope, or its threshold a straight-through window); None decodes densely. Override in a
        kind whose dense codes are mostly zero."""
        return None

    def error(self, x_hat: torch.Tensor, x: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        """x_hat - y (batch, n_outputs), in the target's dtype (x_hat may be lower under autocast)."""
        if target is None and self.transcoder:
            raise UserError(
                "a transcoder reconstructs a target, not its input: call model(x, y), or decode(encode(x), x) "
                "for its output alone"
            )
        y = x if target is None else target
        return x_hat.to(y.dtype) - y

    def output(
        self,
        x_hat,
        h: Codes,
        error: torch.Tensor,
        sparsity: torch.Tensor | None = None,
        auxiliary: torch.Tensor | None = None,
    ) -> Output:
        """The forward pass's Output: the reconstruction error's term, the kind's terms, weight decay."""
        zero = error.new_zeros(())
        lambda_ = self.cfg.weight_decay
        decay = weight_decay(lambda_, self.W1, self.W2) if lambda_ else zero
        reconstruction = 0.5 * error.pow(2).sum() / error.shape[0]
        terms = LossTerms(
            reconstruction, zero if sparsity is None else sparsity, zero if auxiliary is None else auxiliary, decay
        )
        return Output(x_hat, h, terms)

    def compute_gradients(
        self,
        x: torch.Tensor,
        target: torch.Tensor | None = None,
        *,
        dead: torch.Tensor | None = None,
        autocast: torch.dtype | None = None,
    ) -> Output:
        """Set each parameter's .grad to the gradient of this batch's loss, sum(terms); return the Output.

        The kind's closed form where it has one (not under autocast), else autograd through
        forward, with the forward pass in the autocast dtype if one is given.
        """
        for p in self.parameters():
            p.grad = None
        if autocast is None:
            out = self.closed_form_gradients(x, target)
            if out is not None:
                return out
        with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
            out = self(x, target, dead=dead)
        sum(out.terms).backward()
        return out

    # --- what a kind chooses

    def sparsify(self, z2: torch.Tensor) -> Codes:
        """h = f(z2): the kind's activation."""
        raise NotImplementedError

    def penalty(self, h: Codes, z2: torch.Tensor) -> torch.Tensor | None:
        """The kind's sparsity term on the codes h (and pre-activations z2); None for none."""
        return None

    def closed_form_gradients(self, x: torch.Tensor, target: torch.Tensor | None) -> Output | None:
        """A kind's fast path: set each parameter's .grad for this batch's loss without autograd,
        and return the Output (terms as numbers); None where the kind has none for its settings."""
        return None

    def activity(self, h: Codes) -> torch.Tensor:
        """(batch, n_hidden): how much each unit is active in each example, for feature density:
        1 where a code is positive. (A sigmoid unit's activation is itself a firing rate.)"""
        return (self.dense_codes(h) > 0).to(torch.float64)

    def training_state(self) -> dict:
        """Statistics of the training stream the kind keeps outside its weights (for resume)."""
        return {}

    def load_training_state(self, state: dict) -> None:
        """Restore what training_state() returned."""

    def history_stats(self) -> dict[str, float]:
        """Numbers the kind adds to each row of the training history."""
        return {}

    def describe(self) -> str:
        """One line for the console: the shape and the kind's settings."""
        skip = f", skip {self.n_inputs} -> {self.n_outputs}" if self.W_skip is not None else ""
        what = "transcoder " if self.transcoder else ""
        return (
            f"{what}{self.n_inputs} -> {self.n_hidden} ({self.kind_summary()}) -> {self.n_outputs} "
            f"({self.cfg.output}{skip})"
        )

    def kind_summary(self) -> str:
        return self.cfg.kind

    # --- SAELens's format (see saekit.interop.saelens); a kind without an equivalent keeps None

    saelens_architecture: ClassVar[str | None] = None

    def saelens_fields(self) -> dict:
        """Fields of SAELens's cfg.json beyond the common ones."""
        return {}

    def saelens_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors of SAELens's file beyond W_enc, b_enc, W_dec, b_dec."""
        return {}

    @classmethod
    def from_saelens(cls, cfg: dict, tensors: dict, where: str) -> dict | None:
        """This kind's settings for a SAELens cfg.json it reads (tensors may be adjusted in place), or None."""
        return None

    def load_saelens_tensors(self, tensors: dict) -> None:
        """Load the tensors of saelens_tensors() back."""

    # --- sparsify's format (see saekit.interop.sparsify); a kind without an equivalent keeps None

    sparsify_activation: ClassVar[str | None] = None

    def sparsify_fields(self) -> dict:
        """Fields of sparsify's cfg.json beyond d_in, num_latents and activation (k)."""
        return {}

    @classmethod
    def from_sparsify(cls, cfg: dict, where: str) -> dict | None:
        """This kind's settings for a sparsify cfg.json (missing fields at sparsify's defaults) it reads, or None."""
        return None

    # --- dictionary_learning's format (see saekit.interop.dictionary_learning); None: no equivalent

    dictionary_learning_class: ClassVar[str | None] = None

    def dictionary_learning_buffers(self) -> dict[str, torch.Tensor]:
        """Entries of ae.pt beyond the encoder's and decoder's weights and biases (k, threshold)."""
        return {}

    @classmethod
    def from_dictionary_learning(cls, trainer: dict, state: dict, where: str) -> dict | None:
        """This kind's settings for an ae.pt whose config.json says `trainer` (its dict_class), or None."""
        return None

    def load_dictionary_learning_buffers(self, state: dict) -> None:
        """Load the entries of dictionary_learning_buffers() back."""

    # --- shared utilities

    @property
    def kind(self) -> str:
        return self.cfg.kind

    def dense_codes(self, h: Codes) -> torch.Tensor:
        """(batch, n_hidden) codes, whatever form the activation produced."""
        return dense_codes(h.values, h.indices, self.n_hidden) if isinstance(h, SparseCodes) else h

    @torch.no_grad()
    def fold_input_scale_(self, scale: float) -> "SparseAutoencoder":
        """Make this model, trained on scale * x, take raw inputs x (linear output only), in place:
        W1 -> scale W1, W2 -> W2 / scale, b2 -> b2 / scale; the codes are unchanged."""
        if scale != 1.0:
            self.W1.mul_(scale)
            self.W2.div_(scale)
            self.b2.div_(scale)
        return self

    def folded(self, scale: float) -> "SparseAutoencoder":
        """A copy of this model for raw inputs (see fold_input_scale_)."""
        return copy.deepcopy(self).fold_input_scale_(scale)

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Scale each decoder column W2[:, j] to unit norm."""
        W = self.W2.t()
        W.div_(W.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_parallel_gradient_(self) -> None:
        """Project each decoder column's gradient off the column, so a step moves it along the unit sphere."""
        assert self.W2.grad is not None, "compute the gradients first"
        W, G = self.W2, self.W2.grad  # (n_outputs, n_hidden): column j is atom j
        # In place, with no (n_outputs, n_hidden) temporaries: einsum's batched dot products took 6 ms at
        # width 16,384, d 512, where linalg.vecdot multiplies into a temporary and sums it (16 ms).
        G.addcmul_(W, torch.einsum("ij,ij->j", G, W), value=-1)

    @property
    def widths(self) -> tuple[int, int | None]:
        """(n_inputs, n_outputs), n_outputs None for an autoencoder: the widths of the data it takes."""
        return self.n_inputs, self.n_outputs if self.transcoder else None

    def architecture(self) -> dict:
        """What it takes to rebuild this model (saved beside its weights): n_inputs (and a transcoder's
        n_outputs) and the settings."""
        outputs = {"n_outputs": self.n_outputs} if self.transcoder else {}
        return {"n_inputs": self.n_inputs, **outputs, **self.cfg.to_dict()}

    def extra_repr(self) -> str:
        return self.describe()
