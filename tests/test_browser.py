"""saekit.viz.browser (and `saekit browse`): the static feature browser, read in a real browser.

A tiny random GPT-2 with its language-model head reads word-level text (built here, offline);
saekit harvests its layer 1; a ReLU dictionary with known weights is put in a run folder. The
yardstick is computed here from the harvest's activations (read with safetensors) and the
dictionary's weights: codes = relu(x W1^T + b1), densities, maxima, top rows, the words of each
row and its context (the rows are the text's words in order, [BOS] left out), histograms,
decoder cosines and logit effects. Headless Chromium (Debian's `chromium`) opens the pages from
file:// and we read the DOM it rendered; screenshots of both pages are saved (SAEKIT_SCREENSHOTS
names a folder to keep them in). Where chromium is absent the DOM tests skip, saying so.
"""

import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

transformers = pytest.importorskip("transformers")
pytest.importorskip("jinja2")

from conftest import assert_one_line_error, make_model, run_cli, word_documents, word_tokenizer  # noqa: E402

from saekit.data.harvest import harvest  # noqa: E402
from saekit.errors import UserError  # noqa: E402
from saekit.run import RunFolder  # noqa: E402
from saekit.viz.browser import browse  # noqa: E402

WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "in", "park", "sun", "is", "hot", "red", "tree"]
CONTEXT = 12  # [BOS] + 11 words per window
N_HIDDEN = 48
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ROUNDED = 5.1e-3  # the pages show 3 significant digits


def _documents():
    return word_documents(WORDS, 40, 3, 29, seed=2)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """(site folder, expected numbers): a harvest, a run, and the browser written from them."""
    root = tmp_path_factory.mktemp("browse")
    fast, _ = word_tokenizer(WORDS)
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=len(WORDS) + 3, n_positions=16, bos_token_id=2, eos_token_id=2
    )
    lm = transformers.GPT2LMHeadModel(config).eval()
    lm.save_pretrained(root / "model")
    fast.save_pretrained(root / "model")
    docs = _documents()
    (root / "text.txt").write_text("\n".join(docs))
    harvest(root / "model", root / "text.txt", root / "harvest", layer=1, context_length=CONTEXT, progress=False)
    sae = make_model(32, N_HIDDEN, "relu", "linear", dtype=torch.float32, seed=1)
    with torch.no_grad():
        sae.W1.mul_(8)
        sae.b1.copy_(torch.linspace(-1.2, 0.2, N_HIDDEN))  # from features that never fire to dense ones
    RunFolder(root / "run").save_model(sae)
    manifest = browse(root / "run", root / "harvest", root / "site", model=str(root / "model"), progress=False)
    return root / "site", _expected(root, sae, lm, docs), manifest


def _expected(root, sae, lm, docs):
    """Every number the pages show, computed here."""
    x = _activations(root / "harvest").double()
    codes = torch.relu(x @ sae.W1.detach().double().T + sae.b1.detach().double())
    words, window_of, position = [], [], []  # per row: the word, its window, its position in the window
    n_windows = 0
    for doc in docs:
        doc_words = doc.split()
        for start in range(0, len(doc_words), CONTEXT - 1):
            chunk = doc_words[start : start + CONTEXT - 1]
            words += chunk
            window_of += [n_windows] * len(chunk)
            position += list(range(1, len(chunk) + 1))
            n_windows += 1
    atoms = torch.nn.functional.normalize(sae.W2.detach().double().T, dim=1)
    cos = atoms @ atoms.T
    cos.fill_diagonal_(-2)
    effects = sae.W2.detach().double().T @ lm.get_output_embeddings().weight.detach().double().T
    return {
        "codes": codes,
        "density": (codes > 0).double().mean(0),
        "max": codes.max(0).values,
        "mean": codes.sum(0) / (codes > 0).sum(0).clamp(min=1),
        "words": words,
        "window": window_of,
        "position": position,
        "near": cos.topk(10, dim=1),
        "up": effects.topk(10, dim=1).indices,
        "vocab": ["[PAD]", "[UNK]", "[BOS]", *WORDS],
    }


class _Elements(HTMLParser):
    """The elements of an HTML document: (tag, attributes, text inside), in document order."""

    def __init__(self, html):
        super().__init__()
        self.elements, self.open = [], []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        element = [tag, dict(attrs), ""]
        self.elements.append(element)
        if tag not in ("br", "img", "input", "meta", "link"):
            self.open.append(element)

    def handle_endtag(self, tag):
        while self.open:
            if self.open.pop()[0] == tag:
                break

    def handle_data(self, data):
        for element in self.open:
            element[2] += data

    def with_class(self, name):
        return _with_class(self.elements, name)

    def by_id(self, name):
        return next(e for e in self.elements if e[1].get("id") == name)


