"""Data sources. Each yields float rows (n_examples, n_inputs) and knows nothing of models.

`DataConfig` is the data's part of a run's settings; `load_training_data` turns it into rows
in memory or a stream, and `Corruption` is a denoising autoencoder's corruption of its input.
"""

from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
import torch

from ..errors import UserError
from ..settings import Settings
from .synthetic import SyntheticDictionary, structure_problems
from .vectors import ArraySource, PairedSource, VectorSource, open_vectors

NAMED = ("natural-patches", "mnist", "fashion-mnist", "synthetic")
LABELLED = ("mnist", "fashion-mnist")


@dataclass
class DataConfig(Settings):
    data: str = "natural-patches"
    """Training data: 'natural-patches' (whitened photographs bundled with scikit-image, or IMAGES.mat with --images-
    mat), 'mnist', 'fashion-mnist', 'synthetic' (a known random dictionary, see --synthetic-atoms), or the path of
    vectors to stream: a .npy file, a .safetensors file or a folder of such shards."""
    data_key: str | None = None
    """Name of the tensor to read in .safetensors files (default: 'activations', else the only 2-D tensor)."""
    target_key: str | None = None
    """Transcoder: the tensor of the .safetensors files to reconstruct instead of the input, row for row (e.g.
    'targets', which `saekit harvest --target-layer` writes beside the input's 'activations'). A transcoder's
    decoder starts at 0 (with --tied-init) and its columns are not normalised unless --normalize-decoder."""
    target_data: str | None = None
    """Transcoder: vectors to reconstruct instead of the input, row for row with --data: a .npy or .safetensors file
    or a folder of shards (read with --target-key, if given)."""
    images_mat: str | None = None
    """Path to UFLDL's IMAGES.mat (512x512x10 whitened images); patches are then sampled from it."""
    data_dir: str | None = None
    """Folder holding the MNIST / Fashion-MNIST IDX files (default: $SAEKIT_DATA_DIR, else a download cache)."""
    n_examples: int = 10000
    """Number of training examples: patches sampled from the images, synthetic vectors, or the first MNIST training
    images."""
    digits: str | None = None
    """Keep only these classes of MNIST / Fashion-MNIST, e.g. '5-9' or '0,2,4' (before taking --n-examples)."""
    synthetic_inputs: int = 64
    """Synthetic data: width of the vectors."""
    synthetic_atoms: int = 256
    """Synthetic data: atoms in the true dictionary."""
    synthetic_k: int = 8
    """Synthetic data: atoms drawn for each example (children and partners come on top)."""
    synthetic_parents: int = 0
    """Synthetic data: parent features of a hierarchy, each with --synthetic-children children that fire only with it
    (the case where feature absorption shows); 0 for none."""
    synthetic_children: int = 0
    """Synthetic data: children of each parent; siblings never fire together."""
    synthetic_child_probability: float = 0.5
    """Synthetic data: chance that one of a firing parent's children fires with it."""
    synthetic_pairs: int = 0
    """Synthetic data: pairs of correlated features; 0 for none."""
    synthetic_pair_probability: float = 0.5
    """Synthetic data: chance that a drawn feature of a pair brings its partner."""
    patch_size: int = 8
    """Side of the square image patches, in pixels."""
    corruption: Literal["none", "mask", "gaussian"] = "none"
    """Denoising autoencoder: corrupt the input, reconstruct the clean target: 'none', 'mask' (zero a fraction of
    inputs) or 'gaussian' (add noise)."""
    corruption_level: float = 0.3
    """Fraction of inputs zeroed ('mask'), or the noise's standard deviation ('gaussian')."""

    def problems(self) -> list[str]:
        problems = self.at_least(1, "n_examples", "synthetic_inputs", "synthetic_atoms", "synthetic_k", "patch_size")
        problems += ["synthetic data: " + p for p in structure_problems(*self.synthetic_structure())]
        if not 0 <= self.corruption_level < float("inf") or (
            self.corruption == "mask" and not self.corruption_level < 1
        ):
            problems.append(
                f"--corruption-level must be >= 0 and finite, and below 1 for 'mask' (got {self.corruption_level})"
            )
        if self.transcoder and self.data in NAMED:
            problems.append(f"--target-key and --target-data need --data a path of vectors, not {self.data!r}")
        if self.transcoder and self.corruption != "none":
            problems.append("--corruption makes a denoising autoencoder, which reconstructs its own input, not targets")
        try:
            parse_digits(self.digits)
        except UserError as e:
            problems.append(str(e))
        return problems

    def synthetic_structure(self) -> tuple:
        """The synthetic dictionary's sizes and chances, in the order of `structure_problems`."""
        return (
            self.synthetic_atoms,
            self.synthetic_k,
            self.synthetic_parents,
            self.synthetic_children,
            self.synthetic_pairs,
            self.synthetic_child_probability,
            self.synthetic_pair_probability,
        )

    @property
    def labelled(self) -> bool:
        return self.data in LABELLED

    @property
    def transcoder(self) -> bool:
        """Whether the model reconstructs targets other than its input."""
        return self.target_key is not None or self.target_data is not None

    def corruption_fn(self) -> "Corruption | None":
        return None if self.corruption == "none" else Corruption(self.corruption, self.corruption_level)


