"""Any stream of vectors, larger than memory: sources, shuffled minibatches, statistics.

Sources. A source is a matrix of n rows (examples) by d columns that is read in
contiguous row ranges: an in-memory NumPy array or torch tensor, a memory-mapped `.npy`
file, a `.safetensors` file (read lazily, slice by slice), or a folder of such shards read
as their concatenation in file-name order (sorted as strings: name them shard_0007, not
shard_7). `open_vectors` picks the kind. Floating data keep their dtype until a stream
converts them; integer data (e.g. uint8 pixels) are accepted and converted the same way;
boolean, complex and other data are refused.

Why chunks and a shuffle window. Random row access is slow on a memory-mapped or
safetensors file, and the data may not fit in memory. So each epoch cuts the rows into
contiguous chunks of `chunk_size` rows, shuffles the chunk order, and groups the shuffled
chunks into windows of `shuffle_buffer // chunk_size` chunks. A window is read chunk by
chunk (in file order, so reads move forward through the file), its rows are permuted, and
batches are cut from the permuted rows; when they run out the next window replaces it. In
memory at once: one window (at most `shuffle_buffer` rows), the chunk being read, and the
rows of one batch. Each batch thus mixes rows of many chunks drawn from the whole data set.

Epoch stream and data parallel. The permuted windows of epoch e, one after another, are a
permutation of all n rows: the epoch stream. Global batch j is positions [jB, (j+1)B) of
it, with B = world_size * batch_size. Every rank computes the same epoch stream, and rank r
takes positions [jB + r*b, jB + (r+1)*b), b = batch_size. So the union of the ranks'
batches at step j is, row for row, the single-process batch of size B with the same seed,
and DDP (which averages gradients over ranks) trains exactly like one process with batch
B. A rank reads only the windows its slices touch.

Resume. Every random choice is drawn from a generator seeded by (seed, epoch, window), never
from a running one, so any position can be rebuilt without replaying the past. The
position is (epoch, global batches taken in that epoch); `state_dict` returns it with the
settings it depends on, and after `load_state_dict` the window in use is read again and its
permutation redrawn. The position counts global batches, so a run may resume with another
world_size as long as world_size * batch_size is unchanged.

Pairs. A transcoder reads one place of a network and reconstructs another: a `PairedSource`
joins its inputs and targets side by side into one wider row, so everything above holds for
pairs unchanged, and `split` takes a batch apart again.

Validation. Every chunk is checked for NaN and inf after conversion to the stream's dtype
(so float64 values too large for float32 are caught); the error names the file and row.
"""

import bisect
import math
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from saekit.errors import UserError

SUFFIXES = (".npy", ".safetensors")
# A folder `saekit harvest` writes (saekit.data.harvest): its shards, and its manifest, written last
SHARD_NAME = "shard_{:05d}.safetensors"
SHARD_GLOB = "shard_*.safetensors"  # every name SHARD_NAME gives
MANIFEST = "harvest.json"
INPUTS_KEY = "activations"  # the tensor a .safetensors source reads unless told
SAFETENSORS_NUMERIC = ("F", "BF", "I", "U")  # dtype name prefixes: floats and integers


class VectorSource:
    """n rows of width d, read in contiguous row ranges; subclasses set n, d and name."""

    n: int
    d: int
    name: str

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Rows start..stop-1 as a (stop - start, d) tensor in the stored dtype."""
        raise NotImplementedError

    def where(self, row: int) -> str:
        """Where a row lives, for error messages."""
        return f"{self.name} row {row}"

    def split(self, block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of rows read from this source: an autoencoder's rows are both."""
        return block, block

    def targets(self) -> "VectorSource":
        """The rows a model fed from this source reconstructs: its own (a PairedSource: the targets)."""
        return self

    @property
    def widths(self) -> tuple[int, int | None]:
        """(n_inputs, n_outputs) of a model fed from this source: (d, None) for an autoencoder's rows."""
        return self.d, None


def _check_matrix(name: str, shape, numeric: bool, dtype) -> tuple[int, int]:
    if len(shape) != 2:
        raise UserError(
            f"{name} has shape {tuple(shape)}; vectors must be a 2-D array "
            f"(n_examples, n_features): reshape it, e.g. to (-1, d)"
        )
    if not numeric:
        raise UserError(
            f"{name} has dtype {dtype}; vectors must be floating point or integer numbers: convert it, e.g. to float32"
        )
    if shape[0] == 0 or shape[1] == 0:
        raise UserError(f"{name} has shape {tuple(shape)}: no data; it needs at least one row and one column")
    return int(shape[0]), int(shape[1])


