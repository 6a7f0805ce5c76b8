"""The run folder: the one format every run writes and every reader reads.

    RUN/config.json          the full TrainConfig, library versions, command line, time
    RUN/weights.safetensors  the model's parameters; its metadata says how to rebuild the model
    RUN/initial.safetensors  the parameters before training
    RUN/classifier.safetensors  with --classify: the encoders and softmax of the trained classifier
    RUN/metrics.json         final metrics (cost and its terms, rho_hat statistics, errors)
    RUN/history.csv          one row per iteration or epoch
    RUN/state.json           training progress, for --resume
    RUN/*.png                pictures (see saekit.reports)

Every file is written to a temporary name in the folder, then renamed, so a crash or Ctrl-C
never leaves a half-written file behind.
"""

import csv
import io
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import safetensors
import safetensors.torch
import scipy
import torch

from . import __version__
from .classifier import FeatureClassifier
from .config import TrainConfig, read_config_file
from .errors import UserError
from .files import atomic_write
from .model import SparseAutoencoder

DTYPES = {"float64": torch.float64, "float32": torch.float32}


def write_json(path, obj) -> Path:
    return atomic_write(path, (json.dumps(obj, indent=2) + "\n").encode())


def read_json(path) -> dict:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} is missing; is {path.parent} a saekit run folder?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is corrupt ({e}); the run folder cannot be read.") from None


def versions() -> dict:
    return {
        "saekit": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "numpy": np.__version__, "scipy": scipy.__version__, "safetensors": safetensors.__version__,
        "platform": platform.platform(),
    }


def new_run_dir(out: str | None, name: str) -> Path:
    """RUN folder: `out`, or runs/<name>-<time>. It must not already hold a run."""
    run_dir = Path(out) if out else Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if (run_dir / "config.json").exists():
        raise UserError(f"{run_dir} already holds a run; choose another --out, or continue it with --resume {run_dir}.")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def save_config(run_dir, cfg: TrainConfig, preset: str, command: list[str] | None = None) -> Path:
    record = {"config": cfg.to_dict(), "preset": preset, "versions": versions(), "command": command or sys.argv,
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    return write_json(Path(run_dir) / "config.json", record)


def load_config(run_dir) -> TrainConfig:
    """The TrainConfig a run folder was trained with (its config.json)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"{run_dir} is not a saekit run folder (it has no config.json); give a folder `saekit train` wrote.")
    return TrainConfig(**read_config_file(str(path)))


def _cpu_tensors(module: torch.nn.Module) -> dict:
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


def save_model(run_dir, model: SparseAutoencoder, name: str = "weights.safetensors") -> Path:
    """The model's tensors in safetensors, with its architecture in the metadata; and, for the final
    weights, the architecture again as cfg.json beside them (the layout sparsify and SAELens use)."""
    tensors = _cpu_tensors(model)
    arch = model.architecture()
    metadata = {"architecture": json.dumps(arch), "format": "saekit-1"}
    path = atomic_write(Path(run_dir) / name, safetensors.torch.save(tensors, metadata=metadata))
    if name == "weights.safetensors":
        write_json(Path(run_dir) / "cfg.json", arch)
    return path


def load_model(run_dir, device: str = "cpu", name: str = "weights.safetensors") -> SparseAutoencoder:
    """Rebuild the model saved in a run folder, in the dtype it was saved in."""
    path = Path(run_dir) / name
    if not path.is_file():
        raise UserError(f"{path} is missing; is {run_dir} a saekit run folder that finished at least one step?")

    def build(meta, tensors):
        model = SparseAutoencoder(dtype=tensors["W1"].dtype, device=device, **json.loads(meta["architecture"]))
        model.load_state_dict(tensors)
        return model

    return _rebuild(path, "a saekit weights file", build)


def _rebuild(path: Path, what: str, build):
    """build(metadata, tensors) on the safetensors file at path; a damaged file is one UserError."""
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return build(meta, tensors)
    except (safetensors.SafetensorError, KeyError, TypeError, ValueError, RuntimeError, OSError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"{path} is corrupt or not {what} ({type(e).__name__}: {first_line}).") from None


def save_classifier(run_dir, model: FeatureClassifier, class_names: list[str]) -> Path:
    """The classifier's tensors (encoders.N.*, softmax.*) in RUN/classifier.safetensors; the metadata
    holds each encoder's architecture, the softmax's weight decay and the class names."""
    tensors = _cpu_tensors(model)
    metadata = {"encoders": json.dumps([sae.architecture() for sae in model.encoders]),
                "weight_decay": repr(model.softmax.weight_decay), "class_names": json.dumps(class_names),
                "format": "saekit-classifier-1"}
    return atomic_write(Path(run_dir) / "classifier.safetensors", safetensors.torch.save(tensors, metadata=metadata))


def load_classifier(run_dir, device: str = "cpu") -> tuple[FeatureClassifier, list[str]]:
    """Rebuild the classifier saved by save_classifier: (model, class names)."""
    path = Path(run_dir) / "classifier.safetensors"
    if not path.is_file():
        raise UserError(f"{path} is missing; train with --classify, or run `saekit classify {run_dir}`.")

    def build(meta, tensors):
        encoders = [SparseAutoencoder(dtype=tensors["softmax.theta"].dtype, device=device, **arch)
                    for arch in json.loads(meta["encoders"])]
        class_names = json.loads(meta["class_names"])
        model = FeatureClassifier(encoders, len(class_names), float(meta["weight_decay"]))
        model.load_state_dict(tensors)
        return model, class_names

    return _rebuild(path, "a saekit classifier", build)


def save_trainer_state(run_dir, state: dict) -> Path:
    """The minibatch trainer's state (optimizer moments, stream position, counters) for --resume."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return atomic_write(Path(run_dir) / "checkpoint" / "trainer.pt", buffer.getvalue())


def load_trainer_state(run_dir) -> dict:
    path = Path(run_dir) / "checkpoint" / "trainer.pt"
    try:
        return torch.load(path, weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path} is missing: the run stopped before its first checkpoint; start it again.") from None
    except Exception as e:  # torch raises many kinds of errors for a damaged pickle
        raise UserError(f"{path} is corrupt ({type(e).__name__}); start the run again.") from None


def save_history(run_dir, rows: list[dict]) -> Path:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return atomic_write(Path(run_dir) / "history.csv", buf.getvalue().encode())


def load_history(run_dir) -> list[dict]:
    path = Path(run_dir) / "history.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: float(v) if k != "step" else int(v) for k, v in row.items()} for row in csv.DictReader(f)]