def _with_class(elements, name):
    return [e for e in elements if name in e[1].get("class", "").split()]


def _chromium(url, screenshot=None):
    """The DOM Chromium rendered for url (file://), after its scripts ran; or a screenshot of it."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium); the browser pages are not checked")
    home = Path(os.environ.get("TMPDIR", "/tmp")) / f"saekit-chromium-{os.getpid()}"
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={home}",
        "--virtual-time-budget=10000",  # lets the data scripts load before the DOM is read
    ]
    command += [f"--screenshot={screenshot}", "--window-size=1200,1600"] if screenshot else ["--dump-dom"]
    done = subprocess.run([*command, url], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _url(folder, page, fragment=""):
    return (folder / page).as_uri() + (f"#{fragment}" if fragment else "")


def _page(folder, page, fragment=""):
    return _Elements(_chromium(_url(folder, page, fragment)))


def _token_text(text):
    return text.strip()


@pytest.mark.slow  # runs chromium
def test_feature_page_shows_the_computed_numbers_and_contexts(site):
    folder, ex, _ = site
    f = int(torch.argsort(ex["density"], descending=True)[len(ex["density"]) // 4])  # a feature of middling density
    assert 0 < ex["density"][f] < 1
    page = _page(folder, "feature.html", str(f))
    for name in ("density", "mean", "max"):
        assert float(page.by_id(name)[1]["data-value"]) == pytest.approx(float(ex[name][f]), rel=1e-5), name
    # The top 20 contexts: the 20 largest codes in order, each at its row (the same word after the same words
    # gives the same code, so rows of equal codes may come in either order).
    column = ex["codes"][:, f]
    top = torch.argsort(column, descending=True)[:20]
    top_section = _with_class(_inside(page, "top"), "context")
    shown = [int(e[1]["data-row"]) for e in top_section]
    assert [float(e[1]["data-value"]) for e in top_section] == pytest.approx(column[top].tolist(), rel=ROUNDED)
    assert column[shown].tolist() == pytest.approx(column[top].tolist(), rel=1e-6) and len(set(shown)) == 20
    # The first context, token by token: the words of its window up to 10 before and 3 after, each tinted by its code.
    row = shown[0]
    w, p = ex["window"][row], ex["position"][row]
    rows = [r for r in range(len(ex["words"])) if ex["window"][r] == w and p - 10 <= ex["position"][r] <= p + 3]
    spans = _spans_of(page, top_section[0])
    tinted = [s for s in spans if "data-act" in s[1]]
    assert [_token_text(s[2]) for s in tinted] == [ex["words"][r] for r in rows]
    assert [float(s[1]["data-act"]) for s in tinted] == pytest.approx(column[rows].tolist(), rel=ROUNDED, abs=1e-9)
    assert sum(float(s[1]["data-act"]) > 0 for s in tinted) == int((column[rows] > 0).sum()) > 0
    centre = next(s for s in spans if "centre" in s[1]["class"])
    assert _token_text(centre[2]) == ex["words"][row] and float(centre[1]["data-act"]) == pytest.approx(
        float(column[row]), rel=ROUNDED
    )
    alpha = float(centre[1]["style"].split(",")[-1].rstrip(");"))
    assert alpha == pytest.approx(1.0, abs=1e-3)  # the top token is tinted fully
    if p - 10 <= 0:  # the window's [BOS] is shown, grey: it is not in the harvest
        assert any(_token_text(s[2]) == "[BOS]" and "none" in s[1]["class"] for s in spans)
    # Contexts from quantiles: codes of the feature at rows outside the top 20, higher bands first.
    banded = _with_class(_inside(page, "bands"), "context")
    assert len(banded) >= 6
    values = [float(e[1]["data-value"]) for e in banded]
    assert all(a >= b for a, b in zip(values, values[1:]))
    for e in banded:
        r = int(e[1]["data-row"])
        assert r not in shown and float(e[1]["data-value"]) == pytest.approx(float(column[r]), rel=ROUNDED)
    # Nearest features by decoder cosine, and the logits the atom raises.
    near = page.with_class("near")
    assert [int(a[1]["href"].lstrip("#")) for a in near] == ex["near"].indices[f].tolist()
    assert [float(a[1]["data-cos"]) for a in near] == pytest.approx(ex["near"].values[f].tolist(), rel=ROUNDED)
    raised = [_token_text(e[2]) for e in _with_class(_inside(page, "up"), "chip")]
    assert raised == [ex["vocab"][i] for i in ex["up"][f].tolist()]
    # The histogram: counts of the non-zero codes in 32 bins over (0, max].
    positive = column[column > 0]
    bins = torch.clamp(torch.ceil(positive / positive.max() * 32), 1, 32).long() - 1
    heights = [e for e in page.elements if e[0] == "rect"]
    counts = [int(e[1]["data-count"]) for e in heights]
    assert counts == torch.bincount(bins, minlength=32).tolist()


def _inside(page, element_id):
    """The elements after the one with element_id up to the end of its section (document order)."""
    start = next(i for i, e in enumerate(page.elements) if e[1].get("id") == element_id)
    end = start + 1
    while end < len(page.elements) and page.elements[end][0] not in ("section",) and "id" not in page.elements[end][1]:
        end += 1
    return page.elements[start:end]


def _spans_of(page, context):
    i = page.elements.index(context)
    spans = []
    for e in page.elements[i + 1 :]:
        if e[0] == "div":
            break
        if "tok" in e[1].get("class", "").split():
            spans.append(e)
    return spans


@pytest.mark.slow  # runs chromium
def test_index_sorts_searches_and_lists_every_feature(site):
    folder, ex, _ = site
    density = ex["density"].tolist()
    page = _page(folder, "index.html")
    rows = [int(e[1]["data-feature"]) for e in page.elements if e[0] == "tr" and "data-feature" in e[1]]
    assert rows == sorted(range(N_HIDDEN), key=lambda f: (-density[f], f))  # by density, highest first
    cells = [float(e[1]["data-value"]) for e in page.with_class("n")][::3]
    assert cells == pytest.approx([density[f] for f in rows], rel=ROUNDED)
    # Sorted by max, lowest first.
    page = _page(folder, "index.html", "sort=max&desc=0")
    rows = [int(e[1]["data-feature"]) for e in page.elements if e[0] == "tr" and "data-feature" in e[1]]
    maxima = ex["max"].tolist()
    assert [round(maxima[f], 5) for f in rows] == sorted(round(m, 5) for m in maxima)
    # Searched by feature number, and by token: the features whose top activations include the word.
    page = _page(folder, "index.html", "q=4")
    rows = [int(e[1]["data-feature"]) for e in page.elements if e[0] == "tr" and "data-feature" in e[1]]
    assert sorted(rows) == [f for f in range(N_HIDDEN) if str(f).startswith("4")]
    word = "cat"
    page = _page(folder, "index.html", f"q={word}")
    rows = [int(e[1]["data-feature"]) for e in page.elements if e[0] == "tr" and "data-feature" in e[1]]
    expected = []
    for f in range(N_HIDDEN):
        column = ex["codes"][:, f]
        top = [r for r in torch.argsort(column, descending=True)[:20].tolist() if column[r] > 0]
        distinct = list(dict.fromkeys(ex["words"][r] for r in top))[:8]
        if word in distinct:
            expected.append(f)
    assert expected and sorted(rows) == expected


@pytest.mark.slow  # runs chromium
def test_screenshots_of_both_pages(site, tmp_path):
    from PIL import Image

    folder, ex, _ = site
    keep = Path(os.environ.get("SAEKIT_SCREENSHOTS", tmp_path))
    keep.mkdir(parents=True, exist_ok=True)
    f = int(torch.argmax(ex["density"]))
    for name, url in [("index", _url(folder, "index.html")), ("feature", _url(folder, "feature.html", str(f)))]:
        path = keep / f"browser-{name}.png"
        _chromium(url, screenshot=path)
        image = np.asarray(Image.open(path).convert("RGB")).astype(float)
        assert image.shape == (1600, 1200, 3)
        tinted = (image[..., 0] > 200) & (image[..., 2] < 150)  # orange: histogram bars, tinted tokens
        assert tinted.sum() > 500, name  # the data were drawn, not just the page's frame


def test_site_is_offline_and_sharded(site):
    folder, _, manifest = site
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert names == [
        "assets/browser.css",
        "assets/browser.js",
        "browser.json",
        "data/features/00000.js",
        "data/index.js",
        "data/meta.js",
        "data/vocab.js",
        "feature.html",
        "index.html",
    ]
    for name in names:
        text = (folder / name).read_text()
        assert "http://" not in text and "https://" not in text and "fetch(" not in text, name
    assert json.loads((folder / "browser.json").read_text()) == manifest
    assert manifest["bytes"] == sum((folder / n).stat().st_size for n in names if n != "browser.json")


@pytest.mark.slow  # runs chromium
def test_old_harvest_without_provenance_says_what_is_missing(site, tmp_path):
    from safetensors.torch import save_file

    harvest_folder = site[0].parent / "harvest"
    old = tmp_path / "old"
    old.mkdir()
    with safe_open(harvest_folder / "shard_00000.safetensors", framework="pt") as f:
        save_file({"activations": f.get_tensor("activations")}, old / "shard_00000.safetensors")
    (old / "harvest.json").write_text(json.dumps({"n_tokens": 1, "saekit_version": "0.2.0"}))
    browse(site[0].parent / "run", old, tmp_path / "site", progress=False)
    page = _page(tmp_path / "site", "feature.html", "47")
    assert "no provenance" in page.with_class("missing")[0][2]
    assert page.with_class("context") and not page.with_class("tok")  # rows and values, no text


def test_errors(site, tmp_path, capsys):
    root = site[0].parent
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds other files"):
        browse(root / "run", root / "harvest", tmp_path / "busy", progress=False)
    sae = make_model(31, 4, "relu", "linear", dtype=torch.float32)
    RunFolder(tmp_path / "narrow").save_model(sae)
    with pytest.raises(UserError, match="vectors of 32, but the dictionary"):
        browse(tmp_path / "narrow", root / "harvest", tmp_path / "s", progress=False)
    with pytest.raises(UserError, match="no finished harvest"):
        browse(root / "run", tmp_path, tmp_path / "s", progress=False)
    code = run_cli(["browse", str(root / "run"), "--data", str(root / "harvest"), "--out", str(tmp_path / "busy")])
    assert_one_line_error(code, capsys.readouterr().err, "holds other files")


@pytest.mark.slow  # runs the model
def test_cli_writes_the_site(site, tmp_path, capsys):
    root = site[0].parent
    out = tmp_path / "site"
    command = ["browse", str(root / "run"), "--data", str(root / "harvest"), "--out", str(out), "--no-progress"]
    assert run_cli([*command, "--max-rows", "100", "--batch-size", "7"]) == 0
    assert "wrote the browser of 48 features over 100 tokens" in capsys.readouterr().out
    meta = json.loads((out / "browser.json").read_text())
    assert (meta["n_rows"], meta["logit_model"]) == (100, None)
    (out / "browser.json").unlink()  # as a site cut short by Ctrl-C leaves it
    assert run_cli(command) == 0  # a site written before is replaced
    assert json.loads((out / "browser.json").read_text())["n_rows"] == len(site[1]["words"])


def _script(path):
    """The value a data script assigns."""
    return json.loads(path.read_text().split("=", 1)[1].strip().rstrip(";"))


@pytest.mark.parametrize("keep", [True, False])  # pass 2 from pass 1's codes, or encoding again
def test_topk_dictionary_data(site, tmp_path, monkeypatch, keep):
    """A k-sparse dictionary (codes that never become a dense tensor): the data files against codes computed here."""
    if not keep:
        monkeypatch.setattr("saekit.viz.browser.KEEP_ENTRIES", 0)
    root = site[0].parent
    sae = make_model(32, 40, "topk", "linear", dtype=torch.float32, seed=2, k=4)
    with torch.no_grad():
        sae.W1.mul_(4)
        sae.b1.copy_(torch.linspace(-0.5, 0.5, 40))
    RunFolder(tmp_path / "run").save_model(sae)
    browse(tmp_path / "run", root / "harvest", tmp_path / "site", batch_size=50, progress=False)
    x = _activations(root / "harvest").double()
    z = x @ sae.W1.detach().double().T + sae.b1.detach().double()
    values, indices = z.topk(4, dim=1)
    codes = torch.zeros_like(z).scatter_(1, indices, values.relu())
    index = _script(tmp_path / "site" / "data" / "index.js")
    features = _script(tmp_path / "site" / "data" / "features" / "00000.js")
    assert index["density"] == pytest.approx((codes > 0).double().mean(0).tolist(), rel=ROUNDED)
    assert index["max"] == pytest.approx(codes.max(0).values.tolist(), rel=ROUNDED)
    for f, record in enumerate(features):
        column = codes[:, f]
        positive = column[column > 0]
        assert record["n"] == len(positive)
        assert [c["v"] for c in record["top"]] == pytest.approx(
            column.topk(min(20, len(positive))).values.tolist(), rel=ROUNDED
        )
        for c in record["top"] + [c for band in record["bands"] for c in band["contexts"]]:
            assert c["a"][10] == pytest.approx(float(column[c["r"]]), rel=ROUNDED) == c["v"]  # the centre token's code
        if len(positive):
            bins = torch.clamp(torch.ceil(positive / positive.max() * 32), 1, 32).long() - 1
            assert record["hist"] == torch.bincount(bins, minlength=32).tolist()


def _activations(folder):
    parts = []
    for path in sorted(folder.glob("shard_*.safetensors")):
        with safe_open(path, framework="pt") as f:
            parts.append(f.get_tensor("activations"))
    return torch.cat(parts)
