"""The run folder: the one place that knows a run's files, their names and their formats.

    RUN/config.json              every setting (in parts), the preset, library versions, command line, time
    RUN/weights.safetensors      the trained model; its metadata holds the architecture to rebuild it
    RUN/cfg.json                 that architecture again, beside the weights (as sparsify and SAELens keep it)
    RUN/initial.safetensors      the model before training
    RUN/layer2.safetensors, ...  with --stack: the further autoencoders
    RUN/classifier.safetensors   with --classify: the encoders and softmax of the trained classifier
    RUN/classification.json      with --classify: accuracies, per-class results, confusion matrices
    RUN/metrics.json             final metrics (cost and its terms, rho_hat statistics, errors, L0, ...)
    RUN/history.csv              one row per L-BFGS iteration, or per --log-every minibatch steps, appended
    RUN/state.json               training progress: steps done, and whether the run finished
    RUN/checkpoint/step-N/       what --resume needs after N steps: model.safetensors, trainer.pt,
                                 history.csv and manifest.json (their checksums), written as one unit
    RUN/eval.json                `saekit eval`: metrics on other data
    RUN/tensorboard/             with --tensorboard: the history as TensorBoard events
    RUN/*.png                    pictures (saekit.viz.report lists them)

Every file is written to a temporary name in the folder, then renamed, so a crash or Ctrl-C
never leaves a half-written file behind; a checkpoint is a folder made current by one rename
after a manifest of its files' checksums (saekit.files.write_unit). Resuming takes the newest
checkpoint whose files match their manifest and whose settings match config.json, falls back to
an older one (saying so) when the newest is damaged, and cuts history.csv back to its step.
"""

import csv
import io
import json
import platform
import re
import shutil
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import safetensors
import safetensors.torch
import scipy
import torch

from .. import __version__
from ..classify import FeatureClassifier
from ..config import TrainConfig
from ..errors import UserError
from ..files import (
    DamagedUnit,
    append_line,
    atomic_write,
    read_json,
    read_lines,
    read_unit,
    remove_leftovers,
    write_json,
    write_unit,
)
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
CHECKPOINTS = "checkpoint"
TENSORBOARD = "tensorboard"
UNIT = re.compile(r"step-(\d{9})")  # a checkpoint's folder name: the step, zero-padded


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


def _model_bytes(model: torch.nn.Module) -> bytes:
    """A model's tensors as safetensors, its architecture in the metadata."""
    metadata = {"architecture": json.dumps(model.architecture()), "format": "saekit-2"}  # type: ignore[operator]
    return safetensors.torch.save(_cpu_tensors(model), metadata=metadata)


