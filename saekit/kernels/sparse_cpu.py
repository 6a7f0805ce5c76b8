"""Compiled CPU loops for the TopK family's k-sparse steps (Numba), near the memory bound.

A TopK step at width 16,384 (k = 32, batch 4,096, d = 512) spent, on the 2-core machine, more
time in torch's generic operators around the encoder's one dense product than in the product
itself: `topk` over the (batch, n_hidden) pre-activations, and the backward pass of
`embedding_bag` (the weight gradients), which sorts and accumulates at a few percent of the
memory bandwidth. The loops here do the same arithmetic with one pass over the data:

    row_topk(z, k)             each row's k largest values and their columns: one vectorised
                               pass takes the maxima of 2k or more segments of the row; the k-th
                               largest of them is a bound that every kept value reaches, so
                               only the segments reaching it are read again, into a heap of k
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

The two selections read any float dtype (bfloat16 too, as autocast's product is written) through
its bits: read as integers, with a negative value's magnitude bits flipped, they order like the
values (`_ordering_key`).

The sums take contiguous float32 or float64 NumPy views of CPU tensors (no copy); all run on the
threads torch uses. `available()` says whether Numba is installed; where it is not, or for
other devices and dtypes, saekit.kernels.sparse uses torch's operators, which compute the same.
Compiled code is cached beside this file after the first call.
"""

import math

import numpy as np
import torch

try:
    import numba as nb
except ImportError:  # the callers fall back to torch's operators
    nb = None  # type: ignore[assignment]  # `available()` is False then, and nothing below runs

# row_topk beats torch.topk where a row has at least 16 entries per kept one (at k = 32 of 16,384: 23 against
# 77 ms on (4096, 16384) float32; at k = 512: 159 against 293), and loses where it has fewer (k = 400 of 1,000).
ROW_TOPK_MIN_ENTRIES_PER_K = 16
FAST = {"reassoc", "contract", "arcp"}  # sums may be reordered (as BLAS and torch do); NaN and inf stay exact
DTYPES = (torch.float32, torch.float64)
# The selections compare floats by their bits read as integers of the same width (see `_ordering_key`): any float dtype.
BITS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def available(*tensors: torch.Tensor, dtypes=DTYPES) -> bool:
    """Whether these loops serve these tensors: Numba installed, CPU, the first tensor's dtype among dtypes
    (float32 or float64 values for the sums; any float dtype, `BITS`, for the selections; None: any)."""
    cpu = nb is not None and all(t.device.type == "cpu" for t in tensors)
    return cpu and (dtypes is None or tensors[0].dtype in dtypes)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


def _threads() -> None:
    nb.set_num_threads(min(torch.get_num_threads(), nb.config.NUMBA_NUM_THREADS))  # type: ignore[attr-defined]


def _ordering_key(bits, magnitude):
    """An integer that orders like the float whose bits these are: a negative float's magnitude bits
    are flipped (sign and magnitude to two's complement); magnitude masks all bits but the sign."""
    v = np.int64(bits)
    return v ^ ((v >> 63) & magnitude)


