"""Compiled CPU loops for the TopK family's k-sparse steps (Numba), near the memory bound.

A TopK step at width 16,384 (k = 32, batch 4,096, d = 512) spent, on the 2-core machine, more
time in torch's generic operators around the encoder's one dense product than in the product
itself: `topk` over the (batch, n_hidden) pre-activations, and the backward pass of
`embedding_bag` (the weight gradients), which sorts and accumulates at a few percent of the
memory bandwidth. The loops here do the same arithmetic with one pass over the data:

    row_topk(z, k)             each row's k largest values and their columns: a running
                               minimum of the k kept so far, so most values cost one compare
    row_support(mask, width)   each row's columns in use, padded: dense codes as sparse ones
    at_least(z, low)           every entry of z at or above low, row by row (BatchTopK's
                               candidates): a counting pass, then a filling pass
    unit_sums(idx, w, rows, n) out[i] = sum over (b, j) with idx[b, j] = i of w[b, j] * rows[b]:
                               the weight gradient of the encoder (rows = x) and of the
                               decoder (rows = dL/dx_hat); pairs counting-sorted by unit, then
                               one unit per task, so no two threads write one row
    gather_dot(idx, W, rows, lengths)
                               out[b, j] = W[idx[b, j]] . rows[b]: the codes' gradient
    gather_sum(idx, w, W, lengths)
                               out[b] = sum_j w[b, j] W[idx[b, j]]: k-sparse decoding
                               (both over each row's first lengths[b] entries; the rest
                               is padding: SparseCodes in saekit.kernels.sparse)

They take contiguous float32 or float64 NumPy views of CPU tensors (no copy) and run on the
threads torch uses. `available()` says whether Numba is installed; where it is not, or for
other devices and dtypes, saekit.kernels.sparse uses torch's operators, which compute the same.
Compiled code is cached beside this file after the first call.
"""

import numpy as np
import torch

try:
    import numba as nb
except ImportError:  # the callers fall back to torch's operators
    nb = None  # type: ignore[assignment]  # `available()` is False then, and nothing below runs

# row_topk rescans the k kept values at each replacement: faster than torch.topk up to k = 64 on
# (4096, 16384) (49 against 83 ms at k = 32, 78 against 109 at 64), slower beyond (183 against 151 at 128).
ROW_TOPK_MAX_K = 64
FAST = {"reassoc", "contract", "arcp"}  # sums may be reordered (as BLAS and torch do); NaN and inf stay exact
DTYPES = (torch.float32, torch.float64)


def available(*tensors: torch.Tensor, any_dtype: bool = False) -> bool:
    """Whether these loops serve these tensors: Numba installed, CPU, float32 or float64 values (any_dtype:
    the first tensor may be of any type, such as a bool mask)."""
    cpu = nb is not None and all(t.device.type == "cpu" for t in tensors)
    return cpu and (any_dtype or tensors[0].dtype in DTYPES)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


def _threads() -> None:
    nb.set_num_threads(min(torch.get_num_threads(), nb.config.NUMBA_NUM_THREADS))  # type: ignore[attr-defined]


