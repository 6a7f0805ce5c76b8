"""k-sparse encoding and decoding for the TopK family: cost grows with k, not n_hidden.

Encoding. The one dense product z2 = x W1^T + bias is unavoidable; after the selection of k
codes per row, only the selected entries carry a gradient, so the encoder's backward pass is
k-sparse too (see `_SparseEncode`). The product's output buffer is reused from step to step
(a fresh (batch, n_hidden) array costs page faults every time: 30-60 ms of a 350 ms bfloat16
encoding at width 16,384, batch 4,096). Under autocast the product is written in the low precision
and the codes are selected from it directly; only the k codes per row are converted to x's dtype.

On the CPU, the selection (any float dtype) and every k-sparse loop (float32 or float64) run in
compiled code (saekit.kernels.sparse_cpu, Numba) several times faster than torch's generic
operators; elsewhere torch's operators (`topk`, `embedding_bag` and its backward) compute the same.

Decoding.

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

Codes travel as `SparseCodes`: values (batch, k) and indices (batch, k) int64 into the n_hidden atoms,
and, where rows hold different numbers of codes (BatchTopK), lengths (batch,): row b's codes are its
first lengths[b] entries, the rest padding that the loops here skip.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..errors import UserError
from . import blas, sparse_cpu

_buffers: dict[tuple, torch.Tensor] = {}  # the encoder product's output, by (shape, dtype, device)


def _product_buffer(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (rows, cols, dtype, device)
    if key not in _buffers:
        for other in [other for other in _buffers if other[:2] != (rows, cols)]:
            del _buffers[other]  # one shape at a time: a new shape frees the old buffers
        _buffers[key] = torch.empty(rows, cols, dtype=dtype, device=device)
    return _buffers[key]


def row_topk(z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices int64), both (batch, k): each row's k largest entries of z, in no order (of equal
    entries, the lower columns where the compiled selection serves)."""
    if sparse_cpu.available(z, dtypes=sparse_cpu.BITS) and z.shape[1] >= sparse_cpu.ROW_TOPK_MIN_ENTRIES_PER_K * k:
        return sparse_cpu.row_topk(z, k)
    return z.topk(k, dim=1, sorted=False)


def row_support(mask: torch.Tensor, width: int) -> torch.Tensor:
    """(batch, width) int64: the columns where each row of mask (batch, n) is True, padded with other
    columns (whose codes are then 0); width must be at least the largest count of a row."""
    if sparse_cpu.available(mask, dtypes=None):
        return sparse_cpu.row_support(mask, width)
    return mask.to(torch.float32).topk(width, dim=1, sorted=False).indices


