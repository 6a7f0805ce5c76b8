"""A run's settings in parts, each owned by the layer it configures:

    data      saekit.data.DataConfig            what to train on
    model     a kind's config (saekit.kinds)    the autoencoder: its kind, width and loss terms
    optim     saekit.train.OptimConfig          how it is trained
    run       RunConfig (here)                  dtype, device, seed, logging
    classify  saekit.classify.ClassifyConfig    stacked layers and the classifier after training

Every setting has one name across all parts (n_hidden, lr, k, ...), so settings can also be
given flat, as the command line and presets do; `TrainConfig.from_flat` sorts them into their
parts. A kind's settings are those of its config class: giving `k` to a sigmoid autoencoder is
an error that says which kinds take `k`.

Validation reads nothing of the machine: a run folder written on a GPU machine loads on a
CPU-only one (asking to *train* on an absent device is refused when training starts).

config.json files of saekit 0.1 (one flat object of every setting, the kind called
"activation") still load: their settings that the run's kind did not use are dropped.
"""

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from . import kinds
from .classify.config import ClassifyConfig
from .data import NAMED, DataConfig
from .errors import UserError
from .kinds.sigmoid import SigmoidConfig
from .presets import PRESETS
from .settings import Settings, accepts, dashed
from .train.config import OptimConfig

SEED_LIMIT = 2**64  # seeds lie in 0 ... 2^64 - 1, as torch's generators take them


@dataclass
class RunConfig(Settings):
    dtype: Literal["float64", "float32"] = "float64"
    """Floating-point type of the model and the data: 'float64' or 'float32'."""
    device: str = "cpu"
    """Torch device: 'cpu' or 'cuda' (or 'cuda:N')."""
    seed: int = 0
    """Random seed, 0 ... 2^64-1: fixes the data sample, the initial weights and the minibatch order."""
    tensorboard: bool = False
    """Also log the history to TensorBoard, in RUN/tensorboard (pip install 'saekit[tensorboard]')."""

    def problems(self) -> list[str]:
        problems = []
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError):
            problems.append(f"--device {self.device!r} is not a torch device; use 'cpu' or 'cuda' (or 'cuda:N')")
        if not 0 <= self.seed < SEED_LIMIT:
            problems.append(f"--seed must lie in 0 ... 2^64-1 (got {self.seed})")
        return problems

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def require_device(self) -> None:
        """Refuse, in one line, to work on a device this machine does not have (checked when work starts)."""
        if torch.device(self.device).type == "cuda" and not torch.cuda.is_available():
            raise UserError(
                f"--device {self.device} was asked for, but PyTorch sees no CUDA GPU here; use --device cpu"
            )


# The parts other than the model, by name; the model's fields depend on its kind.
PARTS: dict[str, type[Settings]] = {
    "data": DataConfig,
    "optim": OptimConfig,
    "run": RunConfig,
    "classify": ClassifyConfig,
}
PART_OF = {f.name: part for part, cls in PARTS.items() for f in dataclasses.fields(cls)}


def kind_fields(kind: str) -> set[str]:
    return {f.name for f in dataclasses.fields(kinds.kind_class(kind).Config)}


def kinds_taking(name: str) -> list[str]:
    """The kinds that have a setting of this name."""
    return [kind for kind in kinds.KINDS if name in kind_fields(kind)]


@dataclass
class TrainConfig:
    """Every setting of a run, in its parts (see the module docstring)."""

    data: DataConfig = field(default_factory=DataConfig)
    model: kinds.ModelConfig = field(default_factory=SigmoidConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)

    def __post_init__(self):
        problems = []
        if self.model.minibatch_only and self.optim.full_batch:
            problems.append(f"--kind {self.model.kind} trains with minibatches: use --optimizer adam")
        if self.classify.classify != "none" and not self.data.labelled:
            problems.append("--classify needs labelled data: --data mnist or fashion-mnist")
        if (self.classify.stack or self.classify.classify != "none") and self.data.data not in NAMED:
            problems.append(f"--stack and --classify need data held in memory ({', '.join(NAMED)})")
        if self.optim.scale_inputs and self.model.output != "linear":
            problems.append("--scale-inputs needs --output linear (a sigmoid output cannot be rescaled)")
        if problems:
            raise UserError("invalid configuration: " + "; ".join(problems) + ".")

    def parts(self) -> dict[str, Settings]:
        return {"data": self.data, "model": self.model, "optim": self.optim, "run": self.run, "classify": self.classify}

    def to_dict(self) -> dict:
        """Nested: {"data": {...}, "model": {"kind": ..., ...}, "optim": ..., "run": ..., "classify": ...}."""
        return {name: part.to_dict() for name, part in self.parts().items()}

    def flat(self) -> dict:
        """Every setting under its one name, the kind included."""
        return {k: v for part in self.parts().values() for k, v in part.to_dict().items()}

    @classmethod
    def from_flat(cls, values: dict) -> "TrainConfig":
        """Sort flat settings into their parts; a setting no part has, or that the kind lacks, is an error."""
        values = dict(values)
        kind = values.pop("kind", "sigmoid")
        own = kind_fields(kind)
        parts: dict[str, dict] = {name: {} for name in PARTS}
        model: dict = {}
        problems = []
        for name, value in values.items():
            if name in PART_OF:
                parts[PART_OF[name]][name] = value
            elif name in own:
                model[name] = value
            elif kinds_taking(name):
                problems.append(
                    f"--{dashed(name)} is a setting of {' and '.join(kinds_taking(name))}, not of --kind {kind}"
                )
            else:
                problems.append(f"there is no setting {name!r}")
        built = {name: _collect(problems, PARTS[name], settings) for name, settings in parts.items()}
        model_cfg = _collect(problems, kinds.kind_class(kind).Config, model)
        if problems:
            raise UserError("invalid configuration: " + "; ".join(problems) + ".")
        return cls(model=model_cfg, **built)

    @classmethod
    def from_dict(cls, record: dict) -> "TrainConfig":
        """From to_dict()'s nesting, or from saekit 0.1's flat object (see the module docstring)."""
        return cls.from_flat(flat_settings(record))


