"""saekit.data.harvest (and `saekit harvest`) on a tiny random GPT-2 and a word-level tokenizer built here, offline.

The yardstick is independent of the harvest code: the tokenizer splits on whitespace and
knows every word, so a document of w words is w tokens plus one [BOS] per window, and the
expected activations come from running the model directly on each window alone (batch of
one, no padding), reading hidden_states or a forward hook of our own. The expected
provenance (document, window, position, token) is counted here from the same windows.
"""

import json
import math
import sys

import numpy as np
import pytest
import safetensors.torch
import torch
from safetensors import safe_open

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from conftest import assert_one_line_error, run_cli, word_documents, word_tokenizer  # noqa: E402

from saekit import __version__  # noqa: E402
from saekit.data import open_pairs  # noqa: E402
from saekit.data.harvest import harvest, load_provenance, load_tokenizer, resolve_model_folder  # noqa: E402
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
PROVENANCE = ("document", "window", "position", "token")


def _documents():
    """Lines of 1..14 random words: short ones get padded, long ones span several windows."""
    return word_documents(WORDS, 12, 1, 14)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model folder, raw tokenizers.Tokenizer, model, text folder, documents)."""
    root = tmp_path_factory.mktemp("harvest")
    fast, raw = word_tokenizer(WORDS)  # [PAD] 0, [UNK] 1, [BOS] 2, then the words
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


def _all_windows(tiny):
    """[(document, token ids)] of every window, in order."""
    _, raw, _, _, docs = tiny
    return [(d, w) for d, doc in enumerate(docs) for w in _windows(raw, doc)]


def _expected(tiny, layer=None, module=None, drop_first=False, keep_special=False):
    """((n_tokens, d) activations, {name: (n_tokens,) provenance}) computed window by window, independently
    of saekit; [BOS] (position 0 of every window) is left out unless keep_special."""
    model = tiny[2]
    captured = []
    handle = model.get_submodule(module).register_forward_hook(lambda m, i, o: captured.append(o)) if module else None
    rows, where = [], []
    first = 1 if drop_first or not keep_special else 0
    with torch.no_grad():
        for w, (document, window) in enumerate(_all_windows(tiny)):
            out = model(input_ids=torch.tensor([window]), output_hidden_states=True)
            h = (captured.pop() if module else out.hidden_states[layer])[0]
            rows.append(h[first:])
            where += [(document, w, p, window[p]) for p in range(first, len(window))]
    if handle:
        handle.remove()
    return torch.cat(rows), dict(zip(PROVENANCE, torch.tensor(where).T))


def _read(out):
    """(shard paths, activations per shard, {name: provenance over all shards})."""
    shards = sorted(out.glob("shard_*.safetensors"))
    tensors, where = [], {key: [] for key in PROVENANCE}
    for path in shards:
        with safe_open(path, framework="pt") as f:
            assert sorted(f.keys()) == sorted(["activations", *PROVENANCE])
            tensors.append(f.get_tensor("activations"))
            for key in PROVENANCE:
                where[key].append(f.get_tensor(key))
    return shards, tensors, {key: torch.cat(parts) for key, parts in where.items()}


@pytest.mark.slow  # runs a transformer
def test_rows_provenance_shards_and_manifest(tiny, tmp_path):
    folder, raw, _, texts, docs = tiny
    out = tmp_path / "out"
    manifest = harvest(
        str(folder), [texts], out, layer=1, context_length=CONTEXT, batch_size=4, shard_size=16, progress=False
    )
    windows = _all_windows(tiny)
    n_tokens = sum(len(doc.split()) for doc in docs)  # the words: [BOS] is a special token, left out
    shards, tensors, where = _read(out)
    assert [p.name for p in shards] == [f"shard_{i:05d}.safetensors" for i in range(math.ceil(n_tokens / 16))]
    assert [len(t) for t in tensors[:-1]] == [16] * (len(tensors) - 1)
    assert sum(len(t) for t in tensors) == n_tokens
    assert all(t.dtype == torch.float32 and t.shape[1] == 32 for t in tensors)
    expected, expected_where = _expected(tiny, layer=1)
    torch.testing.assert_close(torch.cat(tensors), expected, rtol=1e-5, atol=1e-5)
    for key in PROVENANCE:
        assert torch.equal(where[key], expected_where[key]), key
    # Each row's token is the word at its position in its document's window.
    row = 17
    document, window, position = (int(where[k][row]) for k in ("document", "window", "position"))
    assert docs[document].split()[(window - sum(d < document for d, _ in windows)) * (CONTEXT - 1) + position - 1] == (
        raw.id_to_token(int(where["token"][row]))
    )
    # Only finished files: no temporary file is left behind; windows and the tokenizer sit in folders.
    names = [*(p.name for p in shards), "harvest.json", "windows", "tokenizer"]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
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
            "keep_special",
            "n_special_excluded",
            "n_windows",
            "n_outliers",
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
        "keep_special": False,
        "n_special_excluded": len(windows),  # one [BOS] per window
        "n_windows": len(windows),
        "n_outliers": 0,
    }
    assert on_disk["texts"] == [str(texts / "a.txt"), str(texts / "sub" / "b.txt")]
    # Training reads the activations alone: the only 2-D tensor of each shard.
    source = open_vectors(out)
    assert (source.n, source.d) == (n_tokens, 32)
    torch.testing.assert_close(source.read(10, 30), torch.cat(tensors)[10:30], rtol=0, atol=0)
    # The windows' token ids and the tokenizer come back, so any row can be shown in its context.
    back = load_provenance(out)
    for key in PROVENANCE:
        assert torch.equal(back.rows[key], expected_where[key])
    assert back.window_document.tolist() == [d for d, _ in windows]
    starts = back.window_starts.tolist()
    assert [back.window_tokens[a:b].tolist() for a, b in zip(starts, starts[1:])] == [w for _, w in windows]
    tokenizer = load_tokenizer(out)
    assert tokenizer.convert_ids_to_tokens(windows[3][1]) == ["[BOS]", *(raw.id_to_token(i) for i in windows[3][1][1:])]
    assert sorted(tokenizer.all_special_ids) == [0, 1, 2]


@pytest.mark.slow  # runs a transformer
def test_keep_special_keeps_bos(tiny, tmp_path):
    folder, _, _, texts, docs = tiny
    manifest = harvest(
        folder, texts, tmp_path / "out", layer=2, context_length=CONTEXT, keep_special=True, progress=False
    )
    _, tensors, where = _read(tmp_path / "out")
    expected, expected_where = _expected(tiny, layer=2, keep_special=True)
    torch.testing.assert_close(torch.cat(tensors), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(where["position"], expected_where["position"]) and int((where["token"] == 2).sum()) == len(
        _all_windows(tiny)
    )
    assert manifest["n_special_excluded"] == 0 and manifest["keep_special"] is True


@pytest.mark.slow  # runs a transformer
@pytest.mark.parametrize("sample", [None, 20])
def test_drop_outliers_against_the_median_norm(tiny, tmp_path, monkeypatch, sample):
    """Rows above factor x the median norm go; the median is that of the first OUTLIER_SAMPLE rows."""
    folder, _, _, texts, _ = tiny
    if sample:
        monkeypatch.setattr("saekit.data.harvest.OUTLIER_SAMPLE", sample)
    expected, expected_where = _expected(tiny, layer=1)
    norms = expected.double().norm(dim=1).numpy()
    median = np.median(norms[:sample])
    factor = float(np.quantile(norms, 0.9) / median)  # about the top tenth are outliers
    kept = norms <= factor * median * (1 + 1e-6)
    assert 0 < (~kept).sum() < len(kept) // 4
    manifest = harvest(
        folder,
        texts,
        tmp_path / "out",
        layer=1,
        context_length=CONTEXT,
        batch_size=3,
        drop_outliers=factor,
        progress=False,
    )
    _, tensors, where = _read(tmp_path / "out")
    torch.testing.assert_close(torch.cat(tensors), expected[torch.from_numpy(kept)], rtol=1e-5, atol=1e-5)
    assert torch.equal(where["window"], expected_where["window"][torch.from_numpy(kept)])
    assert manifest["n_outliers"] == int((~kept).sum()) and manifest["n_tokens"] == int(kept.sum())
    assert manifest["outlier_norm_limit"] == pytest.approx(factor * median, rel=1e-5)
    with pytest.raises(UserError, match="drop_outliers is 0.5"):
        harvest(folder, texts, tmp_path / "o2", layer=1, drop_outliers=0.5, progress=False)


def test_old_harvest_without_provenance(tmp_path):
    """A folder of 0.2's harvest (activations only) still streams, and has no provenance to show."""
    x = torch.randn(20, 8)
    (tmp_path / "shard_00000.safetensors").write_bytes(safetensors.torch.save({"activations": x}))
    (tmp_path / "harvest.json").write_text(json.dumps({"n_tokens": 20, "d": 8, "saekit_version": "0.2.0"}))
    assert torch.equal(open_vectors(tmp_path).read(0, 20), x)
    assert load_provenance(tmp_path) is None and load_tokenizer(tmp_path) is None
    with pytest.raises(UserError, match="no finished harvest"):
        load_provenance(tmp_path / "missing")