def parse_digits(spec: str | None) -> list[int] | None:
    """'5-9' -> [5, 6, 7, 8, 9]; '0,2,4' -> [0, 2, 4]; None -> None (all classes)."""
    if spec is None:
        return None
    try:
        digits: set[int] = set()
        for part in spec.split(","):
            low, _, high = part.strip().partition("-")
            digits.update(range(int(low), int(high or low) + 1))
    except ValueError:
        digits = set()
    if not digits or not digits <= set(range(10)):
        raise UserError(f"--digits {spec!r} is not a list of classes 0-9 such as '5-9' or '0,2,4'")
    return sorted(digits)


class Dataset(NamedTuple):
    x: torch.Tensor | None  # (n_examples, n_inputs) in memory, or None for a streamed source
    labels: torch.Tensor | None  # (n_examples,) class of each example, None where there are none
    image_shape: tuple[int, int] | None  # how to draw one example, None for plain vectors
    description: str
    source: VectorSource  # the same rows as a source that streams
    true_atoms: torch.Tensor | None = None  # synthetic data: the dictionary that made it (n_atoms, n_inputs)
    true_parents: torch.Tensor | None = None  # synthetic data: each atom's parent (n_atoms,), -1 for none

    @property
    def widths(self) -> tuple[int, int | None]:
        """(n_inputs, n_outputs): the inputs' width, and a transcoder's targets' width (None: an autoencoder)."""
        return self.source.widths

    def in_memory(self) -> torch.Tensor:
        """The rows x, which the settings' checks guarantee wherever they are asked for."""
        if self.x is None:
            raise UserError(f"this needs the training data in memory, but {self.description} are streamed.")
        return self.x

    def labelled(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, labels) of labelled data in memory."""
        if self.labels is None:
            raise UserError(f"this needs labelled data, but {self.description} have no labels.")
        return self.in_memory(), self.labels


def _digit_images(cfg: DataConfig, split: str, n: int | None) -> tuple[np.ndarray, np.ndarray, tuple[int, int], str]:
    from .idx import load_digits  # only MNIST runs pay for importing the downloader

    images, labels = load_digits(cfg.data, split, cfg.data_dir)
    digits = parse_digits(cfg.digits)
    if digits is not None:
        keep = torch.isin(torch.from_numpy(labels), torch.tensor(digits)).numpy()
        images, labels = images[keep], labels[keep]
    if n is not None and n > len(images):
        raise UserError(
            f"--n-examples {n} is more than the {len(images)} {cfg.data} {split} images selected; lower it."
        )
    images, labels = images[:n], labels[:n]
    which = f"digits {cfg.digits} of " if cfg.digits else ""
    return images, labels, (28, 28), f"{len(images)} {which}{cfg.data} {split} images"


def _to_dataset(x, labels, image_shape, description, name: str, dtype, device, truth=None) -> Dataset:
    x = torch.as_tensor(x).to(dtype=dtype, device=device)
    labels = None if labels is None else torch.as_tensor(labels)
    atoms, parents = (None, None) if truth is None else (torch.as_tensor(truth.atoms), truth.parent_of)
    return Dataset(x, labels, image_shape, description, ArraySource(x.cpu(), name), atoms, parents)


def load_training_data(cfg: DataConfig, dtype: torch.dtype = torch.float64, device="cpu", seed: int = 0) -> Dataset:
    """The training examples the settings name: in memory (in dtype, on device), or a streamed
    source when cfg.data is a path. seed fixes the sample of patches or synthetic vectors."""
    if cfg.data not in NAMED:
        source = open_pairs(cfg.data, cfg.data_key, cfg.target_data, cfg.target_key)
        description = f"{source.n} vectors of {source.d} from {cfg.data}"
        if isinstance(source, PairedSource):
            description = (
                f"{source.n} vectors of {source.d_in} from {cfg.data}, each paired with a target of "
                f"{source.d_out} from {source.outputs.name}"
            )
        return Dataset(None, None, None, description, source)
    if cfg.data in LABELLED:
        return _to_dataset(*_digit_images(cfg, "train", cfg.n_examples), cfg.data, dtype, device)
    if cfg.data == "synthetic":
        return _synthetic(cfg, dtype, device, seed)
    from .images import natural_image_patches

    patches = natural_image_patches(cfg.n_examples, cfg.patch_size, seed=seed, images_mat=cfg.images_mat)
    origin = cfg.images_mat or "whitened photographs bundled with scikit-image"
    shape = (cfg.patch_size, cfg.patch_size)
    description = f"{cfg.n_examples} {cfg.patch_size}x{cfg.patch_size} patches of {origin}"
    return _to_dataset(patches, None, shape, description, cfg.data, dtype, device)


def _synthetic(cfg: DataConfig, dtype, device, seed: int) -> Dataset:
    truth = SyntheticDictionary(
        cfg.synthetic_inputs,
        cfg.synthetic_atoms,
        cfg.synthetic_k,
        seed=seed,
        n_parents=cfg.synthetic_parents,
        n_children=cfg.synthetic_children,
        child_probability=cfg.synthetic_child_probability,
        n_pairs=cfg.synthetic_pairs,
        pair_probability=cfg.synthetic_pair_probability,
    )
    sample = truth.sample(cfg.n_examples)
    structure = ""
    if cfg.synthetic_parents:
        structure += f", {cfg.synthetic_parents} parents with {cfg.synthetic_children} children each"
    if cfg.synthetic_pairs:
        structure += f", {cfg.synthetic_pairs} correlated pairs"
    description = (
        f"{cfg.n_examples} synthetic vectors of {cfg.synthetic_inputs}: {cfg.synthetic_k} of "
        f"{cfg.synthetic_atoms} known atoms each{structure}"
    )
    return _to_dataset(sample.x, None, None, description, cfg.data, dtype, device, truth)


def open_pairs(data, data_key: str | None = None, target_data=None, target_key: str | None = None) -> VectorSource:
    """The vectors of data; with target_data or target_key, paired with the targets a transcoder
    reconstructs (target_key in target_data, or in data's own files). data and target_data are what
    open_vectors takes: paths, arrays or tensors."""
    source = open_vectors(data, data_key)
    if target_data is None and target_key is None:
        return source
    return PairedSource(source, open_vectors(data if target_data is None else target_data, target_key))


def load_test_data(cfg: DataConfig, dtype: torch.dtype = torch.float64, device="cpu") -> Dataset:
    """The labelled test set that goes with the training data (MNIST / Fashion-MNIST only)."""
    if not cfg.labelled:
        raise UserError(f"--data {cfg.data} has no labels to classify; classification needs mnist or fashion-mnist.")
    return _to_dataset(*_digit_images(cfg, "test", None), cfg.data, dtype, device)


@dataclass(frozen=True)
class Corruption:
    """A denoising autoencoder's input: a fraction `level` of values zeroed ('mask'), or Gaussian
    noise of standard deviation `level` added ('gaussian')."""

    kind: Literal["mask", "gaussian"]
    level: float

    def __call__(self, x: torch.Tensor, generator: torch.Generator, part: int = 0, parts: int = 1) -> torch.Tensor:
        """x (batch, n_inputs) corrupted, with noise drawn from generator.

        With parts > 1, x is part `part` of a batch of parts * batch rows: the noise is drawn for
        the whole batch and this part's rows are used, so the split does not change the corruption.
        """
        rows = slice(part * x.shape[0], (part + 1) * x.shape[0])
        shape = (parts * x.shape[0], x.shape[1])
        if self.kind == "mask":
            keep = torch.rand(shape, generator=generator, dtype=x.dtype)[rows].to(x.device) >= self.level
            return x * keep
        return x + self.level * torch.randn(shape, generator=generator, dtype=x.dtype)[rows].to(x.device)
