"""What the formats of other libraries share, out and in.

Every format holds saekit's four arrays under its own names and layouts,

    z2 = (x - b2 if pre_bias) W1^T + b1,   h = the kind's codes of z2,   x_hat = h W2^T + b2
    W1 (n_hidden, n_inputs), b1 (n_hidden,), W2 (n_inputs, n_hidden), b2 (n_inputs,)

and the kind's own numbers (k, thresholds) beside them. Where a format's encoder always (or
never) subtracts b2, a dictionary whose pre_bias differs is written with b2 folded into the
encoder's bias: b1 + W1 b2 (or b1 - W1 b2) computes the same z2, up to rounding.

Here: the checks of a folder to write and of what was read (one line naming the file), the
files written atomically with the one that completes the folder last, and the model built from
what a kind read. `saekit.interop` puts them together per format.
"""

import json
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import safetensors
import safetensors.torch
import torch

from ..errors import UserError
from ..files import atomic_write
from ..kinds import KINDS, SparseAutoencoder, build, config
from ..run.folder import WEIGHTS


def check_output_folder(folder: Path, names: tuple[str, ...], overwrite: bool) -> None:
    """Refuse to write the files `names` into a saekit run folder, or over a dictionary unless asked."""
    if (folder / WEIGHTS).exists():
        raise UserError(
            f"{folder} is a saekit run folder, and its {' or '.join(names)} would be overwritten or mixed with "
            f"the run's files; export into another folder."
        )
    existing = [name for name in names if (folder / name).exists()]
    if existing and not overwrite:
        raise UserError(f"{folder / existing[0]} already exists; choose another folder, or overwrite it.")


def write_files(folder: Path, files: dict[str, bytes]) -> Path:
    """Write each file atomically, in order: the last one is the one that marks the folder complete."""
    for name, data in files.items():
        atomic_write(folder / name, data)
    return folder


def json_bytes(settings: dict, path: Path) -> bytes:
    """settings as the indented JSON of `path`; values JSON cannot hold are a UserError."""
    try:
        return (json.dumps(settings, indent=2) + "\n").encode()
    except (TypeError, ValueError) as e:
        raise UserError(f"the settings given for {path.name} cannot be written as JSON ({e}).") from None


def write_settings_and_tensors(
    folder: Path, names: tuple[str, str], settings: dict, tensors: dict[str, torch.Tensor], overwrite: bool
) -> Path:
    """A folder of settings (JSON) and tensors (safetensors) named `names`: the tensors first, the settings last."""
    cfg_name, weights_name = names
    check_output_folder(folder, names, overwrite)
    cfg = json_bytes(settings, folder / cfg_name)
    return write_files(folder, {weights_name: safetensors.torch.save(tensors), cfg_name: cfg})