@pytest.mark.slow  # runs a transformer
def test_hook_module_drop_first_float16_and_max_tokens(tiny, tmp_path):
    folder, _, _, texts, _ = tiny
    expected, expected_where = _expected(tiny, module="h.0.mlp", drop_first=True)
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
    _, tensors, where = _read(out)
    assert len(tensors) == 1 and tensors[0].dtype == torch.float16
    assert manifest["n_tokens"] == 40 and manifest["hook_module"] == "h.0.mlp" and manifest["layer"] is None
    torch.testing.assert_close(tensors[0].float(), expected[:40].half().float(), rtol=0, atol=1e-3)
    assert torch.equal(where["token"], expected_where["token"][:40])


@pytest.mark.slow  # runs a transformer
@pytest.mark.parametrize(
    "reading, inputs, targets",
    [
        (dict(hook_module="h.0.ln_2", target_hook_module="h.0.mlp"), dict(module="h.0.ln_2"), dict(module="h.0.mlp")),
        (dict(layer=1, target_layer=2), dict(layer=1), dict(layer=2)),
        (dict(hook_module="h.1.mlp", target_layer=1), dict(module="h.1.mlp"), dict(layer=1)),  # target first
    ],
)
def test_a_transcoders_inputs_and_targets_in_one_pass(tiny, tmp_path, reading, inputs, targets):
    folder, _, _, texts, _ = tiny
    x, where = _expected(tiny, **inputs)
    y, _ = _expected(tiny, **targets)
    out = tmp_path / "out"
    manifest = harvest(
        folder, texts, out, context_length=CONTEXT, batch_size=3, shard_size=25, progress=False, **reading
    )
    shards = sorted(out.glob("shard_*.safetensors"))
    with_targets = [safetensors.torch.load_file(p) for p in shards]
    assert all(sorted(t) == sorted(["activations", "targets", *PROVENANCE]) for t in with_targets)
    activations, targets = (torch.cat([t[key] for t in with_targets]) for key in ("activations", "targets"))
    torch.testing.assert_close(activations, x, rtol=0, atol=1e-5)
    torch.testing.assert_close(targets, y, rtol=0, atol=1e-5)
    assert torch.equal(torch.cat([t["token"] for t in with_targets]), where["token"])
    assert (manifest["d"], manifest["d_target"]) == (32, 32) and len(shards) > 1
    assert manifest["target_layer"] == reading.get("target_layer")
    assert manifest["target_hook_module"] == reading.get("target_hook_module")
    # Training reads the inputs unless told, and pairs them with the targets when asked.
    assert open_vectors(out).d == 32 and torch.equal(open_vectors(out).read(0, 5), activations[:5])
    paired = open_pairs(out, target_key="targets")
    assert paired.widths == (32, 32)
    assert torch.equal(paired.read(3, 7), torch.cat([activations[3:7], targets[3:7]], 1))


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
            [model(input_ids=torch.tensor([w]), output_hidden_states=True).hidden_states[2][0, 1:] for w in windows]
        )
    assert manifest["n_tokens"] == len(ids) and manifest["n_windows"] == len(windows)
    torch.testing.assert_close(open_vectors(out).read(0, len(expected)), expected, rtol=1e-5, atol=1e-5)
    assert set(load_provenance(out).rows["document"].tolist()) == {0}


