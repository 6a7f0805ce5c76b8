"""The kinds of sparse autoencoder, one file each, found by name in a registry.

    sigmoid    UFLDL's autoencoder (KL penalty) and the lectures' variants (L1, contractive, none)
    relu       ReLU codes with an L1 penalty, optionally weighted by decoder column norms
    topk       each example's k largest codes, AuxK for dead units
    batchtopk  the batch's k * batch largest codes; a threshold at inference
    matryoshka BatchTopK whose nested prefixes of units each learn to reconstruct
    jumprelu   ReLU above a learned per-unit threshold, L0 penalty

A kind is a `SparseAutoencoder` subclass with its settings (a `ModelConfig` subclass) as `Config`.
`build` is the one constructor: the command line, the estimator, stacked layers and importers
all use it. To add a kind, write its file and add it to the tuple below (docs/architecture.md
has a worked example).
"""

import dataclasses

from ..errors import UserError
from .base import Codes, LossTerms, ModelConfig, Output, SparseAutoencoder
from .batchtopk import BatchTopK
from .jumprelu import JumpReLU
from .matryoshka import Matryoshka
from .relu import ReLU
from .sigmoid import Sigmoid
from .topk import TopK

KINDS: dict[str, type[SparseAutoencoder]] = {}


def register(cls: type[SparseAutoencoder]) -> type[SparseAutoencoder]:
    """Make a kind known by its Config.kind name (usable as a class decorator)."""
    KINDS[cls.Config.kind] = cls
    return cls


for _kind in (Sigmoid, ReLU, TopK, BatchTopK, Matryoshka, JumpReLU):  # SAELens import: the first that reads a file
    register(_kind)


def kind_class(name: str) -> type[SparseAutoencoder]:
    if name not in KINDS:
        raise UserError(f"unknown kind {name!r}; choose one of {', '.join(KINDS)}.")
    return KINDS[name]


def config(kind: str = "sigmoid", **settings) -> ModelConfig:
    """The settings of a kind by name, e.g. config("topk", n_hidden=4096, k=32)."""
    cls = kind_class(kind).Config
    try:
        return cls(**settings)
    except TypeError:  # a setting the kind does not have
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(settings) - known)
        raise UserError(
            f"the {kind} kind has no setting {', '.join(unknown)}; its settings are {', '.join(sorted(known))}."
        ) from None


def build(
    cfg: ModelConfig,
    n_inputs: int,
    *,
    n_outputs: int | None = None,
    dtype=None,
    device="cpu",
    seed: int | None = 0,
) -> SparseAutoencoder:
    """A new model of cfg's kind for inputs of width n_inputs, initialised from seed; with n_outputs,
    a transcoder reconstructing targets of that width instead of its input."""
    import torch

    cls = kind_class(cfg.kind)
    return cls(cfg, n_inputs, n_outputs=n_outputs, dtype=dtype or torch.float64, device=device, seed=seed)


def from_architecture(arch: dict, *, dtype=None, device="cpu") -> SparseAutoencoder:
    """A model (initial weights) from what `SparseAutoencoder.architecture()` saved. Reads the
    architectures saekit 0.1 saved too, which named the kind "activation"."""
    settings = dict(arch)
    n_inputs, n_outputs = settings.pop("n_inputs"), settings.pop("n_outputs", None)
    kind = settings.pop("kind", None) or settings.pop("activation")
    return build(config(kind, **settings), n_inputs, n_outputs=n_outputs, dtype=dtype, device=device, seed=None)


__all__ = [
    "KINDS",
    "Codes",
    "LossTerms",
    "ModelConfig",
    "Output",
    "SparseAutoencoder",
    "build",
    "config",
    "from_architecture",
    "kind_class",
    "register",
]