if nb is not None:

    @nb.njit(parallel=True, nogil=True, cache=True)
    def _row_topk(z, k, values, indices):
        batch, n = z.shape
        for b in nb.prange(batch):
            row, vals, idxs = z[b], values[b], indices[b]
            for j in range(k):
                vals[j] = row[j]
                idxs[j] = j
            low, at = vals[0], 0
            for j in range(1, k):
                if vals[j] < low:
                    low, at = vals[j], j
            for i in range(k, n):
                v = row[i]
                if v > low:  # the common case is one compare and no write
                    vals[at] = v
                    idxs[at] = i
                    low, at = vals[0], 0
                    for j in range(1, k):
                        if vals[j] < low:
                            low, at = vals[j], j

    @nb.njit(parallel=True, nogil=True, cache=True)
    def _row_support(mask, width, out):
        batch, n = mask.shape
        for b in nb.prange(batch):
            at = 0
            for i in range(n):
                if mask[b, i]:
                    out[b, at] = i
                    at += 1
            filler = 0
            while at < width:  # pad with columns not in the support
                while mask[b, filler]:
                    filler += 1
                out[b, at] = filler
                filler += 1
                at += 1

    @nb.njit(parallel=True, nogil=True, cache=True)
    def _count_at_least(z, low, counts):
        batch, n = z.shape
        for b in nb.prange(batch):
            row = z[b]
            c = 0
            for i in range(n):
                if row[i] >= low:
                    c += 1
            counts[b] = c

    @nb.njit(parallel=True, nogil=True, cache=True)
    def _take_at_least(z, low, starts, values, columns):
        batch, n = z.shape
        for b in nb.prange(batch):
            row, at = z[b], starts[b]
            for i in range(n):
                if row[i] >= low:
                    values[at] = row[i]
                    columns[at] = i
                    at += 1

    @nb.njit(nogil=True, cache=True)
    def _sort_by_unit(idx, w, n):
        """(starts (n + 1,), order (pairs,)): the pairs b * k + j of each unit, unit by unit; pairs of weight
        0 add nothing to a sum and are left out (the padding of BatchTopK's rows, TopK's ReLU'd codes)."""
        batch, k = idx.shape
        starts = np.zeros(n + 1, np.int64)
        for b in range(batch):
            for j in range(k):
                if w[b, j] != 0.0:
                    starts[idx[b, j] + 1] += 1
        for i in range(n):
            starts[i + 1] += starts[i]
        fill = starts[:n].copy()
        order = np.empty(starts[n], np.int64)
        for b in range(batch):
            for j in range(k):
                if w[b, j] != 0.0:
                    i = idx[b, j]
                    order[fill[i]] = b * k + j
                    fill[i] += 1
        return starts, order

    @nb.njit(parallel=True, nogil=True, cache=True, fastmath=FAST)
    def _unit_sums(idx, w, rows, out, sums):
        n, d = out.shape
        k = idx.shape[1]
        starts, order = _sort_by_unit(idx, w, n)
        for i in nb.prange(n):
            acc = out[i]
            acc[:] = 0.0
            total = 0.0
            for p in range(starts[i], starts[i + 1]):
                b, j = order[p] // k, order[p] % k
                weight = w[b, j]
                total += weight
                row = rows[b]
                for c in range(d):
                    acc[c] += weight * row[c]
            sums[i] = total

    @nb.njit(parallel=True, nogil=True, cache=True, fastmath=FAST)
    def _gather_dot(idx, W, rows, lengths, out):
        batch, k = idx.shape
        d = W.shape[1]
        for b in nb.prange(batch):
            row = rows[b]
            out[b, lengths[b] :] = 0.0  # padding: no gradient
            for j in range(lengths[b]):
                atom = W[idx[b, j]]
                s = 0.0
                for c in range(d):
                    s += atom[c] * row[c]
                out[b, j] = s

    @nb.njit(parallel=True, nogil=True, cache=True, fastmath=FAST)
    def _gather_sum(idx, w, W, lengths, out):
        d = W.shape[1]
        for b in nb.prange(idx.shape[0]):
            acc = out[b]
            acc[:] = 0.0
            for j in range(lengths[b]):
                weight = w[b, j]
                if weight != 0.0:
                    atom = W[idx[b, j]]
                    for c in range(d):
                        acc[c] += weight * atom[c]


def row_topk(z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values (batch, k), indices (batch, k) int64) of each row's k largest entries, in no order."""
    _threads()
    values = torch.empty(z.shape[0], k, dtype=z.dtype)
    indices = torch.empty(z.shape[0], k, dtype=torch.int64)
    _row_topk(_np(z), k, values.numpy(), indices.numpy())
    return values, indices


def row_support(mask: torch.Tensor, width: int) -> torch.Tensor:
    """(batch, width) int64: each row's True columns of mask, padded with columns that are False."""
    _threads()
    out = torch.empty(mask.shape[0], width, dtype=torch.int64)
    _row_support(_np(mask), width, out.numpy())
    return out


def unit_sums(idx: torch.Tensor, w: torch.Tensor, rows: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (n, d), sums (n,)): out[i] = sum of w[b, j] rows[b] and sums[i] = sum of w[b, j] over idx[b, j] = i."""
    _threads()
    out = torch.empty(n, rows.shape[1], dtype=rows.dtype)
    sums = torch.empty(n, dtype=rows.dtype)
    _unit_sums(_np(idx), _np(w.to(rows.dtype)), _np(rows), out.numpy(), sums.numpy())
    return out, sums


def at_least(z: torch.Tensor, low: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(counts (batch,), values (nnz,), columns (nnz,) int64): the entries of z (batch, n) that are >= low,
    row after row, in column order within a row; counts[b] of them in row b."""
    _threads()
    data = _np(z)
    counts = torch.empty(z.shape[0], dtype=torch.int64)
    _count_at_least(data, low, counts.numpy())
    starts = counts.cumsum(0) - counts
    total = int(counts.sum())
    values, columns = torch.empty(total, dtype=z.dtype), torch.empty(total, dtype=torch.int64)
    _take_at_least(data, low, starts.numpy(), values.numpy(), columns.numpy())
    return counts, values, columns


def _lengths(idx: torch.Tensor, lengths: torch.Tensor | None) -> np.ndarray:
    """Each row's count of codes: lengths, or every entry of idx (batch, k) where lengths is None."""
    return _np(lengths) if lengths is not None else np.full(idx.shape[0], idx.shape[1], np.int64)


def gather_dot(idx: torch.Tensor, W: torch.Tensor, rows: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """(batch, k): W[idx[b, j]] . rows[b] for j < lengths[b] (every j where lengths is None), 0 beyond."""
    _threads()
    out = torch.empty(idx.shape, dtype=W.dtype)
    _gather_dot(_np(idx), _np(W), _np(rows.to(W.dtype)), _lengths(idx, lengths), out.numpy())
    return out


def gather_sum(idx: torch.Tensor, w: torch.Tensor, W: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """(batch, d): sum_j w[b, j] W[idx[b, j]] over j < lengths[b] (every j where lengths is None)."""
    _threads()
    out = torch.empty(idx.shape[0], W.shape[1], dtype=W.dtype)
    _gather_sum(_np(idx), _np(w.to(W.dtype)), _np(W), _lengths(idx, lengths), out.numpy())
    return out
