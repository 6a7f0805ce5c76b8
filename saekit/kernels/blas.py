"""Matrix products in the fastest library at hand.

On the CPU, NumPy's OpenBLAS is well ahead of PyTorch's MKL on the AMD machines we measured
(see benchmarks/), so CPU products run there, through zero-copy NumPy views of the tensors; on
other devices they stay in torch.
"""

import numpy as np
import torch


def matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = a @ b, with a, b, out on one device; a and b may be transposed views."""
    if out.device.type == "cpu" and out.dtype in (torch.float32, torch.float64):
        np.matmul(a.numpy(), b.numpy(), out=out.numpy())
    else:
        torch.matmul(a, b, out=out)
    return out