def at_least(z: torch.Tensor, low: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(counts (batch,), values (nnz,), columns (nnz,) int64): the entries of z (batch, n) at or above low,
    row after row, in column order within a row; counts[b] of them in row b."""
    if sparse_cpu.available(z, dtypes=sparse_cpu.BITS):
        return sparse_cpu.at_least(z, low)
    mask = z >= low
    return mask.sum(1), z[mask], mask.nonzero()[:, 1]


def ragged_codes(counts: torch.Tensor, values: torch.Tensor, columns: torch.Tensor, width: int) -> "SparseCodes":
    """SparseCodes (batch, width) with lengths: row b's counts[b] codes (values, columns: row after row, as
    `at_least` lists them) first, then padding of value 0 and index 0. width >= counts.max()."""
    batch = len(counts)
    rows = torch.repeat_interleave(torch.arange(batch, device=counts.device), counts)
    starts = counts.cumsum(0) - counts
    place = (rows, torch.arange(len(rows), device=rows.device) - starts[rows])
    padded_values = values.new_zeros(batch, width).index_put_(place, values)
    padded_columns = columns.new_zeros(batch, width).index_put_(place, columns)
    return SparseCodes(padded_values, padded_columns, counts)


def unit_sums(indices: torch.Tensor, w: torch.Tensor, rows: torch.Tensor, n: int):
    """(out (n, d), sums (n,)): out[i] = sum over (b, j) with indices[b, j] = i of w[b, j] rows[b], and
    sums[i] the sum of those w[b, j]: the weight and bias gradients of a k-sparse layer."""
    if sparse_cpu.available(rows, w):
        return sparse_cpu.unit_sums(indices, w, rows, n)
    sums = torch.zeros(n, dtype=rows.dtype, device=rows.device).index_add_(0, indices.reshape(-1), w.reshape(-1))
    with torch.enable_grad():
        W = torch.zeros(n, rows.shape[1], dtype=rows.dtype, device=rows.device, requires_grad=True)
        bag = F.embedding_bag(indices, W, per_sample_weights=w.to(rows.dtype), mode="sum")
        (out,) = torch.autograd.grad(bag, W, grad_outputs=rows)
    return out, sums


class SparseCodes(NamedTuple):
    values: torch.Tensor  # (batch, k) non-negative code values (zeros allowed)
    indices: torch.Tensor  # (batch, k) int64 hidden-unit index of each value
    # (batch,) int64 or None (every entry is a code): row b's codes are its first lengths[b] entries, the
    # rest padding of value 0 that decodes to nothing and gets no gradient (BatchTopK's rows differ in length)
    lengths: torch.Tensor | None = None


class _SparseEncode(torch.autograd.Function):
    """Encode, select k codes per row, and back-propagate at a cost proportional to k.

    Forward: z2 = (x - b2) W1^T + b1 (the one dense product; b2, the decoder's bias, is subtracted only
    where given), then the selection (each row's k largest, or `select(z2)`'s SparseCodes: BatchTopK's
    rows of different lengths), and optionally the aux_k largest pre-activations of dead units for the
    AuxK loss. Backward: only the selected z2 entries have a gradient g, so with r = x - b2

        dL/dW1[i] = sum over selected (b, j) with index i of g[b, j] * r[b]
        dL/db1[i] = sum over selected (b, j) with index i of g[b, j]
        dL/db2    = -W1^T dL/db1

    which is the weight gradient of an embedding bag (F.embedding_bag with per-sample weights g,
    fed r as its output gradient): batch * k * n_inputs work instead of batch * n_hidden * n_inputs.
    (Folding b2 into the bias instead, b1 - W1 b2, would add the outer product of dL/db1 and b2 to W1's
    gradient: a dense (n_hidden, n_inputs) pass each step.)
    The input's gradient, when asked for, is that bag's forward: sum_j g[b, j] W1[indices[b, j]].
    """

    @staticmethod
    def forward(ctx, x, W1, b1, b2, k, select, dead, aux_k):
        device = x.device.type
        rows = x if b2 is None else x - b2  # (batch, n_inputs): what the encoder reads
        if torch.is_autocast_enabled(device):  # the one dense product in low precision, selected from as it is
            low = torch.get_autocast_dtype(device)
            z2_out = _product_buffer(x.shape[0], W1.shape[0], low, x.device)
            z2 = torch.addmm(b1.to(low), rows.to(low), W1.t().to(low), out=z2_out)
        else:
            z2 = blas.matmul(rows, W1.t(), _product_buffer(x.shape[0], W1.shape[0], x.dtype, x.device)).add_(b1)
        values, indices, lengths = select(z2) if select is not None else SparseCodes(*row_topk(z2, k))
        values = values.to(x.dtype).relu()  # the codes, and all that follows, in x's dtype
        aux_values, aux_indices = values.new_empty(x.shape[0], 0), indices.new_empty(x.shape[0], 0)
        if dead is not None and aux_k > 0:
            aux_values, aux_indices = _dead_topk(z2, dead, aux_k)
            aux_values = aux_values.to(x.dtype)
        ctx.save_for_backward(rows, W1, torch.cat([indices, aux_indices], 1), torch.cat([values, aux_values], 1) > 0)
        ctx.mark_non_differentiable(indices, aux_indices, *([] if lengths is None else [lengths]))
        return values, indices, lengths, aux_values, aux_indices

    @staticmethod
    def backward(ctx, grad_values, _, __, grad_aux, ___):
        rows, W1, indices, active = ctx.saved_tensors
        g = torch.cat([grad_values, grad_aux], 1) * active
        grad_W1, grad_b1 = unit_sums(indices, g, rows, W1.shape[0])
        grad_b1 = grad_b1.to(W1.dtype)
        grad_b2 = -(W1.t() @ grad_b1) if ctx.needs_input_grad[3] else None
        # dL/dx[b] = sum_j g[b, j] W1[indices[b, j]]: a k-sparse decoding (needed only for attribution).
        grad_x = _gather_sum(indices, g, W1) if ctx.needs_input_grad[0] else None
        return grad_x, grad_W1.to(W1.dtype), grad_b1, grad_b2, None, None, None, None


def _dead_topk(z2: torch.Tensor, dead: torch.Tensor, aux_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices), (batch, min(aux_k, n_dead)): each row's aux_k largest pre-activations of the dead
    units (relu'd), for AuxK. Only the dead units' columns are read: where there are no more of them than
    aux_k, every one is taken and nothing is selected."""
    dead_units = dead.nonzero().squeeze(1)  # (n_dead,)
    among = z2.index_select(1, dead_units)  # (batch, n_dead)
    if len(dead_units) <= aux_k:
        return among.relu_(), dead_units.expand(z2.shape[0], -1).contiguous()
    values, picked = row_topk(among, aux_k)
    return values.relu_(), dead_units[picked]


def _gather_sum(indices: torch.Tensor, values: torch.Tensor, W_rows: torch.Tensor) -> torch.Tensor:
    """(batch, d): sum_j values[b, j] W_rows[indices[b, j]]."""
    if sparse_cpu.available(W_rows, values):
        return sparse_cpu.gather_sum(indices, values, W_rows, None)
    return F.embedding_bag(indices, W_rows, per_sample_weights=values.to(W_rows.dtype), mode="sum")


