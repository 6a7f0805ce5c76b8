"""The sparse autoencoder: encode, sparsify, decode.

    x (batch, n_inputs) --encode--> z2 (batch, n_hidden) --sparsify--> h (codes) --decode--> x_hat

Parameters follow UFLDL's names: z2 = x W1^T + b1, h = f(z2), x_hat = g(h W2^T + b2), with
W1 (n_hidden, n_inputs) and W2 (n_inputs, n_hidden). The kinds of sparse autoencoder differ only
in the activation f (the sparsify step) and the penalty added to the loss:

    sigmoid    UFLDL's autoencoder (KL penalty), and the lectures' variants
    relu       ReLU codes (L1 penalty, optionally weighted by decoder column norms)
    topk       each example's k largest codes (OpenAI's TopK autoencoder)
    batchtopk  the batch's k * batch largest codes; a threshold at inference
    jumprelu   ReLU above a learned per-unit threshold (L0 penalty)

Modern dictionaries subtract the decoder bias b2 before encoding (`pre_bias`): the encoder sees
x - b2 and the decoder adds b2 back. It is folded into the encoder's bias, b1 - W1 b2, so the
encoder stays one fused matrix product.

W2 is stored as the transpose of a contiguous (n_hidden, n_inputs) tensor: each hidden unit's
decoder column ("dictionary atom") is then one contiguous row in memory, which is what sparse
decoding and column normalisation want, and its flat storage is exactly MATLAB's W2(:).
"""

import copy
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .activations import BatchTopK, JumpReLU, SparseCodes, sparse_encode
from .errors import UserError
from .sparse_decode import dense_codes, sparse_decode

ACTIVATIONS = ("sigmoid", "relu", "topk", "batchtopk", "jumprelu")
SPARSE_ACTIVATIONS = ("topk", "batchtopk")  # codes travel as SparseCodes: k per row
OUTPUTS = {"sigmoid": torch.sigmoid, "linear": lambda z: z}


class ForwardOutput(NamedTuple):
    x_hat: torch.Tensor  # (batch, n_inputs) reconstruction
    h: torch.Tensor | SparseCodes  # codes: dense (batch, n_hidden), or k per row for topk / batchtopk
    z2: torch.Tensor | None  # (batch, n_hidden) encoder pre-activations (None for topk / batchtopk)
    aux: SparseCodes | None = None  # AuxK codes of dead units (topk / batchtopk, when asked for)