class ArraySource(VectorSource):
    """A NumPy array (possibly memory-mapped) or a torch tensor of shape (n, d)."""

    def __init__(self, array, name: str = "array"):
        if isinstance(array, torch.Tensor):
            numeric = not (array.dtype == torch.bool or array.is_complex())
        else:  # numpy: floats torch can hold, signed and unsigned integers
            numeric = array.dtype.kind in "iu" or (array.dtype.kind == "f" and array.dtype.itemsize <= 8)
        self.n, self.d = _check_matrix(name, array.shape, numeric, array.dtype)
        self.array, self.name = array, name

    def read(self, start, stop):
        block = self.array[start:stop]
        if isinstance(block, torch.Tensor):
            return block.detach()
        # A copy in native byte order: a memory-mapped file is read-only and may be big-endian.
        return torch.from_numpy(np.array(block, dtype=block.dtype.newbyteorder("=")))


class SafetensorsSource(VectorSource):
    """One 2-D tensor of a .safetensors file: `key`, or else "activations" (what saekit's harvest
    writes), or else the file's only 2-D tensor."""

    def __init__(self, path: Path, key: str | None = None):
        self.path, self.name = path, str(path)
        try:
            with safe_open(path, framework="pt") as f:
                slices = {k: f.get_slice(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
                shapes = {k: s.get_shape() for k, s in slices.items()}
                dtypes = {k: s.get_dtype() for k, s in slices.items()}
        except SafetensorError as e:
            raise UserError(
                f"cannot read {path} as a .safetensors file ({e}); it may be truncated or corrupt: write it again"
            ) from e
        if key is None and len(shapes.get(INPUTS_KEY, ())) == 2:
            key = INPUTS_KEY  # a harvest's shard, which may hold a transcoder's targets too
        if key is None:
            matrices = [k for k, shape in shapes.items() if len(shape) == 2]
            if len(matrices) != 1:
                found = ", ".join(f"{k} {tuple(s)}" for k, s in shapes.items()) or "no tensors"
                raise UserError(
                    f"{path} must hold exactly one 2-D tensor unless a key names "
                    f"one; it holds {found}: pass the key of the vectors"
                )
            key = matrices[0]
        elif key not in shapes:
            raise UserError(f"{path} has no tensor {key!r}; choose one of {sorted(shapes)}")
        self.key = key
        numeric = dtypes[key].startswith(SAFETENSORS_NUMERIC)
        self.n, self.d = _check_matrix(f"{path} [{key}]", shapes[key], numeric, dtypes[key])

    def read(self, start, stop):
        # Opened per read (a header parse): no file handle outlives the call.
        with safe_open(self.path, framework="pt") as f:
            return f.get_slice(self.key)[start:stop]


class ShardedSource(VectorSource):
    """Sources of the same width d, read as their concatenation along rows."""

    def __init__(self, shards: list[VectorSource], name: str):
        for shard in shards[1:]:
            if shard.d != shards[0].d:
                raise UserError(
                    f"shards in {name} differ in width: {shards[0].name} has "
                    f"d={shards[0].d} but {shard.name} has d={shard.d}; all "
                    f"shards must have the same number of columns"
                )
        self.shards, self.name, self.d = shards, name, shards[0].d
        self.starts = [0, *np.cumsum([s.n for s in shards]).tolist()]  # first row of each shard
        self.n = self.starts[-1]

    def _shard(self, row: int) -> int:
        return bisect.bisect_right(self.starts, row) - 1

    def read(self, start, stop):
        parts, i = [], self._shard(start)
        while start < stop:
            end = min(stop, self.starts[i + 1])
            parts.append(self.shards[i].read(start - self.starts[i], end - self.starts[i]))
            start, i = end, i + 1
        return torch.cat(parts)  # promotes shards of different dtypes to a common one

    def where(self, row):
        i = self._shard(row)
        return self.shards[i].where(row - self.starts[i])


class PairedSource(VectorSource):
    """A transcoder's data: inputs (n, d_in) and the targets (n, d_out) it reconstructs, row for row.

    Read as one (n, d_in + d_out) matrix, so that streaming, shuffling, data parallelism and
    resuming keep each pair together with no code of their own; `split` takes a block apart.
    """

    def __init__(self, inputs: VectorSource, targets: VectorSource):
        if inputs.n != targets.n:
            raise UserError(
                f"the inputs ({inputs.name}, {inputs.n} rows) and the targets ({targets.name}, {targets.n} rows) "
                f"differ in length; a transcoder needs one target row for each input row"
            )
        self.inputs, self.outputs = inputs, targets
        self.n, self.d_in, self.d_out = inputs.n, inputs.d, targets.d
        self.d, self.name = inputs.d + targets.d, f"{inputs.name} (targets {targets.name})"

    def read(self, start, stop):
        x, y = self.inputs.read(start, stop), self.outputs.read(start, stop)
        return torch.cat([x, y.to(torch.promote_types(x.dtype, y.dtype))], dim=1)

    def where(self, row):
        return f"{self.inputs.where(row)} or its target"

    def split(self, block):
        return block[:, : self.d_in], block[:, self.d_in :]

    def targets(self):
        return self.outputs

    @property
    def widths(self):
        return self.d_in, self.d_out


def open_vectors(source, key: str | None = None) -> VectorSource:
    """A VectorSource for an array, tensor, .npy/.safetensors file or folder of them.

    `key` names the tensor to read in .safetensors files (needed when one holds several
    2-D tensors). A VectorSource is returned unchanged.
    """
    if isinstance(source, VectorSource):
        return source
    if isinstance(source, (np.ndarray, torch.Tensor)):
        return ArraySource(source)
    path = Path(source)
    if not path.exists():
        raise UserError(f"{path} does not exist; give a .npy or .safetensors file or a folder of them")
    if not path.is_dir():
        return _open_file(path, key)
    files = sorted(p for p in path.iterdir() if p.suffix in SUFFIXES and p.is_file())
    if not files:
        raise UserError(
            f"folder {path} holds no .npy or .safetensors files; put the vector shards there or give a file"
        )
    if not (path / MANIFEST).is_file() and any(p.match(SHARD_GLOB) for p in files):
        raise UserError(
            f"{path} holds an unfinished harvest: its shards but not {MANIFEST}, which `saekit harvest` writes "
            f"last; run the harvest again to finish it (or rename the shards if they are not a harvest's)"
        )
    return ShardedSource([_open_file(p, key) for p in files], str(path))


def _open_file(path: Path, key: str | None) -> VectorSource:
    if path.suffix == ".safetensors":
        return SafetensorsSource(path, key)
    if path.suffix != ".npy":
        raise UserError(f"{path} has unsupported type {path.suffix or '(no suffix)'!r}; use .npy or .safetensors files")
    try:
        array = np.load(path, mmap_mode="r")  # pages are read on demand, never all at once
    except (OSError, ValueError, EOFError) as e:
        raise UserError(
            f"cannot read {path} as a .npy file ({e}); it may be truncated or corrupt: write it again"
        ) from e
    if not isinstance(array, np.ndarray):  # np.load opens a .npz archive whatever its name
        raise UserError(f"{path} is an .npz archive, not a .npy file; save one array with np.save")
    return ArraySource(array, str(path))


def check_finite(block: torch.Tensor, source: VectorSource, start: int) -> torch.Tensor:
    """Return block (rows start.. of source), or raise UserError naming its first NaN/inf row."""
    # min and max propagate NaN and reach inf: two reductions, no (rows, d) mask unless something is wrong
    if block.numel() and not torch.isfinite(torch.stack(torch.aminmax(block))).all():
        row = start + int((~torch.isfinite(block).all(dim=1)).nonzero()[0])
        raise UserError(f"{source.where(row)} holds NaN or inf (as {block.dtype}); remove or fix the non-finite rows")
    return block


class VectorStream:
    """Shuffled minibatches: CPU tensors (batch_size, d) in `dtype`, taken from a source.

    Iteration runs forever (epochs=None) or until the epoch counter, which starts at 0 and
    is part of the position, reaches `epochs`; a resumed run thus stops where the
    uninterrupted one would. Iterating continues from the stream's position (see
    `state_dict`), so a second loop over the same stream picks up where the first stopped.
    drop_last=True drops the last n % B rows of each epoch (a different set each epoch);
    drop_last=False yields them as a short final batch and needs world_size=1, since a
    short batch cannot be split evenly. shuffle=False reads the rows in their stored order
    (for data shuffled already, and for benchmarks that feed every trainer the same batches).
    """

    def __init__(
        self,
        source,
        batch_size: int,
        shuffle_buffer: int = 2**16,
        chunk_size: int | None = None,
        seed: int = 0,
        dtype=torch.float32,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
        epochs: int | None = None,
        shuffle: bool = True,
    ):
        self.source = open_vectors(source)
        chunk_size = chunk_size or max(1, shuffle_buffer // 16)
        for name, value in [
            ("batch_size", batch_size),
            ("shuffle_buffer", shuffle_buffer),
            ("chunk_size", chunk_size),
            ("world_size", world_size),
        ]:
            if value < 1:
                raise UserError(f"{name} is {value}; it must be a positive integer")
        if chunk_size > shuffle_buffer:
            raise UserError(
                f"chunk_size {chunk_size} exceeds shuffle_buffer {shuffle_buffer}; "
                f"a window must hold at least one chunk: lower chunk_size"
            )
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside 0..{world_size - 1} for world_size {world_size}")
        if seed < 0 or (epochs is not None and epochs < 0):
            raise UserError(f"seed ({seed}) and epochs ({epochs}) must not be negative")
        if not drop_last and world_size > 1:
            raise UserError(
                "drop_last=False needs world_size=1: a short last batch cannot be "
                "split evenly across ranks; use drop_last=True"
            )
        self.global_batch = batch_size * world_size
        if drop_last and self.source.n < self.global_batch:
            raise UserError(
                f"{self.source.name} has {self.source.n} rows, fewer than one global "
                f"batch of {self.global_batch}; use a smaller batch or more data"
            )
        self.batch_size, self.shuffle_buffer, self.chunk_size = batch_size, shuffle_buffer, chunk_size
        self.seed, self.dtype, self.rank, self.drop_last, self.epochs = seed, dtype, rank, drop_last, epochs
        self.shuffle = shuffle
        self.n_chunks = math.ceil(self.source.n / chunk_size)
        full, rest = divmod(self.source.n, self.global_batch)
        self.steps_per_epoch = full + (rest > 0 and not drop_last)
        self.epoch, self.step = 0, 0  # position: global batches already taken in this epoch

    def _settings(self) -> dict:
        """What the position's meaning depends on; checked when a state is loaded."""
        return {
            "seed": self.seed,
            "rows": self.source.n,
            "width": self.source.d,
            "global_batch": self.global_batch,
            "shuffle_buffer": self.shuffle_buffer,
            "chunk_size": self.chunk_size,
            "drop_last": self.drop_last,
            "shuffle": self.shuffle,
        }

    def state_dict(self) -> dict:
        """The position after the batches taken so far, as plain ints and bools (JSON-safe)."""
        return {"epoch": self.epoch, "step": self.step, **self._settings()}

    def load_state_dict(self, state: dict) -> None:
        """Move to a saved position; the next batch is the one that followed it."""
        now = self._settings()
        changed = [f"{k}={state.get(k)!r} (now {v!r})" for k, v in now.items() if state.get(k) != v]
        if changed:
            raise UserError(
                f"cannot resume this stream: the saved position was taken with "
                f"{', '.join(changed)}; resume with the same data and stream settings"
            )
        self.epoch, self.step = int(state["epoch"]), int(state["step"])

    def _layout(self, epoch: int) -> tuple[list[np.ndarray], list[int]]:
        """Epoch's windows (chunk ids, sorted for forward reads) and their first stream positions."""
        chunks = np.arange(self.n_chunks)
        order = np.random.default_rng([self.seed, epoch, 0, 0]).permutation(chunks) if self.shuffle else chunks
        per_window = self.shuffle_buffer // self.chunk_size
        windows = [np.sort(order[i : i + per_window]) for i in range(0, self.n_chunks, per_window)]
        sizes = [
            int((np.minimum((w + 1) * self.chunk_size, self.source.n) - w * self.chunk_size).sum()) for w in windows
        ]
        return windows, [0, *np.cumsum(sizes).tolist()]

    def _load_window(self, epoch: int, index: int, chunks: np.ndarray, size: int):
        """(rows (size, d) in self.dtype, permutation (size,)) of window `index` of epoch."""
        rows, at = torch.empty(size, self.source.d, dtype=self.dtype), 0
        for chunk in chunks.tolist():
            start = chunk * self.chunk_size
            stop = min(start + self.chunk_size, self.source.n)
            block = rows[at : at + stop - start]
            block.copy_(self.source.read(start, stop))  # converts to self.dtype in place
            check_finite(block, self.source, start)
            at += stop - start
        # Fixed-length seeds: numpy's SeedSequence treats [s, e] and [s, e, 0] alike.
        rng = np.random.default_rng([self.seed, epoch, 1, index])
        perm = rng.permutation(size) if self.shuffle else np.arange(size)
        return rows, torch.from_numpy(perm)

    def __iter__(self):
        n, b = self.source.n, self.batch_size
        while self.epochs is None or self.epoch < self.epochs:
            windows, starts = self._layout(self.epoch)
            loaded, rows, perm = -1, torch.empty(0), torch.empty(0, dtype=torch.int64)
            while self.step < self.steps_per_epoch:
                lo = self.step * self.global_batch + self.rank * b  # this rank's stream positions
                hi, pieces = min(lo + b, n), []
                while lo < hi:
                    w = bisect.bisect_right(starts, lo) - 1
                    if w != loaded:
                        rows = perm = torch.empty(0, dtype=torch.int64)  # free the old window before reading the next
                        rows, perm = self._load_window(self.epoch, w, windows[w], starts[w + 1] - starts[w])
                        loaded = w
                    end = min(hi, starts[w + 1])
                    pieces.append(rows[perm[lo - starts[w] : end - starts[w]]])
                    lo = end
                self.step += 1  # before the yield: a state saved after this batch resumes after it
                yield torch.cat(pieces)
            self.epoch, self.step = self.epoch + 1, 0


def mean_and_mean_squared_norm(
    source, max_rows: int | None = None, chunk_size: int = 65536
) -> tuple[torch.Tensor, float]:
    """(mean (d,) float64, E||x||^2) over the first max_rows rows (all if None), in one pass."""
    source = open_vectors(source)
    if max_rows is not None and max_rows < 1:
        raise UserError(f"max_rows is {max_rows}; it must be a positive integer or None")
    n = source.n if max_rows is None else min(max_rows, source.n)
    total, total_sq = torch.zeros(source.d, dtype=torch.float64), 0.0
    for start in range(0, n, chunk_size):
        x = check_finite(source.read(start, min(start + chunk_size, n)).double(), source, start)
        total += x.sum(dim=0)
        total_sq += float(x.square().sum())
    return total / n, total_sq / n


def geometric_median(source, iters: int = 100, max_rows: int = 4096, seed: int = 0, tol: float = 1e-10) -> torch.Tensor:
    """argmin_y sum_i ||x_i - y|| (float64 (d,)) over at most max_rows random rows.

    Weiszfeld's algorithm with Vardi & Zhang's (2000) step at a data point, which plain
    Weiszfeld cannot leave (its weight 1/||x_i - y|| is infinite there) and which
    duplicated rows make likely. Stops after `iters` steps or a step below tol * (1 + ||y||).
    """
    source = open_vectors(source)
    if max_rows < 1 or iters < 0:
        raise UserError(f"max_rows ({max_rows}) must be positive and iters ({iters}) not negative")
    if source.n <= max_rows:
        x = check_finite(source.read(0, source.n).double(), source, 0)
    else:  # sampled rows, read one by one: a few thousand small reads
        picks = np.sort(np.random.default_rng(seed).choice(source.n, max_rows, replace=False))
        x = torch.cat([check_finite(source.read(i, i + 1).double(), source, i) for i in picks.tolist()])
    y = x.mean(dim=0)
    for _ in range(iters):
        diff = x - y
        dist = diff.norm(dim=1)
        away = dist > 0
        if not away.any():  # every row equals y
            break
        w = 1 / dist[away]
        y_next = (w[:, None] * x[away]).sum(dim=0) / w.sum()  # the Weiszfeld step
        ties = int((~away).sum())  # rows at y: move only if the others pull harder than they hold
        if ties:
            pull = float((w[:, None] * diff[away]).sum(dim=0).norm())
            gamma = 1.0 if pull <= ties else ties / pull
            y_next = (1 - gamma) * y_next + gamma * y
        step = float((y_next - y).norm())
        y = y_next
        if step <= tol * (1 + float(y.norm())):
            break
    return y