class _SparseDecode(torch.autograd.Function):
    """x_hat = sum_j values[b, j] W_rows[indices[b, j]], forward and backward in compiled k-sparse loops:

    dL/dvalues[b, j] = W_rows[indices[b, j]] . dL/dx_hat[b]
    dL/dW_rows[i]    = sum over (b, j) with indices[b, j] = i of values[b, j] dL/dx_hat[b]
    """

    @staticmethod
    def forward(ctx, values, indices, W_rows, lengths):
        ctx.save_for_backward(values, indices, W_rows, lengths)
        ctx.mark_non_differentiable(indices)
        return sparse_cpu.gather_sum(indices, values, W_rows, lengths)

    @staticmethod
    def backward(ctx, grad_x_hat):
        values, indices, W_rows, lengths = ctx.saved_tensors
        grad_values = None
        if ctx.needs_input_grad[0]:
            grad_values = sparse_cpu.gather_dot(indices, W_rows, grad_x_hat, lengths)
        grad_rows = sparse_cpu.unit_sums(indices, values, grad_x_hat, W_rows.shape[0])[0]
        return grad_values, None, grad_rows.to(W_rows.dtype) if ctx.needs_input_grad[2] else None, None


def sparse_encode(x, W1, b1, b2, k: int, select=None, dead=None, aux_k: int = 0):
    """(SparseCodes of the selected codes, SparseCodes of the AuxK codes or None) of z2 = (x - b2) W1^T + b1
    (b2 None: x W1^T + b1). See _SparseEncode."""
    values, indices, lengths, aux_values, aux_indices = _SparseEncode.apply(x, W1, b1, b2, k, select, dead, aux_k)
    aux = SparseCodes(aux_values, aux_indices) if aux_values.shape[1] else None
    return SparseCodes(values, indices, lengths), aux


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


def sparse_decode(
    values: torch.Tensor,
    indices: torch.Tensor,
    W_dec_rows: torch.Tensor,
    bias: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """x_hat (batch, d) = sum_j values[:, j] · W_dec_rows[indices[:, j]] (+ bias (d,)).

    values (batch, k) floating, indices (batch, k) int64, W_dec_rows (n_hidden, d) contiguous,
    lengths (batch,) int64 or None: as in SparseCodes, the entries of row b from lengths[b] on are
    padding (value 0) that gets no gradient,
    one atom per row (in saekit's model that is `model.W2.t()`). Differentiable with respect
    to values, W_dec_rows and bias, all at k-sparse cost. Indices outside [0, n_hidden) are
    caught by torch itself (RuntimeError on the CPU, a device assert on CUDA); checking them
    here would cost a device synchronisation every step.
    """
    _check_codes(values, indices)
    if W_dec_rows.ndim != 2:
        raise UserError(f"W_dec_rows must be (n_hidden, d), got shape {tuple(W_dec_rows.shape)}.")
    if values.dtype != W_dec_rows.dtype or values.device != W_dec_rows.device:
        raise UserError(
            f"values ({values.dtype}, {values.device}) and W_dec_rows ({W_dec_rows.dtype}, "
            f"{W_dec_rows.device}) must share dtype and device; convert values with "
            f".to(W_dec_rows)."
        )
    if not W_dec_rows.is_contiguous():
        # A strided view decodes several times slower (measured); refuse rather than crawl.
        raise UserError(
            "W_dec_rows must be contiguous, one atom per row in memory: pass model.W2.t() "
            "of a saekit model, or W.t().contiguous() for a (d, n_hidden) decoder W."
        )
    if sparse_cpu.available(W_dec_rows, values):
        x_hat = _SparseDecode.apply(values, indices, W_dec_rows, lengths)
    else:
        if lengths is not None:  # the padding's gradient is 0
            values = values * (torch.arange(values.shape[1], device=values.device) < lengths[:, None])
        x_hat = F.embedding_bag(indices, W_dec_rows, per_sample_weights=values, mode="sum")
    if bias is None:
        return x_hat
    if bias.shape != (W_dec_rows.shape[1],):
        raise UserError(f"bias must have shape (d,) = ({W_dec_rows.shape[1]},), got {tuple(bias.shape)}.")
    return x_hat + bias


def _check_codes(values: torch.Tensor, indices: torch.Tensor) -> None:
    if values.ndim != 2 or values.shape != indices.shape or values.shape[1] < 1:
        raise UserError(
            f"values and indices must both be (batch, k) with k >= 1, got "
            f"{tuple(values.shape)} and {tuple(indices.shape)}."
        )
    if indices.dtype != torch.int64:
        raise UserError(f"indices must be int64 (as torch.topk returns), got {indices.dtype}.")
    if not values.is_floating_point():
        raise UserError(f"values must be floating point, got {values.dtype}.")