def _metadata(data: bytes) -> dict:
    """The __metadata__ of safetensors bytes: an 8-byte little-endian header length, then the JSON header."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]).get("__metadata__") or {}


def _rebuild(data: bytes, where: Path, what: str, build):
    """build(metadata, tensors) on safetensors bytes; a damaged file or non-finite weights are one UserError."""
    try:
        meta, tensors = _metadata(data), safetensors.torch.load(data)
        result = build(meta, tensors)
    except (safetensors.SafetensorError, KeyError, TypeError, ValueError, RuntimeError, OSError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(f"{where} is corrupt or not {what} ({type(e).__name__}: {first_line}).") from None
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise UserError(
            f"{where} holds NaN or infinite values in {', '.join(bad)}; the run diverged: train it "
            f"again with a smaller --lr (or penalty weights)."
        )
    return result


def _read(path: Path, missing: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path} is missing; {missing}") from None


def _history_csv(rows: list[dict]) -> bytes:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return buf.getvalue().encode()


def _history_rows(lines: list[str]) -> list[dict]:
    return [{k: float(v) if k != "step" else int(v) for k, v in row.items()} for row in csv.DictReader(lines)]


class Checkpoint(NamedTuple):
    step: int
    model: SparseAutoencoder
    trainer_state: dict  # the trainer's state_dict()
    history: list[dict]  # history rows up to step
    settings: dict  # the run's settings it was written with (those that may not change on resume)
    skipped: list[str]  # why newer checkpoints could not be used (damaged), newest first


class RunFolder:
    """A run folder at `path` (see the module docstring for its files)."""

    def __init__(self, path, created: bool = False):
        self.path = Path(path)
        self.created = created  # made by this process (so it may remove it again)

    def __str__(self) -> str:
        return str(self.path)

    def file(self, name: str) -> Path:
        return self.path / name

    @classmethod
    def create(cls, out: str | Path | None, name: str, resumable: bool = True) -> "RunFolder":
        """A new run folder: `out`, or runs/<name>-<time>. It must not already hold a run."""
        path = Path(out) if out else Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        if (path / CONFIG).exists():
            resume = f", or continue it with --resume {path}" if resumable else ""
            raise UserError(f"{path} already holds a run; choose another --out{resume}.")
        existed = path.is_dir()
        path.mkdir(parents=True, exist_ok=True)
        return cls(path, created=not existed)

    def has_checkpoint(self) -> bool:
        return bool(self._units())

    def checkpoint_steps(self) -> list[int]:
        """The steps of the checkpoints on disk, newest first (not yet checked)."""
        return [_unit_step(unit) for unit in self._units()]

    def discard(self) -> None:
        """Remove what a run wrote before its first checkpoint (and the folder, if this process made it)."""
        for name in (CONFIG, INITIAL, HISTORY, STATE):
            self.file(name).unlink(missing_ok=True)
        for name in (CHECKPOINTS, TENSORBOARD):
            shutil.rmtree(self.file(name), ignore_errors=True)
        remove_leftovers(self.path)
        if self.created and not any(self.path.iterdir()):
            self.path.rmdir()

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

    def record_resume(self, cfg: TrainConfig, changes: dict) -> Path:
        """config.json with the settings changed on --resume applied, and the change recorded."""
        record = self.record()
        resumed = [*record.get("resumed", []), {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "changes": changes}]
        return write_json(self.file(CONFIG), {**record, "config": cfg.to_dict(), "resumed": resumed})

    # --- models

    def save_model(self, model: SparseAutoencoder, name: str = WEIGHTS) -> Path:
        """The model's tensors in safetensors, with its architecture in the metadata; and, for the final
        weights, the architecture again as cfg.json beside them."""
        path = atomic_write(self.file(name), _model_bytes(model))
        if name == WEIGHTS:
            write_json(self.file("cfg.json"), model.architecture())
        return path

    def load_model(self, name: str = WEIGHTS, device: str = "cpu") -> SparseAutoencoder:
        """The model saved under name, in the dtype it was saved in."""
        path = self.file(name)
        data = _read(path, f"is {self.path} a saekit run folder that finished training?")
        return _model_from_bytes(data, path, device)

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
        data = _read(path, f"train with --classify, or run `saekit classify {self.path}`.")

        def build(meta, tensors):
            dtype = tensors["softmax.theta"].dtype
            encoders = [from_architecture(arch, dtype=dtype, device=device) for arch in json.loads(meta["encoders"])]
            class_names = json.loads(meta["class_names"])
            model = FeatureClassifier(encoders, len(class_names), float(meta["weight_decay"]))
            model.load_state_dict(tensors)
            return model, class_names

        return _rebuild(data, path, "a saekit classifier", build)

    # --- results and progress

    def write_json(self, name: str, obj) -> Path:
        return write_json(self.file(name), obj)

    def read_json(self, name: str):
        return read_json(self.file(name))

    def write_state(self, steps_done: int, steps_total: int, finished: bool = False) -> Path:
        """state.json: steps done of the total, and whether the run wrote all its results."""
        return self.write_json(STATE, {"steps_done": steps_done, "steps_total": steps_total, "finished": finished})

    def append_history(self, row: dict) -> None:
        """Add one row to history.csv, flushed to disk (its header first, in a new file)."""
        path = self.file(HISTORY)
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="")
        if not read_lines(path):
            writer.writerow(row)
            buf.write("\n")
        writer.writerow(row.values())
        for line in buf.getvalue().split("\n"):
            append_line(path, line)

    def save_history(self, rows: list[dict]) -> Path:
        return atomic_write(self.file(HISTORY), _history_csv(rows))

    def load_history(self) -> list[dict]:
        """The rows of history.csv (a last row cut short by a kill is left out)."""
        return _history_rows(read_lines(self.file(HISTORY)))

    # --- checkpoints

    def save_checkpoint(
        self, model: SparseAutoencoder, trainer_state: dict, history: list[dict], settings: dict, keep: int
    ) -> Path:
        """Everything --resume needs after trainer_state["step"] steps, as one unit; keeps the newest `keep`.

        `settings` (the run's settings that may not change on resume) go into the manifest, so that
        resuming can tell when config.json was edited since.
        """
        step = trainer_state["step"]
        buffer = io.BytesIO()
        torch.save(trainer_state, buffer)
        files = {
            "model.safetensors": _model_bytes(model),
            "trainer.pt": buffer.getvalue(),
            "history.csv": _history_csv(history),
        }
        unit = write_unit(self.file(CHECKPOINTS) / f"step-{step:09d}", files, {"step": step, "settings": settings})
        for old in self._units()[keep:]:
            shutil.rmtree(old, ignore_errors=True)
        return unit

    def _units(self) -> list[Path]:
        """The checkpoint folders, newest first."""
        folder = self.file(CHECKPOINTS)
        units = [p for p in folder.iterdir() if p.is_dir() and UNIT.fullmatch(p.name)] if folder.is_dir() else []
        return sorted(units, reverse=True)

    def load_checkpoint(
        self, settings: dict, device: str = "cpu", at_most: int | None = None, defaults: dict | None = None
    ) -> Checkpoint | None:
        """The newest checkpoint (of a step up to at_most, if given) that is whole and matches `settings`;
        None if the run has none yet. A setting the checkpoint predates (written by an older saekit)
        matches where it is at its value in `defaults`, which is what that saekit did.

        Leftovers of killed writes are removed first. A damaged checkpoint is skipped for the one
        before (the result says which and why); settings that differ from the checkpoint's, or no
        readable checkpoint at all, are a UserError naming the file.
        """
        for folder in (self.path, self.file(CHECKPOINTS)):
            remove_leftovers(folder)
        if (self.file(CHECKPOINTS) / "trainer.pt").exists():
            raise UserError(
                f"{self.file(CHECKPOINTS)} holds a checkpoint of saekit 0.1, which this version cannot "
                f"resume; start the run again."
            )
        skipped: list[str] = []
        for unit in self._units():
            if at_most is not None and _unit_step(unit) > at_most:
                continue
            try:
                checkpoint = self._read_checkpoint(unit, device)
            except DamagedUnit as e:
                skipped.append(str(e))
                continue
            predated = {k: v for k, v in (defaults or {}).items() if k in settings and k not in checkpoint.settings}
            _check_settings(unit, {**checkpoint.settings, **predated}, settings)
            return checkpoint._replace(skipped=skipped)
        if skipped:
            raise UserError(f"no checkpoint of {self.path} can be read: {skipped[0]}; start the run again.")
        return None

    def _read_checkpoint(self, unit: Path, device: str) -> Checkpoint:
        manifest, files = read_unit(unit)
        step = _unit_step(unit)
        try:
            state = torch.load(io.BytesIO(files["trainer.pt"]), weights_only=True)
            consistent = manifest["step"] == step == state["step"]
        except Exception as e:  # a pickle that matches its checksum but not this version: many kinds of error
            raise DamagedUnit(f"{unit / 'trainer.pt'} cannot be read ({type(e).__name__})") from None
        if not consistent:
            raise DamagedUnit(f"{unit} mixes steps: manifest {manifest['step']}, trainer.pt {state['step']}")
        try:
            model = _model_from_bytes(files["model.safetensors"], unit / "model.safetensors", device)
        except UserError as e:  # matches its checksum, but is no model this version can load
            raise DamagedUnit(str(e)) from None
        history = _history_rows(files["history.csv"].decode().split("\n")[:-1])
        return Checkpoint(step, model, state, history, manifest.get("settings", {}), [])


def _unit_step(unit: Path) -> int:
    return int(unit.name.removeprefix("step-"))


def _check_settings(unit: Path, saved: dict, now: dict) -> None:
    """Refuse to resume when the run's settings differ from those its checkpoint was written with."""
    changed = [
        f"{k} ({saved.get(k)!r} there, {now.get(k)!r} now)"
        for k in sorted(set(saved) | set(now))
        if saved.get(k) != now.get(k)
    ]
    if changed:
        raise UserError(
            f"config.json differs from the checkpoint {unit} in {', '.join(changed)}; restore those "
            f"settings, or start a new run."
        )


def _model_from_bytes(data: bytes, where: Path, device: str) -> SparseAutoencoder:
    def build(meta, tensors):
        model = from_architecture(json.loads(meta["architecture"]), dtype=tensors["W1"].dtype, device=device)
        model.load_state_dict(tensors)
        return model

    return _rebuild(data, where, "a saekit weights file", build)


def load_model(run_dir, device: str = "cpu") -> SparseAutoencoder:
    """The trained model of a run folder."""
    return RunFolder(run_dir).load_model(device=device)


def load_classifier(run_dir, device: str = "cpu") -> tuple[FeatureClassifier, list[str]]:
    """The classifier a --classify run trained: (model, class names)."""
    return RunFolder(run_dir).load_classifier(device)