class SparseAutoencoder(nn.Module):
    def __init__(
        self,
        n_inputs: int,
        n_hidden: int,
        activation: str = "sigmoid",
        output: str = "sigmoid",
        dtype: torch.dtype = torch.float64,
        device: str | torch.device = "cpu",
        seed: int | None = 0,
        k: int = 32,
        pre_bias: bool = False,
        tied_init: bool = False,
        jumprelu_threshold: float = 0.001,
        jumprelu_bandwidth: float = 0.001,
    ):
        super().__init__()
        if n_inputs < 1 or n_hidden < 1:
            raise UserError(f"n_inputs and n_hidden must be at least 1 (got {n_inputs}, {n_hidden}).")
        if activation not in ACTIVATIONS:
            raise UserError(f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}.")
        if output not in OUTPUTS:
            raise UserError(f"unknown output {output!r}; choose one of {sorted(OUTPUTS)}.")
        if activation in SPARSE_ACTIVATIONS and not 1 <= k <= n_hidden:
            raise UserError(f"k must lie between 1 and n_hidden = {n_hidden} (got {k}).")
        self.n_inputs, self.n_hidden = n_inputs, n_hidden
        self.activation, self.output, self.k, self.pre_bias = activation, output, k, pre_bias
        kw = dict(dtype=dtype, device=device)
        self.W1 = nn.Parameter(torch.empty(n_hidden, n_inputs, **kw))
        self.b1 = nn.Parameter(torch.zeros(n_hidden, **kw))
        self.W2 = nn.Parameter(torch.empty(n_hidden, n_inputs, **kw).t())
        self.b2 = nn.Parameter(torch.zeros(n_inputs, **kw))
        if activation == "batchtopk":
            self.batch_topk = BatchTopK(k, dtype=dtype)
        if activation == "jumprelu":
            self.jumprelu = JumpReLU(n_hidden, jumprelu_threshold, jumprelu_bandwidth, **kw)
        self.reset_parameters(seed, tied_init)

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = 0, tied_init: bool = False) -> None:
        """UFLDL's initializeParameters: W ~ U(-r, r) with r = sqrt(6 / (n_in + n_hidden + 1)), b = 0.

        With tied_init the decoder starts as the encoder's transpose, with unit-norm columns
        (the initialisation of TopK and JumpReLU dictionaries).
        """
        gen = torch.Generator(device="cpu").manual_seed(0 if seed is None else seed)
        r = math.sqrt(6.0 / (self.n_inputs + self.n_hidden + 1))
        for W in (self.W1, self.W2):
            W.copy_((torch.rand(W.shape, generator=gen, dtype=torch.float64) * 2 - 1) * r)
        if tied_init:
            self.W2.t().copy_(F.normalize(self.W1, dim=1))
            self.W1.copy_(self.W2.t())
        self.b1.zero_()
        self.b2.zero_()

    def encoder_bias(self) -> torch.Tensor:
        """b1, or b1 - W1 b2 when the decoder bias is subtracted before encoding."""
        return self.b1 - self.W1 @ self.b2 if self.pre_bias else self.b1

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """z2 = (x - b2 if pre_bias) W1^T + b1: (batch, n_inputs) -> (batch, n_hidden), one fused matmul."""
        return torch.addmm(self.encoder_bias(), x, self.W1.t())

    def sparsify(self, z2: torch.Tensor):
        """h = f(z2): dense codes, or SparseCodes for topk / batchtopk."""
        if self.activation == "sigmoid":
            return torch.sigmoid(z2)
        if self.activation == "relu":
            return torch.relu(z2)
        if self.activation == "jumprelu":
            return self.jumprelu(z2)
        if self.activation == "batchtopk":
            return self.batch_topk(z2)
        values, indices = z2.topk(self.k, dim=1, sorted=False)
        return SparseCodes(values.relu(), indices)

    def decode(self, h) -> torch.Tensor:
        """x_hat = g(h W2^T + b2); SparseCodes decode at a cost proportional to k, not n_hidden."""
        if isinstance(h, SparseCodes):
            return OUTPUTS[self.output](sparse_decode(h.values, h.indices, self.W2.t(), self.b2))
        return OUTPUTS[self.output](torch.addmm(self.b2, h, self.W2.t()))

    def forward(self, x: torch.Tensor, dead: torch.Tensor | None = None, aux_k: int = 0) -> ForwardOutput:
        """Encode, sparsify, decode. For topk / batchtopk, `dead` (n_hidden,) bool and aux_k > 0
        also return the aux_k largest pre-activations among dead units (for the AuxK loss)."""
        if self.activation in SPARSE_ACTIVATIONS:
            select = self.batch_topk if self.activation == "batchtopk" and self.training else None
            if self.activation == "batchtopk" and not self.training:
                h = self.batch_topk(self.encode(x))
                return ForwardOutput(self.decode(h), h, None)
            h, aux = sparse_encode(x, self.W1, self.encoder_bias(), self.k, select, dead, aux_k)
            return ForwardOutput(self.decode(h), h, None, aux)
        z2 = self.encode(x)
        h = self.sparsify(z2)
        return ForwardOutput(self.decode(h), h, z2)

    def dense_codes(self, h) -> torch.Tensor:
        """(batch, n_hidden) codes, whatever form the activation produced."""
        return dense_codes(h.values, h.indices, self.n_hidden) if isinstance(h, SparseCodes) else h

    @torch.no_grad()
    def fold_input_scale(self, scale: float) -> "SparseAutoencoder":
        """A copy for raw inputs x of this model trained on scale * x (linear output only):
        W1 -> scale W1, W2 -> W2 / scale, b2 -> b2 / scale; codes are unchanged."""
        folded = copy.deepcopy(self)
        if scale != 1.0:
            folded.W1.mul_(scale)
            folded.W2.div_(scale)
            folded.b2.div_(scale)
        return folded

    def architecture(self) -> dict:
        """What it takes to rebuild this model (saved beside its weights)."""
        arch = {"n_inputs": self.n_inputs, "n_hidden": self.n_hidden, "activation": self.activation,
                "output": self.output, "pre_bias": self.pre_bias}
        if self.activation in SPARSE_ACTIVATIONS:
            arch["k"] = self.k
        if self.activation == "jumprelu":
            arch["jumprelu_bandwidth"] = self.jumprelu.bandwidth
        return arch

    def extra_repr(self) -> str:
        k = f", k={self.k}" if self.activation in SPARSE_ACTIVATIONS else ""
        return f"{self.n_inputs} -> {self.n_hidden} ({self.activation}{k}) -> {self.n_inputs} ({self.output})"