def read_settings_and_tensors(folder: Path, names: tuple[str, str], what: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(settings, tensors) of a folder that write_settings_and_tensors writes; `what` says what such a folder holds."""
    cfg_name, weights_name = names
    require_files(folder, names, what)
    return read_settings(folder / cfg_name), read_safetensors(folder / weights_name)


def require_files(folder: Path, names: tuple[str, ...], what: str) -> None:
    """Each of names is a file in folder, else a UserError saying what such a folder holds."""
    for name in names:
        if not (folder / name).is_file():
            raise UserError(f"{folder / name} is missing; {what}.")


def read_settings(path: Path) -> dict:
    """The JSON object in path: a corrupt file, or one holding something else, is a UserError naming it."""
    try:
        settings = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is corrupt: not JSON ({e}).") from None
    if not isinstance(settings, dict):
        raise UserError(f"{path} must hold a JSON object of settings.")
    return settings


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load_file(path)
    except (safetensors.SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is corrupt or not a safetensors file ({e}).") from None


def positive_int(value, name: str, where) -> int:
    if type(value) is not int or value < 1:
        raise UserError(f"{where}: {name} must be a whole number >= 1 (got {value!r}).")
    return value


def check_tensors(tensors: dict, shapes: dict, where, sizes: str) -> None:
    """Each tensor of shapes present, of its shape (which `sizes` determine), finite and floating point."""
    for name, shape in shapes.items():
        if name not in tensors:
            raise UserError(f"{where} holds tensors {sorted(tensors)}, but this SAE needs {sorted(shapes)}.")
        if tuple(tensors[name].shape) != shape:
            raise UserError(f"{where}: {name} has shape {tuple(tensors[name].shape)}, but {sizes} make it {shape}.")
        if not tensors[name].is_floating_point() or not torch.isfinite(tensors[name]).all():
            raise UserError(f"{where}: {name} must hold finite floating-point numbers.")


def check_names(tensors: dict, expected, where) -> None:
    """tensors hold exactly the names expected."""
    if sorted(tensors) != sorted(expected):
        raise UserError(f"{where} holds tensors {sorted(tensors)}, but this SAE needs exactly {sorted(expected)}.")


def float_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float64 for float64 weights, else float32: saekit's two dtypes (half precision widens exactly)."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


@torch.no_grad()
def encoder_bias(model: SparseAutoencoder, subtracts_b2: bool) -> torch.Tensor:
    """The encoder bias (n_hidden,) of a format whose encoder subtracts b2 (or never does) for model's z2."""
    if subtracts_b2 == model.subtracts_b2:
        return model.b1
    folded = model.W1 @ model.b2
    return model.b1 + folded if subtracts_b2 else model.b1 - folded


def refuse_transcoder(model: SparseAutoencoder, library: str) -> None:
    """A one-line refusal to write a transcoder in a library's format that has none."""
    if model.transcoder:
        raise UserError(
            f"{library}'s format has no transcoders; export this one ({model.n_inputs} -> {model.n_outputs}, "
            f"{model.kind} codes) with --format saelens (relu, jumprelu) or sparsify (topk, same widths)."
        )


def reading_kind(read: Callable[[type[SparseAutoencoder]], dict | None]) -> tuple[type[SparseAutoencoder], dict] | None:
    """The first registered kind for which read(kind) gives settings, and the settings; None if none does."""
    for cls in KINDS.values():
        settings = read(cls)
        if settings is not None:
            return cls, settings
    return None


class Transcoding(NamedTuple):
    """What makes an imported dictionary a transcoder: the targets' width, and its skip connection's weights."""

    n_outputs: int
    W_skip: torch.Tensor | None  # (n_outputs, n_inputs), None without a skip connection


def imported_model(
    cls: type[SparseAutoencoder],
    settings: dict,
    weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    pre_bias: bool,
    where,
    transcoder: Transcoding | None = None,
) -> SparseAutoencoder:
    """A linear-output model of kind cls with settings, holding weights (W1, b1, W2, b2) in W1's float dtype;
    a transcoder where `transcoder` says so."""
    W1, b1, W2, b2 = weights
    n_hidden, n_inputs = W1.shape
    dtype = float_dtype(W1)
    W_skip = None if transcoder is None else transcoder.W_skip
    try:
        cfg = config(
            cls.Config.kind, n_hidden=n_hidden, output="linear", pre_bias=pre_bias, skip=W_skip is not None, **settings
        )
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    n_outputs = None if transcoder is None else transcoder.n_outputs
    model = build(cfg, n_inputs, n_outputs=n_outputs, dtype=dtype, seed=None)
    with torch.no_grad():
        for param, value in zip((model.W1, model.b1, model.W2, model.b2), weights):
            param.copy_(value.to(dtype))  # into saekit's layouts (W2: each atom one row in memory)
        if model.W_skip is not None and W_skip is not None:  # the one exists where the other does
            model.W_skip.copy_(W_skip.to(dtype))
    return model


def cpu_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous copies on the CPU, as files want them."""
    return {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
