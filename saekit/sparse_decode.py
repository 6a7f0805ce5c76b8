"""k-sparse codes and decoding for TopK-family autoencoders: cost grows with k, not n_hidden.

A TopK autoencoder keeps k of its n_hidden codes per example. Decoding those as a dense matmul,
x_hat = h W2^T + b2, spends 2·batch·n_hidden·d FLOP on the forward and as much again on each
gradient, nearly all of it multiplying zeros. Written as a sum over the k kept codes,

    x_hat[b] = sum_j values[b, j] · W_dec_rows[indices[b, j]] + bias,

the forward and both gradients cost batch·k·d:

    grad values[b, j]  = <grad x_hat[b], W_dec_rows[indices[b, j]]>
    grad W_dec_rows[i] = sum over (b, j) with indices[b, j] = i of values[b, j] · grad x_hat[b]

`torch.nn.functional.embedding_bag(mode="sum", per_sample_weights=...)` is exactly that sum,
on the CPU and on CUDA, and its own backward computes exactly those two gradients (the atoms'
gradient dense, (n_hidden, d), non-zero only in the rows that were used). A hand-written
autograd.Function (gather + batched dot for the values, index_add_ for the atoms) measured 2 to 9
times slower on the 2-core CPU, its gather materialising a (batch, k, d) tensor, so there is
none here: `sparse_decode` is embedding_bag with checks. `benchmarks/sparse_decode.py` times
both against dense decoding.

Codes travel as a pair: values (batch, k) and indices (batch, k) int64 into the n_hidden atoms.
"""

import torch
import torch.nn.functional as F

from .errors import UserError


def topk_codes(pre_acts: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """TopK sparsify: the k largest pre-activations per row, through a ReLU.

    pre_acts (batch, n_hidden) -> values (batch, k) >= 0, indices (batch, k) int64, in no
    particular order within a row. Gradients flow from values back to the chosen pre_acts.
    The ReLU matters when fewer than k pre-activations are positive: those codes become 0
    (still listed in indices, contributing nothing).
    """
    if pre_acts.ndim != 2:
        raise UserError(f"pre_acts must be (batch, n_hidden), got shape {tuple(pre_acts.shape)}.")
    if not 1 <= k <= pre_acts.shape[1]:
        raise UserError(f"k must be between 1 and n_hidden = {pre_acts.shape[1]} (got {k}).")
    # sorted=False: order within a row is irrelevant to the sum that decodes it.
    values, indices = pre_acts.topk(k, dim=1, sorted=False)
    return torch.relu(values), indices


def dense_codes(values: torch.Tensor, indices: torch.Tensor, n_hidden: int) -> torch.Tensor:
    """Scatter k-sparse codes into dense ones, (batch, k) pair -> (batch, n_hidden).

    Repeated indices within a row add up, so `dense_codes(v, i, n) @ W_dec_rows` equals
    `sparse_decode(v, i, W_dec_rows)` for any indices. Differentiable with respect to values.
    """
    _check_codes(values, indices)
    if n_hidden < 1:
        raise UserError(f"n_hidden must be at least 1 (got {n_hidden}).")
    dense = values.new_zeros(values.shape[0], n_hidden)
    return dense.scatter_add(1, indices, values)


def sparse_decode(values: torch.Tensor, indices: torch.Tensor, W_dec_rows: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """x_hat (batch, d) = sum_j values[:, j] · W_dec_rows[indices[:, j]] (+ bias (d,)).

    values (batch, k) floating, indices (batch, k) int64, W_dec_rows (n_hidden, d) contiguous,
    one atom per row (in saekit's model that is `model.W2.t()`). Differentiable with respect
    to values, W_dec_rows and bias, all at k-sparse cost. Indices outside [0, n_hidden) are
    caught by torch itself (RuntimeError on the CPU, a device assert on CUDA); checking them
    here would cost a device synchronisation every step.
    """
    _check_codes(values, indices)
    if W_dec_rows.ndim != 2:
        raise UserError(f"W_dec_rows must be (n_hidden, d), got shape {tuple(W_dec_rows.shape)}.")
    if values.dtype != W_dec_rows.dtype or values.device != W_dec_rows.device:
        raise UserError(f"values ({values.dtype}, {values.device}) and W_dec_rows ({W_dec_rows.dtype}, "
                        f"{W_dec_rows.device}) must share dtype and device; convert values with "
                        f".to(W_dec_rows).")
    if not W_dec_rows.is_contiguous():
        # A strided view decodes several times slower (measured); refuse rather than crawl.
        raise UserError("W_dec_rows must be contiguous, one atom per row in memory: pass model.W2.t() "
                        "of a saekit model, or W.t().contiguous() for a (d, n_hidden) decoder W.")
    x_hat = F.embedding_bag(indices, W_dec_rows, per_sample_weights=values, mode="sum")
    if bias is None:
        return x_hat
    if bias.shape != (W_dec_rows.shape[1],):
        raise UserError(f"bias must have shape (d,) = ({W_dec_rows.shape[1]},), got {tuple(bias.shape)}.")
    return x_hat + bias


def _check_codes(values: torch.Tensor, indices: torch.Tensor) -> None:
    if values.ndim != 2 or values.shape != indices.shape or values.shape[1] < 1:
        raise UserError(f"values and indices must both be (batch, k) with k >= 1, got "
                        f"{tuple(values.shape)} and {tuple(indices.shape)}.")
    if indices.dtype != torch.int64:
        raise UserError(f"indices must be int64 (as torch.topk returns), got {indices.dtype}.")
    if not values.is_floating_point():
        raise UserError(f"values must be floating point, got {values.dtype}.")
