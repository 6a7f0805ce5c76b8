"""saekit.data.harvest (and `saekit harvest`) on a tiny random GPT-2 and a word-level tokenizer built here, offline.

The yardstick is independent of the harvest code: the tokenizer splits on whitespace and
knows every word, so a document of w words is w tokens plus one [BOS] per window, and the
expected activations come from running the model directly on each window alone (batch of
one, no padding), reading hidden_states or a forward hook of our own.
"""

import json
import math
import sys

import pytest
import torch
from safetensors import safe_open

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from conftest import assert_one_line_error, run_cli  # noqa: E402

from saekit import __version__  # noqa: E402
from saekit.data.harvest import harvest, resolve_model_folder  # noqa: E402
from saekit.data.vectors import open_vectors  # noqa: E402
from saekit.errors import UserError  # noqa: E402

WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "mat",
    "a",
    "dog",
    "ran",
    "in",
    "park",
    "sun",
    "is",
    "hot",
    "today",
    "big",
    "red",
    "small",
    "green",
    "tree",
]
CONTEXT = 6  # [BOS] + up to 5 words per window
N_LAYERS = 2


def _documents(n=12, seed=0):
    """Lines of 1..14 random words: short ones get padded, long ones span several windows."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 15, (n,), generator=g).tolist()
    return [" ".join(WORDS[i] for i in torch.randint(len(WORDS), (k,), generator=g).tolist()) for k in lengths]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model folder, raw tokenizers.Tokenizer, model, text folder, documents)."""
    root = tmp_path_factory.mktemp("harvest")
    vocabulary = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[BOS]", *WORDS])}
    raw = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocabulary, unk_token="[UNK]"))
    raw.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    raw.post_processor = tokenizers.processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 2)])
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=raw, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]"
    )
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=N_LAYERS,
        n_embd=32,
        n_head=2,
        vocab_size=len(WORDS) + 3,
        n_positions=16,
        bos_token_id=2,
        eos_token_id=2,
        pad_token_id=0,
    )
    model = transformers.GPT2Model(config).eval()
    folder = root / "model"
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    docs = _documents()
    texts = root / "texts"
    (texts / "sub").mkdir(parents=True)
    (texts / "a.txt").write_text("\n".join(docs[:7]) + "\n\n   \n")  # blank lines are skipped
    (texts / "sub" / "b.txt").write_text("\n".join(docs[7:]))
    (texts / "notes.md").write_text("not a .txt file: left out")
    return folder, raw, model, texts, docs


def _windows(raw, doc):
    """Token ids of doc's windows: [BOS] + at most CONTEXT - 1 words each."""
    ids = [raw.token_to_id(w) for w in doc.split()]
    return [[2, *ids[i : i + CONTEXT - 1]] for i in range(0, len(ids), CONTEXT - 1)]


def _expected(tiny, layer=None, module=None, drop_first=False):
    """(n_tokens, d) activations computed window by window, independently of saekit."""
    _, raw, model, _, docs = tiny
    captured = []
    handle = model.get_submodule(module).register_forward_hook(lambda m, i, o: captured.append(o)) if module else None
    rows = []
    with torch.no_grad():
        for doc in docs:
            for window in _windows(raw, doc):
                out = model(input_ids=torch.tensor([window]), output_hidden_states=True)
                h = (captured.pop() if module else out.hidden_states[layer])[0]
                rows.append(h[1:] if drop_first else h)
    if handle:
        handle.remove()
    return torch.cat(rows)


def _read(out):
    shards = sorted(out.glob("shard_*.safetensors"))
    tensors = []
    for path in shards:
        with safe_open(path, framework="pt") as f:
            assert list(f.keys()) == ["activations"]
            tensors.append(f.get_tensor("activations"))
    return shards, tensors


