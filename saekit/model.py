"""The sparse autoencoder: encode, sparsify, decode.

    x (batch, n_inputs) --encode--> z2 (batch, n_hidden) --sparsify--> a2 = h --decode--> x_hat

Parameters follow UFLDL's names: z2 = x W1^T + b1, a2 = f(z2), x_hat = g(a2 W2^T + b2), with
W1 (n_hidden, n_inputs) and W2 (n_inputs, n_hidden). The kinds of sparse autoencoder differ only
in the `activation` (the sparsify step) and the penalty added to the loss (`saekit.penalties`).

W2 is stored as the transpose of a contiguous (n_hidden, n_inputs) tensor: each hidden unit's
decoder column ("dictionary atom") is then one contiguous row in memory, which is what sparse
decoding and column normalisation want, and its flat storage is exactly MATLAB's W2(:).
"""

import math
from typing import NamedTuple

import torch
from torch import nn

from .errors import UserError

ACTIVATIONS = {"sigmoid": torch.sigmoid, "relu": torch.relu}
OUTPUTS = {"sigmoid": torch.sigmoid, "linear": lambda z: z}


class ForwardOutput(NamedTuple):
    x_hat: torch.Tensor  # (batch, n_inputs) reconstruction
    h: torch.Tensor  # (batch, n_hidden) sparse codes (hidden activations a2)
    z2: torch.Tensor  # (batch, n_hidden) encoder pre-activations


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
    ):
        super().__init__()
        if n_inputs < 1 or n_hidden < 1:
            raise UserError(f"n_inputs and n_hidden must be at least 1 (got {n_inputs}, {n_hidden}).")
        if activation not in ACTIVATIONS:
            raise UserError(f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}.")
        if output not in OUTPUTS:
            raise UserError(f"unknown output {output!r}; choose one of {sorted(OUTPUTS)}.")
        self.n_inputs, self.n_hidden = n_inputs, n_hidden
        self.activation, self.output = activation, output
        kw = dict(dtype=dtype, device=device)
        self.W1 = nn.Parameter(torch.empty(n_hidden, n_inputs, **kw))
        self.b1 = nn.Parameter(torch.zeros(n_hidden, **kw))
        self.W2 = nn.Parameter(torch.empty(n_hidden, n_inputs, **kw).t())
        self.b2 = nn.Parameter(torch.zeros(n_inputs, **kw))
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = 0) -> None:
        """UFLDL's initializeParameters: W ~ U(-r, r) with r = sqrt(6 / (n_in + n_hidden + 1)), b = 0."""
        gen = torch.Generator(device="cpu")
        gen.manual_seed(0 if seed is None else seed)
        r = math.sqrt(6.0 / (self.n_inputs + self.n_hidden + 1))
        for W in (self.W1, self.W2):
            W.copy_((torch.rand(W.shape, generator=gen, dtype=torch.float64) * 2 - 1) * r)
        self.b1.zero_()
        self.b2.zero_()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """z2 = x W1^T + b1: (batch, n_inputs) -> (batch, n_hidden)."""
        return torch.addmm(self.b1, x, self.W1.t())

    def sparsify(self, z2: torch.Tensor) -> torch.Tensor:
        """a2 = f(z2): the hidden activations (codes)."""
        return ACTIVATIONS[self.activation](z2)

    def decode(self, h: torch.Tensor) -> torch.Tensor:
        """x_hat = g(h W2^T + b2): (batch, n_hidden) -> (batch, n_inputs)."""
        return OUTPUTS[self.output](torch.addmm(self.b2, h, self.W2.t()))

    def forward(self, x: torch.Tensor) -> ForwardOutput:
        z2 = self.encode(x)
        h = self.sparsify(z2)
        return ForwardOutput(self.decode(h), h, z2)

    def extra_repr(self) -> str:
        return f"{self.n_inputs} -> {self.n_hidden} ({self.activation}) -> {self.n_inputs} ({self.output})"
