"""The run folder: the one place that knows a run's files, their names and their formats.

    RUN/config.json              every setting (in parts), the preset, library versions, command line, time
    RUN/weights.safetensors      the trained model; its metadata holds the architecture to rebuild it
    RUN/cfg.json                 that architecture again, beside the weights (as sparsify and SAELens keep it)
    RUN/initial.safetensors      the model before training
    RUN/layer2.safetensors, ...  with --stack: the further autoencoders
    RUN/classifier.safetensors   with --classify: the encoders and softmax of the trained classifier
    RUN/classification.json      with --classify: accuracies, per-class results, confusion matrices
    RUN/metrics.json             final metrics (cost and its terms, rho_hat statistics, errors, L0, ...)
    RUN/history.csv              one row per L-BFGS iteration, or per --log-every minibatch steps
    RUN/state.json               training progress, for --resume
    RUN/checkpoint/              minibatch runs: model.safetensors and trainer.pt, for --resume
    RUN/eval.json                `saekit eval`: metrics on other data
    RUN/tensorboard/             with --tensorboard: the history as TensorBoard events
    RUN/*.png                    pictures (saekit.viz.report lists them)

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

from .. import __version__
from ..classify import FeatureClassifier
from ..config import TrainConfig
from ..errors import UserError
from ..files import atomic_write, read_json, write_json
from ..kinds import SparseAutoencoder, from_architecture

CONFIG = "config.json"
WEIGHTS = "weights.safetensors"
INITIAL = "initial.safetensors"
CLASSIFIER = "classifier.safetensors"
CLASSIFICATION = "classification.json"
METRICS = "metrics.json"
HISTORY = "history.csv"
STATE = "state.json"
EVAL = "eval.json"
CHECKPOINT_MODEL = "checkpoint/model.safetensors"
CHECKPOINT_TRAINER = "checkpoint/trainer.pt"
TENSORBOARD = "tensorboard"


def versions() -> dict:
    return {
        "saekit": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "safetensors": safetensors.__version__,
        "platform": platform.platform(),
    }


def _cpu_tensors(module: torch.nn.Module) -> dict:
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


def _rebuild(path: Path, what: str, build):
    """build(metadata, tensors) on the safetensors file at path; a damaged file is one UserError."""
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        return build(meta, tensors)
    except (safetensors.SafetensorError, KeyError, TypeError, ValueError, RuntimeError, OSError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"{path} is corrupt or not {what} ({type(e).__name__}: {first_line}).") from None


class RunFolder:
    """A run folder at `path` (see the module docstring for its files)."""

    def __init__(self, path):
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    def file(self, name: str) -> Path:
        return self.path / name

    @classmethod
    def create(cls, out: str | Path | None, name: str) -> "RunFolder":
        """A new run folder: `out`, or runs/<name>-<time>. It must not already hold a run."""
        path = Path(out) if out else Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        if (path / CONFIG).exists():
            raise UserError(f"{path} already holds a run; choose another --out, or continue it with --resume {path}.")
        path.mkdir(parents=True, exist_ok=True)
        return cls(path)

    @classmethod
    def open(cls, path) -> "RunFolder":
        """An existing run folder; one without config.json is refused."""
        folder = cls(path)
        if not folder.file(CONFIG).is_file():
            raise UserError(
                f"{path} is not a saekit run folder (it has no {CONFIG}); give a folder `saekit train` wrote."
            )
        return folder

    # --- settings

    def save_config(self, cfg: TrainConfig, preset: str, command: list[str] | None = None, **extra) -> Path:
        record = {
            "config": cfg.to_dict(),
            "preset": preset,
            "versions": versions(),
            "command": command or sys.argv,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **extra,
        }
        return write_json(self.file(CONFIG), record)

    def record(self) -> dict:
        """config.json as written: the settings and what came with them."""
        record = read_json(self.file(CONFIG))
        if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
            raise UserError(f"{self.file(CONFIG)} holds no settings; the run folder cannot be read.")
        return record

    def load_config(self) -> TrainConfig:
        """The settings the run was trained with (config.json of this or an earlier saekit)."""
        return TrainConfig.from_dict(self.record()["config"])

    # --- models

    def save_model(self, model: SparseAutoencoder, name: str = WEIGHTS) -> Path:
        """The model's tensors in safetensors, with its architecture in the metadata; and, for the final
        weights, the architecture again as cfg.json beside them."""
        arch = model.architecture()
        metadata = {"architecture": json.dumps(arch), "format": "saekit-2"}
        path = atomic_write(self.file(name), safetensors.torch.save(_cpu_tensors(model), metadata=metadata))
        if name == WEIGHTS:
            write_json(self.file("cfg.json"), arch)
        return path

    def load_model(self, name: str = WEIGHTS, device: str = "cpu") -> SparseAutoencoder:
        """The model saved under name, in the dtype it was saved in."""
        path = self.file(name)
        if not path.is_file():
            raise UserError(f"{path} is missing; is {self.path} a saekit run folder that finished at least one step?")

        def build(meta, tensors):
            model = from_architecture(json.loads(meta["architecture"]), dtype=tensors["W1"].dtype, device=device)
            model.load_state_dict(tensors)
            return model

        return _rebuild(path, "a saekit weights file", build)

    def save_layers(self, layers: list[SparseAutoencoder]) -> list[Path]:
        """The stacked layers above the first: layer2.safetensors, layer3.safetensors, ..."""
        return [self.save_model(layer, f"layer{i}.safetensors") for i, layer in enumerate(layers, start=2)]

    def load_layers(self, device: str = "cpu") -> list[SparseAutoencoder]:
        """The run's autoencoder and its stacked layers, input side first."""
        layers, i = [self.load_model(device=device)], 2
        while self.file(f"layer{i}.safetensors").is_file():
            layers.append(self.load_model(f"layer{i}.safetensors", device))
            i += 1
        return layers

    def save_classifier(self, model: FeatureClassifier, class_names: list[str]) -> Path:
        """The classifier's tensors (encoders.N.*, softmax.*); the metadata holds each encoder's
        architecture, the softmax's weight decay and the class names."""
        metadata = {
            "encoders": json.dumps([sae.architecture() for sae in model.autoencoders]),
            "weight_decay": repr(model.softmax.weight_decay),
            "class_names": json.dumps(class_names),
            "format": "saekit-classifier-2",
        }
        return atomic_write(self.file(CLASSIFIER), safetensors.torch.save(_cpu_tensors(model), metadata=metadata))

    def load_classifier(self, device: str = "cpu") -> tuple[FeatureClassifier, list[str]]:
        """The classifier save_classifier wrote: (model, class names)."""
        path = self.file(CLASSIFIER)
        if not path.is_file():
            raise UserError(f"{path} is missing; train with --classify, or run `saekit classify {self.path}`.")

        def build(meta, tensors):
            dtype = tensors["softmax.theta"].dtype
            encoders = [from_architecture(arch, dtype=dtype, device=device) for arch in json.loads(meta["encoders"])]
            class_names = json.loads(meta["class_names"])
            model = FeatureClassifier(encoders, len(class_names), float(meta["weight_decay"]))
            model.load_state_dict(tensors)
            return model, class_names

        return _rebuild(path, "a saekit classifier", build)

    # --- results and progress

    def write_json(self, name: str, obj) -> Path:
        return write_json(self.file(name), obj)

    def read_json(self, name: str):
        return read_json(self.file(name))

    def write_state(self, steps_done: int, steps_total: int) -> Path:
        return self.write_json(
            STATE, {"steps_done": steps_done, "steps_total": steps_total, "finished": steps_done >= steps_total}
        )

    def save_history(self, rows: list[dict]) -> Path:
        buf = io.StringIO()
        if rows:
            writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        return atomic_write(self.file(HISTORY), buf.getvalue().encode())

    def load_history(self) -> list[dict]:
        path = self.file(HISTORY)
        if not path.is_file():
            return []
        with open(path, newline="") as f:
            return [{k: float(v) if k != "step" else int(v) for k, v in row.items()} for row in csv.DictReader(f)]

    # --- minibatch checkpoints

    def save_checkpoint(self, model: SparseAutoencoder, trainer_state: dict, history: list[dict]) -> None:
        """Everything --resume needs after trainer_state["step"] steps."""
        self.save_model(model, CHECKPOINT_MODEL)
        buffer = io.BytesIO()
        torch.save(trainer_state, buffer)
        atomic_write(self.file(CHECKPOINT_TRAINER), buffer.getvalue())
        self.save_history(history)

    def load_checkpoint(self, device: str = "cpu") -> tuple[SparseAutoencoder, dict, list[dict]]:
        """(model, trainer state, history) of the last checkpoint."""
        path = self.file(CHECKPOINT_TRAINER)
        try:
            state = torch.load(path, weights_only=True)
        except FileNotFoundError:
            raise UserError(
                f"{path} is missing: the run stopped before its first checkpoint; start it again."
            ) from None
        except Exception as e:  # torch raises many kinds of errors for a damaged pickle
            raise UserError(f"{path} is corrupt ({type(e).__name__}); start the run again.") from None
        if not isinstance(state, dict) or "kind" not in state:
            raise UserError(f"{path} was written by an earlier saekit; start the run again.")
        return self.load_model(CHECKPOINT_MODEL, device), state, self.load_history()


def load_model(run_dir, device: str = "cpu") -> SparseAutoencoder:
    """The trained model of a run folder."""
    return RunFolder(run_dir).load_model(device=device)


def load_classifier(run_dir, device: str = "cpu") -> tuple[FeatureClassifier, list[str]]:
    """The classifier a --classify run trained: (model, class names)."""
    return RunFolder(run_dir).load_classifier(device)