def _collect(problems: list[str], cls: type, settings: dict) -> Any:
    """cls(**settings), or None with its problems appended (so that every part's problems are reported at once)."""
    try:
        return cls(**settings)
    except UserError as e:
        problems.append(str(e).removeprefix("invalid configuration: ").removesuffix("."))
    return None


def flat_settings(record: dict) -> dict:
    """Flat settings from a nested config (to_dict), a flat one, or saekit 0.1's (which names "activation")."""
    if not isinstance(record, dict):
        raise UserError("a configuration must be a JSON object of settings.")
    if all(isinstance(record.get(name), dict) for name in ("data", "model")):
        flat = {}
        for name, part in record.items():
            if name not in (*PARTS, "model") or not isinstance(part, dict):
                raise UserError(f"a configuration has parts {', '.join(PARTS)} and model; {name!r} is none of them.")
            flat.update(part)
        return flat
    return _from_version_0_1(record) if "activation" in record else dict(record)


def _from_version_0_1(record: dict) -> dict:
    """saekit 0.1 wrote every setting, used or not, and called the kind "activation": keep what the kind has."""
    values = dict(record)
    kind = values["kind"] = values.pop("activation")
    if not isinstance(kind, str) or kind not in kinds.KINDS:
        raise UserError(f"--kind must be one of {', '.join(kinds.KINDS)} (got {kind!r}).")
    own = kind_fields(kind)
    return {k: v for k, v in values.items() if k == "kind" or k in PART_OF or k in own or not kinds_taking(k)}


def read_config_file(path: str) -> dict:
    """The flat settings of a JSON file: a run folder's config.json, or an object of settings, flat or in parts."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {p} does not exist; give the path of a JSON file of settings.")
    try:
        record = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"config file {p} is not valid JSON ({e}); fix or regenerate it.") from None
    if not isinstance(record, dict):
        raise UserError(f"config file {p} must hold a JSON object of settings.")
    return flat_settings(record.get("config", record))  # a run folder's config.json nests the settings


def build_config(
    preset: str = "ufldl-patches", config_file: str | None = None, overrides: dict | None = None
) -> TrainConfig:
    """Defaults, then the preset, then a JSON config file, then command-line overrides.

    A preset's settings that the chosen kind does not have, or whose value it cannot take, are
    left out (`--preset topk --kind relu` keeps topk's data and optimisation, not its k); a
    file's or an override's are errors. The kind derives settings from its width where none are
    given (`optim_defaults`), and a transcoder (a target key or data) leaves its decoder columns
    free (normalize_decoder off) unless told.
    """
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; `saekit presets` lists them: {', '.join(PRESETS)}.")
    explicit = {**(read_config_file(config_file) if config_file else {}), **(overrides or {})}
    values = {**PRESETS[preset].settings, **explicit}
    kind = values.get("kind", "sigmoid")
    if isinstance(kind, str) and kind in kinds.KINDS:
        own = kind_fields(kind)
        config_class = kinds.kind_class(kind).Config
        values = {
            k: v
            for k, v in values.items()
            if k in explicit or k == "kind" or k in PART_OF or (k in own and accepts(config_class, k, v))
        }
        if (values.get("target_key") or values.get("target_data")) and "normalize_decoder" not in explicit:
            values["normalize_decoder"] = False  # a transcoder's decoder columns stay free (README, "Transcoders")
        n_hidden, k = values.get("n_hidden", config_class.n_hidden), values.get("k")
        if type(n_hidden) is int and n_hidden > 0 and (k is None or (type(k) is int and k > 0)):
            values = {**config_class.optim_defaults(n_hidden, k), **values}  # the kind's rules, e.g. lr by width
    return TrainConfig.from_flat(values)