@pytest.mark.slow  # runs a transformer
def test_rows_counts_shards_and_manifest(tiny, tmp_path):
    folder, raw, _, texts, docs = tiny
    out = tmp_path / "out"
    manifest = harvest(
        str(folder), [texts], out, layer=1, context_length=CONTEXT, batch_size=4, shard_size=16, progress=False
    )
    n_words = [len(doc.split()) for doc in docs]
    n_tokens = sum(w + math.ceil(w / (CONTEXT - 1)) for w in n_words)  # words + one [BOS] per window
    shards, tensors = _read(out)
    assert [p.name for p in shards] == [f"shard_{i:05d}.safetensors" for i in range(math.ceil(n_tokens / 16))]
    assert [len(t) for t in tensors[:-1]] == [16] * (len(tensors) - 1)
    assert sum(len(t) for t in tensors) == n_tokens
    assert all(t.dtype == torch.float32 and t.shape[1] == 32 for t in tensors)
    torch.testing.assert_close(torch.cat(tensors), _expected(tiny, layer=1), rtol=1e-5, atol=1e-5)
    # Only finished files: no temporary file is left behind.
    assert sorted(p.name for p in out.iterdir()) == sorted([*(p.name for p in shards), "harvest.json"])
    on_disk = json.loads((out / "harvest.json").read_text())
    assert on_disk == manifest
    assert {
        k: on_disk[k]
        for k in [
            "model",
            "layer",
            "d",
            "n_tokens",
            "n_shards",
            "dtype",
            "context_length",
            "document",
            "saekit_version",
        ]
    } == {
        "model": str(folder),
        "layer": 1,
        "d": 32,
        "n_tokens": n_tokens,
        "n_shards": len(shards),
        "dtype": "float32",
        "context_length": CONTEXT,
        "document": "line",
        "saekit_version": __version__,
    }
    assert on_disk["texts"] == [str(texts / "a.txt"), str(texts / "sub" / "b.txt")]
    source = open_vectors(out)
    assert (source.n, source.d) == (n_tokens, 32)
    torch.testing.assert_close(source.read(10, 30), torch.cat(tensors)[10:30], rtol=0, atol=0)


@pytest.mark.slow  # runs a transformer
def test_hook_module_drop_first_float16_and_max_tokens(tiny, tmp_path):
    folder, _, _, texts, _ = tiny
    expected = _expected(tiny, module="h.0.mlp", drop_first=True)
    out = tmp_path / "out"
    manifest = harvest(
        folder,
        [texts / "a.txt", texts / "sub" / "b.txt"],
        out,
        hook_module="h.0.mlp",
        context_length=CONTEXT,
        batch_size=3,
        max_tokens=40,
        drop_first=True,
        dtype="float16",
        progress=False,
    )
    _, tensors = _read(out)
    assert len(tensors) == 1 and tensors[0].dtype == torch.float16
    assert manifest["n_tokens"] == 40 and manifest["hook_module"] == "h.0.mlp" and manifest["layer"] is None
    torch.testing.assert_close(tensors[0].float(), expected[:40].half().float(), rtol=0, atol=1e-3)