if nb is not None:
    _key = nb.njit(inline="always")(_ordering_key)  # compiled into the loops below; Python calls the original

    @nb.njit(inline="always")
    def _ranks_below(key_a, col_a, key_b, col_b):
        return key_a < key_b or (key_a == key_b and col_a > col_b)  # of equal values, the lower column ranks higher

    @nb.njit(inline="always")
    def _sift_down(keys, cols, at):
        """Restore the heap (keys, cols) below position at: the lowest-ranked entry at the root."""
        k = len(keys)
        key, col = keys[at], cols[at]
        while True:
            child = 2 * at + 1
            if child >= k:
                break
            if child + 1 < k and _ranks_below(keys[child + 1], cols[child + 1], keys[child], cols[child]):
                child += 1
            if not _ranks_below(keys[child], cols[child], key, col):
                break
            keys[at], cols[at] = keys[child], cols[child]
            at = child
        keys[at], cols[at] = key, col

    @nb.njit(inline="always")
    def _offer(keys, cols, filled, key, col):
        """Keep (key, col) if it is among the k best offered so far (offered in increasing col); -> count kept."""
        k = len(keys)
        if filled < k:
            keys[filled], cols[filled] = key, col
            filled += 1
            if filled == k:
                for j in range(k // 2 - 1, -1, -1):
                    _sift_down(keys, cols, j)
        elif key > keys[0]:
            keys[0], cols[0] = key, col
            _sift_down(keys, cols, 0)
        return filled

    @nb.njit(parallel=True, nogil=True, cache=True)
    def _row_topk(bits, k, magnitude, segment, keys, indices):
        batch, n = bits.shape
        n_segments = (n + segment - 1) // segment
        for b in nb.prange(batch):
            row, kept_keys, kept = bits[b], keys[b], indices[b]
            maxima = np.empty(n_segments, np.int64)
            for s in range(n_segments):  # one vectorised pass; a maximum >= 0 is also the segment's largest key
                maxima[s] = row[s * segment : min(s * segment + segment, n)].max()
            filled = 0
            for s in range(n_segments):
                filled = _offer(kept_keys, kept, filled, maxima[s], s)
            low = kept_keys[0]  # k segments reach the k-th largest maximum: so does every entry kept
            filled = 0
            if low < 0:  # fewer than k segments hold a value >= +0: every entry is a candidate
                for i in range(n):
                    filled = _offer(kept_keys, kept, filled, _key(row[i], magnitude), i)
                continue
            for s in range(n_segments):
                if maxima[s] >= low:
                    for i in range(s * segment, min(s * segment + segment, n)):
                        if row[i] >= low:  # low >= 0, where bits order like keys and negative values fall below
                            filled = _offer(kept_keys, kept, filled, np.int64(row[i]), i)

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
    def _count_at_least(bits, low, magnitude, counts):
        batch, n = bits.shape
        for b in nb.prange(batch):
            row = bits[b]
            c = 0
            if low >= 0:  # bits order like keys from +0 up, and negative values fall below: compare them as they are
                for i in range(n):
                    c += row[i] >= low
            else:
                for i in range(n):
                    c += _key(row[i], magnitude) >= low
            counts[b] = c

    @nb.njit(parallel=True, nogil=True, cache=True)
    def _take_at_least(bits, low, magnitude, starts, values, columns):
        batch, n = bits.shape
        for b in nb.prange(batch):
            row, at = bits[b], starts[b]
            for i in range(n):
                if (row[i] if low >= 0 else _key(row[i], magnitude)) >= low:
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


def _bits(z: torch.Tensor) -> tuple[np.ndarray, int]:
    """z's bits as signed integers of its width, and the mask of all bits but the sign (see `_ordering_key`)."""
    bits = _np(z.view(BITS[z.dtype]))
    return bits, (1 << (8 * bits.itemsize - 1)) - 1


def row_topk(z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values (batch, k), indices (batch, k) int64) of each row's k largest entries, in no order; of equal
    entries the lower columns. NaN ranks above +inf (as in torch.topk), -NaN below -inf."""
    _threads()
    bits, magnitude = _bits(z)
    segment = max(1, min(64, z.shape[1] // (2 * k)))  # at least 2k segments; 64 entries are 4 cache lines of float32
    keys = torch.empty(z.shape[0], k, dtype=torch.int64)
    indices = torch.empty(z.shape[0], k, dtype=torch.int64)
    _row_topk(bits, k, magnitude, segment, keys.numpy(), indices.numpy())
    return z.gather(1, indices), indices


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


def _low_key(low: float, dtype: torch.dtype) -> int:
    """The key (see `_ordering_key`) of the smallest value of dtype at or above low; for 0, that of -0 (-0 >= 0)."""
    value = torch.tensor(low, dtype=dtype)
    if float(value) < low:
        value = torch.nextafter(value, torch.tensor(math.inf, dtype=dtype))
    if value == 0:
        value = torch.tensor(-0.0, dtype=dtype)
    bits, magnitude = _bits(value)
    return int(_ordering_key(bits[()], magnitude))


def at_least(z: torch.Tensor, low: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(counts (batch,), values (nnz,), columns (nnz,) int64): the entries of z (batch, n) that are >= low,
    row after row, in column order within a row; counts[b] of them in row b."""
    _threads()
    bits, magnitude = _bits(z)
    key = _low_key(low, z.dtype)
    counts = torch.empty(z.shape[0], dtype=torch.int64)
    _count_at_least(bits, key, magnitude, counts.numpy())
    starts = counts.cumsum(0) - counts
    total = int(counts.sum())
    values, columns = torch.empty(total, dtype=z.dtype), torch.empty(total, dtype=torch.int64)
    _take_at_least(bits, key, magnitude, starts.numpy(), _bits(values)[0], columns.numpy())
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
