"""Whether a run fits in memory, estimated before anything is allocated.

The estimate counts the parameters (two n_hidden x n_inputs matrices), their gradients and the
optimizer's state (Adam's two moments; L-BFGS's history of `lbfgs_memory` pairs of float64
vectors, as SciPy keeps them), and the largest per-step arrays: a batch's pre-activations, codes
and their gradients (batch x n_hidden, a few copies) and its inputs and reconstructions (batch x
n_inputs). It is meant to catch settings that cannot fit at all (a width of ten million), not to
be exact; a run refused here could never have started.

And how the process keeps the memory it frees: `keep_freed_memory()`.
"""

import ctypes
import functools
import os
import platform
from typing import NamedTuple

import torch

from ..errors import UserError
from .config import OptimConfig

# mallopt's parameters (glibc's malloc.h), and the trim threshold: freed memory at the heap's top up to this stays
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
KEEP_AT_TOP = 2**31 - 1
COPIES_PER_STEP = 4  # arrays of batch x n_hidden alive at once: pre-activations, codes, and their gradients
GIB = 2**30


class Estimate(NamedTuple):
    parameters: int  # bytes of the weights
    optimizer: int  # bytes of gradients and optimizer state
    per_step: int  # bytes of the largest arrays of one step

    @property
    def total(self) -> int:
        return self.parameters + self.optimizer + self.per_step


def estimate(n_inputs: int, n_hidden: int, optim: OptimConfig, itemsize: int, rows: int) -> Estimate:
    """Bytes a run needs; rows is the number of examples in memory (the full batch of L-BFGS)."""
    weights = 2 * n_hidden * n_inputs + n_hidden + n_inputs
    if optim.full_batch:
        state = weights * itemsize + 2 * optim.lbfgs_memory * weights * 8
        batch = rows
    else:
        state = weights * itemsize * (3 if optim.optimizer == "adam" else 1)
        batch = optim.batch_size
    per_step = batch * (COPIES_PER_STEP * n_hidden + 2 * n_inputs) * itemsize
    return Estimate(weights * itemsize, state, per_step)


def available_bytes(device: str) -> int | None:
    """Memory free for a new allocation on device, where the system says (None where it does not)."""
    if torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return free
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None


def check_fits(needed: Estimate, device: str) -> None:
    """Refuse, with the estimate and the fix, a run that needs more memory than the device has free."""
    free = available_bytes(device)
    if free is None or needed.total <= free:
        return
    raise UserError(
        f"this run needs about {needed.total / GIB:.1f} GiB ({needed.parameters / GIB:.1f} for the weights, "
        f"{needed.optimizer / GIB:.1f} for gradients and optimizer state, {needed.per_step / GIB:.1f} for one "
        f"step's arrays), but {free / GIB:.1f} GiB are free on {device}; lower --n-hidden or --batch-size"
    )


@functools.cache
def keep_freed_memory() -> bool:
    """Have the C library keep the memory the process frees for its next allocations, rather than give it
    back to the system; once per process, and only where the C library is glibc. Returns whether it did.

    glibc maps every block of 32 MiB or more afresh and unmaps it when it is freed, and the first touch of
    each fresh page is a page fault. A TopK step on the CPU allocates and frees blocks that large every
    time: the gradients of W1 and W2 (32 MiB each at width 16,384 and 512 inputs), which their kernels
    wrote at a third of their speed into fresh pages. With no mapped blocks (M_MMAP_MAX 0) and the heap's
    top never trimmed, each step's blocks come from memory the previous steps freed: at that width a
    bfloat16 step ran 1.4-1.8x as fast, and the process held 25% more resident memory (9% at width 65,536;
    aligned blocks fit freed ones only once these have merged), the same after 10 steps as after 80.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, KEEP_AT_TOP))