@pytest.mark.slow  # runs a transformer
def test_document_per_file_uses_long_windows(tiny, tmp_path):
    folder, raw, model, texts, docs = tiny
    out = tmp_path / "out"
    manifest = harvest(
        folder, [texts / "sub" / "b.txt"], out, layer=2, context_length=16, document="file", progress=False
    )
    ids = [raw.token_to_id(w) for w in " ".join(docs[7:]).split()]
    windows = [[2, *ids[i : i + 15]] for i in range(0, len(ids), 15)]
    with torch.no_grad():
        expected = torch.cat(
            [model(input_ids=torch.tensor([w]), output_hidden_states=True).hidden_states[2][0] for w in windows]
        )
    assert manifest["n_tokens"] == len(ids) + len(windows)
    torch.testing.assert_close(open_vectors(out).read(0, len(expected)), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # runs a transformer
def test_finished_harvest_is_refused_unless_overwrite(tiny, tmp_path):
    folder, _, _, texts, _ = tiny
    out = tmp_path / "out"
    harvest(folder, texts, out, layer=0, context_length=CONTEXT, shard_size=8, progress=False)
    with pytest.raises(UserError, match="already holds a finished harvest"):
        harvest(folder, texts, out, layer=0, context_length=CONTEXT, progress=False)
    harvest(folder, texts, out, layer=0, context_length=CONTEXT, shard_size=10**6, overwrite=True, progress=False)
    assert [p.name for p in out.glob("*.safetensors")] == ["shard_00000.safetensors"]  # old shards gone


@pytest.mark.slow  # runs a transformer
def test_cli_arguments_and_run(tiny, tmp_path, capsys):
    folder, _, _, texts, _ = tiny
    code = run_cli(
        [
            "harvest",
            "--model",
            str(folder),
            "--text",
            str(texts),
            "--out",
            str(tmp_path / "o"),
            "--layer",
            "1",
            "--context-length",
            str(CONTEXT),
            "--max-tokens",
            "25",
            "--shard-size",
            "10",
            "--no-progress",
        ]
    )
    assert code == 0
    assert "harvested 25 vectors of d=32" in capsys.readouterr().out
    _, tensors = _read(tmp_path / "o")
    assert [len(t) for t in tensors] == [10, 10, 5]
    torch.testing.assert_close(torch.cat(tensors), _expected(tiny, layer=1)[:25], rtol=1e-5, atol=1e-5)
    manifest = json.loads((tmp_path / "o" / "harvest.json").read_text())
    assert (manifest["layer"], manifest["context_length"], manifest["n_tokens"]) == (1, CONTEXT, 25)


@pytest.mark.slow  # runs a transformer
def test_cli_errors_are_one_line(tiny, tmp_path, capsys):
    folder, _, _, texts, _ = tiny
    common = ["harvest", "--model", str(folder), "--text", str(texts), "--out", str(tmp_path / "o"), "--no-progress"]
    assert run_cli([*common, "--layer", "9"]) == 2
    err = capsys.readouterr().err
    # transformers may draw its own "Loading weights" bar on stderr first; saekit's part is one line.
    assert "Traceback" not in err and err.endswith("\n")
    assert [line for line in err.splitlines() if "saekit" in line] == [err.splitlines()[-1]]
    assert err.splitlines()[-1].startswith("saekit: error: layer 9 is out of range")
    assert_one_line_error(run_cli([*common, "--layer", "one"]), capsys.readouterr().err, "--layer")
    assert_one_line_error(run_cli(common[:-3]), capsys.readouterr().err, "--out")  # a required option missing
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_model_folder_from_an_installed_package(tmp_path, monkeypatch):
    package = tmp_path / "site" / "fake_model_pkg"
    (package / "model").mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('located, never imported')\n")
    (package / "model" / "config.json").write_text("{}")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert resolve_model_folder("fake-model-pkg") == package / "model"
    assert resolve_model_folder(str(package / "model")) == package / "model"


@pytest.mark.slow  # runs a transformer
@pytest.mark.parametrize(
    "change, message",
    [
        (dict(model="no/such/folder"), "neither a folder nor an installed Python package"),
        (dict(model="TMP/empty"), "has no config.json"),
        (dict(layer=N_LAYERS + 1), "layer 3 is out of range"),
        (dict(layer=None, hook_module="h.9.mlp"), "no module 'h.9.mlp'"),
        (dict(layer=None), "exactly one of --layer"),
        (dict(texts="TMP/empty"), "no text files"),
        (dict(texts="TMP/missing.txt"), "does not exist"),
        (dict(texts="TMP/blank.txt"), "hold no tokens"),
        (dict(context_length=1), "leaves no text tokens"),
        (dict(context_length=17), "exceeds the model's 16 positions"),
        (dict(shard_size=0), "shard_size is 0"),
    ],
)
def test_errors(tiny, tmp_path, change, message):
    folder, _, _, texts, _ = tiny
    (tmp_path / "empty").mkdir()
    (tmp_path / "blank.txt").write_text("\n  \n\n")
    kwargs = dict(model=folder, texts=texts, out=tmp_path / "out", layer=1, context_length=CONTEXT, progress=False)
    kwargs.update({k: tmp_path / v[4:] if str(v).startswith("TMP/") else v for k, v in change.items()})
    with pytest.raises(UserError, match=message):
        harvest(**kwargs)
    assert not any((tmp_path / "out").glob("*"))  # nothing written


@pytest.mark.slow  # runs a transformer
def test_missing_transformers_names_the_extra(tiny, tmp_path, monkeypatch):
    folder, _, _, texts, _ = tiny
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(UserError, match=r"pip install 'saekit\[harvest\]'"):
        harvest(folder, texts, tmp_path / "out", layer=1, progress=False)