@pytest.mark.slow  # runs a transformer
def test_finished_harvest_is_refused_unless_overwrite(tiny, tmp_path):
    folder, _, _, texts, _ = tiny
    out = tmp_path / "out"
    harvest(folder, texts, out, layer=0, context_length=CONTEXT, shard_size=8, progress=False)
    with pytest.raises(UserError, match="already holds a finished harvest"):
        harvest(folder, texts, out, layer=0, context_length=CONTEXT, progress=False)
    harvest(folder, texts, out, layer=0, context_length=CONTEXT, shard_size=10**6, overwrite=True, progress=False)
    assert [p.name for p in out.glob("*.safetensors")] == ["shard_00000.safetensors"]  # old shards gone
    assert [p.name for p in (out / "windows").iterdir()] == ["windows_00000.safetensors"]


def test_training_refuses_an_unfinished_harvest(tiny, tmp_path, capsys):
    """A harvest killed before its manifest leaves whole shards: training on them would silently use part
    of the data, so it is refused in one line, and accepted once the harvest has finished."""
    folder, _, _, texts, _ = tiny
    out = tmp_path / "out"
    harvest(folder, texts, out, layer=0, context_length=CONTEXT, shard_size=8, progress=False)
    manifest = (out / "harvest.json").read_bytes()
    (out / "harvest.json").unlink()  # as a kill before the last write leaves it
    train = ["train", "--preset", "topk", "--data", str(out), "--n-hidden", "16", "--k", "2", "--batch-size", "16"]
    capsys.readouterr()
    code = run_cli([*train, "--out", str(tmp_path / "run"), "--no-progress"])
    assert_one_line_error(code, capsys.readouterr().err, "unfinished harvest", "harvest.json", "run the harvest again")
    assert not (tmp_path / "run").exists()
    (out / "harvest.json").write_bytes(manifest)
    assert run_cli([*train, "--out", str(tmp_path / "run"), "--no-progress"]) == 0


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
            "--keep-special",
            "--drop-outliers",
            "100",
            "--no-progress",
        ]
    )
    assert code == 0
    assert "harvested 25 vectors of d=32" in capsys.readouterr().out
    _, tensors, _ = _read(tmp_path / "o")
    assert [len(t) for t in tensors] == [10, 10, 5]
    expected, _ = _expected(tiny, layer=1, keep_special=True)
    torch.testing.assert_close(torch.cat(tensors), expected[:25], rtol=1e-5, atol=1e-5)
    manifest = json.loads((tmp_path / "o" / "harvest.json").read_text())
    assert (manifest["layer"], manifest["context_length"], manifest["n_tokens"]) == (1, CONTEXT, 25)
    assert (manifest["keep_special"], manifest["drop_outliers"], manifest["n_outliers"]) == (True, 100.0, 0)


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
        (dict(target_layer=N_LAYERS + 1), "layer 3 is out of range"),
        (dict(target_hook_module="h.9.mlp"), "no module 'h.9.mlp'"),
        (dict(target_layer=2, target_hook_module="h.0.mlp"), "at most one of --target-layer"),
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
