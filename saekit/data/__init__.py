"""Data sources. Each yields float rows (n_examples, n_inputs) and knows nothing of models."""

from typing import NamedTuple

import torch

from ..config import TrainConfig
from .images import natural_image_patches


class Dataset(NamedTuple):
    x: torch.Tensor  # (n_examples, n_inputs)
    image_shape: tuple[int, int] | None  # how to draw one example, None for plain vectors
    description: str


def load_training_data(cfg: TrainConfig) -> Dataset:
    """The training examples a config names, in its dtype, on its device."""
    dtype = getattr(torch, cfg.dtype)
    patches = natural_image_patches(cfg.n_examples, cfg.patch_size, seed=cfg.seed, images_mat=cfg.images_mat)
    source = cfg.images_mat or "whitened photographs bundled with scikit-image"
    x = torch.from_numpy(patches).to(dtype=dtype, device=cfg.device)
    return Dataset(x, (cfg.patch_size, cfg.patch_size), f"{cfg.n_examples} {cfg.patch_size}x{cfg.patch_size} patches of {source}")
