"""Other libraries' dictionary formats, out and in: a saekit run's dictionary written as SAELens,
sparsify or dictionary_learning save theirs, and a folder of theirs read into a saekit run folder.

    format                files                                  module
    saelens               cfg.json + sae_weights.safetensors     saelens.py
    sparsify              cfg.json + sae.safetensors             sparsify.py (one folder per hook point)
    dictionary-learning   ae.pt + config.json                    dictionary_learning.py

Each module's docstring gives its format and how saekit's kinds map to it; `common.py` holds the
steps they share. `saekit export RUN --format F` and `saekit import FOLDER` are `export_run` and
`import_run`; the folder's files say which format it holds.
"""

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch

from ..config import RunConfig, TrainConfig
from ..errors import UserError
from ..kinds import SparseAutoencoder
from ..run import RunFolder
from ..run.folder import WEIGHTS
from ..train import OptimConfig
from . import dictionary_learning, saelens, sparsify
from .common import read_settings
from .dictionary_learning import export_dictionary_learning, import_dictionary_learning
from .saelens import export_saelens, import_saelens
from .sparsify import export_sparsify, import_sparsify


class Format(NamedTuple):
    name: str  # as --format takes it
    title: str  # the library's name
    weights: str  # the file of weights that marks a folder as this format's
    settings: str  # its JSON file of settings, kept in an imported run's config.json
    export: Callable[..., Path]  # (model, folder, overwrite, **info) -> the folder written
    load: Callable[..., SparseAutoencoder]  # (folder) -> the dictionary
    describe: Callable[[SparseAutoencoder], str]  # what the export wrote, for the console


FORMATS = {
    f.name: f
    for f in (
        Format(
            "saelens",
            "SAELens",
            saelens.WEIGHTS_NAME,
            saelens.CFG_NAME,
            export_saelens,
            import_saelens,
            lambda model: f"a SAELens {model.saelens_architecture!r} SAE",
        ),
        Format(
            "sparsify",
            "sparsify",
            sparsify.WEIGHTS_NAME,
            sparsify.CFG_NAME,
            export_sparsify,
            import_sparsify,
            sparsify.describe,
        ),
        Format(
            "dictionary-learning",
            "dictionary_learning",
            dictionary_learning.WEIGHTS_NAME,
            dictionary_learning.CFG_NAME,
            export_dictionary_learning,
            import_dictionary_learning,
            dictionary_learning.describe,
        ),
    )
}


def format_named(name: str) -> Format:
    if name not in FORMATS:
        raise UserError(f"unknown format {name!r}; choose one of {', '.join(FORMATS)}.")
    return FORMATS[name]


def _holds(folder: Path) -> list[Format]:
    return [f for f in FORMATS.values() if (folder / f.weights).is_file()]


def detect(folder) -> Format:
    """The format of the dictionary in folder, from its files; a UserError says what it holds otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder; saekit import reads a dictionary's folder.")
    found = _holds(folder)
    if len(found) == 1:
        return found[0]
    if found:
        raise UserError(f"{folder} holds {' and '.join(f.weights for f in found)}; say which with --format.")
    if (folder / WEIGHTS).is_file():
        raise UserError(f"{folder} is a saekit run folder already; it needs no import.")
    inside = sorted(sub.name for sub in folder.iterdir() if sub.is_dir() and _holds(sub))
    if inside:
        shown = ", ".join(inside[:4]) + (", ..." if len(inside) > 4 else "")
        raise UserError(
            f"{folder} holds no dictionary itself, but its folders {shown} do (one per hook point or trainer); "
            f"import one of them, e.g. saekit import {folder / inside[0]}"
        )
    kinds = ", ".join(f"{f.title} ({f.settings} + {f.weights})" for f in FORMATS.values())
    raise UserError(f"{folder} holds no dictionary that saekit reads: {kinds}.")


def export_run(
    run_dir, out, format: str = "saelens", overwrite: bool = False, **info
) -> tuple[SparseAutoencoder, Path]:
    """Write a run's dictionary into `out` in `format`'s files; returns (the model, the folder written)."""
    fmt = format_named(format)
    model = RunFolder.open(run_dir).load_model()
    return model, fmt.export(model, out, overwrite=overwrite, **info)


def import_run(folder, out=None, format: str | None = None) -> tuple[SparseAutoencoder, RunFolder, Format]:
    """Make a saekit run folder (default runs/<format>-<time>) of another library's dictionary folder, whose
    format its files tell unless given; returns (model, run folder, format).

    Its config.json records the dictionary's settings (the training was done elsewhere), the
    folder's path, its format and the format's JSON settings file as it was.
    """
    fmt = detect(folder) if format is None else format_named(format)
    model = fmt.load(folder)
    dtype: Literal["float64", "float32"] = "float64" if model.W1.dtype == torch.float64 else "float32"
    cfg = TrainConfig(model=model.cfg, optim=OptimConfig(optimizer="adam"), run=RunConfig(dtype=dtype))
    source: dict[str, Any] = {
        "imported_from": str(Path(folder).resolve()),
        "imported_format": fmt.name,
        f"{fmt.name.replace('-', '_')}_cfg": read_settings(Path(folder) / fmt.settings),
    }
    run = RunFolder.create(out, fmt.name, resumable=False)
    run.save_model(model)
    run.save_config(cfg, "imported", **source)  # last: the run is complete
    return model, run, fmt


__all__ = [
    "FORMATS",
    "Format",
    "detect",
    "export_dictionary_learning",
    "export_run",
    "export_saelens",
    "export_sparsify",
    "import_dictionary_learning",
    "import_run",
    "import_saelens",
    "import_sparsify",
]
