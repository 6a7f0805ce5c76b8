"""Data sources. Each yields float rows (n_examples, n_inputs) and knows nothing of models."""

from typing import NamedTuple

import torch

from ..config import TrainConfig, parse_digits
from ..errors import UserError


NAMED = ("natural-patches", "mnist", "fashion-mnist", "synthetic")


class Dataset(NamedTuple):
    x: torch.Tensor | None  # (n_examples, n_inputs) in memory, or None for a streamed source
    labels: torch.Tensor | None  # (n_examples,) class of each example, None where there are none
    image_shape: tuple[int, int] | None  # how to draw one example, None for plain vectors
    description: str
    source: object = None  # a saekit.data.vectors.VectorSource over the same rows
    true_atoms: torch.Tensor | None = None  # synthetic data: the dictionary that made it (n_atoms, n_inputs)


def _digit_images(cfg: TrainConfig, split: str, n: int | None):
    from .idx import load_digits  # only MNIST runs pay for importing the downloader

    images, labels = load_digits(cfg.data, split, cfg.data_dir)
    digits = parse_digits(cfg.digits)
    if digits is not None:
        keep = torch.isin(torch.from_numpy(labels), torch.tensor(digits)).numpy()
        images, labels = images[keep], labels[keep]
    if n is not None and n > len(images):
        raise UserError(f"--n-examples {n} is more than the {len(images)} {cfg.data} {split} images selected; lower it.")
    images, labels = images[:n], labels[:n]
    which = f"digits {cfg.digits} of " if cfg.digits else ""
    return images, labels, (28, 28), f"{len(images)} {which}{cfg.data} {split} images"


def _to_dataset(x, labels, image_shape, description, cfg: TrainConfig, true_atoms=None) -> Dataset:
    from .vectors import ArraySource

    x = torch.as_tensor(x).to(dtype=getattr(torch, cfg.dtype), device=cfg.device)
    labels = None if labels is None else torch.as_tensor(labels)
    return Dataset(x, labels, image_shape, description, ArraySource(x.cpu(), cfg.data), true_atoms)


def load_training_data(cfg: TrainConfig) -> Dataset:
    """The training examples a config names: in memory (in its dtype, on its device), or a
    streamed source when --data is a path."""
    if cfg.data not in NAMED:
        from .vectors import open_vectors

        source = open_vectors(cfg.data, cfg.data_key)
        return Dataset(None, None, None, f"{source.n} vectors of {source.d} from {cfg.data}", source)
    if cfg.data in ("mnist", "fashion-mnist"):
        return _to_dataset(*_digit_images(cfg, "train", cfg.n_examples), cfg)
    if cfg.data == "synthetic":
        from .synthetic import SyntheticDictionary

        truth = SyntheticDictionary(cfg.synthetic_inputs, cfg.synthetic_atoms, cfg.synthetic_k, seed=cfg.seed)
        sample = truth.sample(cfg.n_examples)
        description = (f"{cfg.n_examples} synthetic vectors of {cfg.synthetic_inputs}: {cfg.synthetic_k} of "
                       f"{cfg.synthetic_atoms} known atoms each")
        return _to_dataset(sample.x, None, None, description, cfg, torch.as_tensor(truth.atoms))
    from .images import natural_image_patches

    patches = natural_image_patches(cfg.n_examples, cfg.patch_size, seed=cfg.seed, images_mat=cfg.images_mat)
    source = cfg.images_mat or "whitened photographs bundled with scikit-image"
    shape = (cfg.patch_size, cfg.patch_size)
    return _to_dataset(patches, None, shape, f"{cfg.n_examples} {cfg.patch_size}x{cfg.patch_size} patches of {source}", cfg)


def load_test_data(cfg: TrainConfig) -> Dataset:
    """The labelled test set that goes with a config's training data (MNIST / Fashion-MNIST only)."""
    if cfg.data not in ("mnist", "fashion-mnist"):
        raise UserError(f"--data {cfg.data} has no labels to classify; classification needs mnist or fashion-mnist.")
    return _to_dataset(*_digit_images(cfg, "test", None), cfg)


def corrupt(x: torch.Tensor, kind: str, level: float, generator: torch.Generator, part: int = 0, parts: int = 1) -> torch.Tensor:
    """A denoising autoencoder's input: x with a fraction `level` of values zeroed ('mask'),
    or with Gaussian noise of standard deviation `level` added ('gaussian'). x is (batch, n_inputs).

    With parts > 1, x is part `part` of a batch of parts * batch rows: the noise is drawn for the
    whole batch and this part's rows are used, so the split does not change the corruption.
    """
    if kind == "none":
        return x
    rows = slice(part * x.shape[0], (part + 1) * x.shape[0])
    shape = (parts * x.shape[0], x.shape[1])
    if kind == "mask":
        keep = torch.rand(shape, generator=generator, dtype=x.dtype)[rows].to(x.device) >= level
        return x * keep
    return x + level * torch.randn(shape, generator=generator, dtype=x.dtype)[rows].to(x.device)
