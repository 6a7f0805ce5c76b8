"""A feature browser: a static site that shows what each feature of a dictionary responds to.

    saekit browse RUN --data HARVEST --out DIR [--model MODEL]

The site opens from the file system (file://): no server, no network, no fetch. Pages are HTML
with one script (browser.js) and one style sheet; the data travel as script files that assign to
globals (browsers refuse `fetch` of local files but run local scripts):

    DIR/index.html                 every feature: density, mean and max activation, a small histogram
                                   and its top tokens; sortable, searchable by number and by token
    DIR/feature.html#F             feature F: its histogram, top contexts, contexts from several
                                   quantiles, nearest features by decoder cosine, logit effects
    DIR/assets/                    browser.js, browser.css
    DIR/data/meta.js, index.js, vocab.js   the run's description, the index's columns, token strings
    DIR/data/features/NNNNN.js     the pages' data, SHARD_FEATURES features per file: a page loads
                                   one file of a few hundred kilobytes
    DIR/browser.json               what was written (written last)

What is computed, in two passes over the harvest's activations in batches (memory: O(n_hidden *
(TOP + RESERVOIR)) plus one batch; the dictionary encodes each batch, and for k-sparse codes never
makes a dense (batch, n_hidden) tensor):

    pass 1  per feature: how often it fires (code > 0), the sum of its codes, its TOP largest
            codes and their rows, and a uniform random sample of RESERVOIR of the rows where it
            fires (the RESERVOIR largest of independent uniform keys drawn for every (row,
            feature) where it fires: reservoir sampling). Both are running (n_hidden, K) tables
            merged with each batch's non-zero codes by one torch.topk.
    pass 2  per feature: the histogram of its non-zero codes in HIST_BINS bins over (0, max];
            and the codes at every token shown in a context. Pass 1's non-zero codes are kept for
            it while they number at most KEEP_ENTRIES (a TopK dictionary: k per row); beyond
            that, pass 2 encodes the activations again.

A context is a window of the text around a row: BEFORE tokens before it and AFTER after (in its
window, special tokens included), each token tinted by the feature's code there (tokens that are
not in the harvest, like special tokens, are shown grey). Besides the TOP contexts, the
sample's codes are split into BANDS bands of equal count (quantiles of the feature's non-zero
codes) and PER_BAND contexts are shown from each. Nearest features: the NEIGHBOURS largest
cosines between decoder atoms (columns of W2). With `model` (a causal language model), the
tokens whose logits each atom raises and lowers most: atom . W_U (the unembedding), without the
final layer norm.

Size budget: about 4.5 KB per feature in data/features (30 contexts of 14 tokens, token ids and
codes to 3 significant digits) and 150 bytes per feature in data/index.js, plus the strings of
the tokens shown: 16,384 features take about 80 MB, of which a page loads one 300 KB file.
A harvest without provenance (older saekit) still gives the index, histograms and neighbours; the
pages say what is missing.
"""

import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import __version__
from ..data.harvest import (
    Provenance,
    has_lm_head,
    load_model,
    load_provenance,
    load_tokenizer,
    read_manifest,
    resolve_model_folder,
)
from ..data.vectors import check_finite, open_vectors
from ..errors import UserError
from ..files import atomic_write, write_json
from ..kernels.sparse import SparseCodes
from ..run import RunFolder

TOP = 20  # top activating contexts per feature
RESERVOIR = 64  # uniform sample of the rows where a feature fires
BANDS, PER_BAND = 5, 2  # quantile bands of the sample, contexts shown per band
BEFORE, AFTER = 10, 3  # tokens shown before and after the activating one
HIST_BINS = 32  # the feature page's histogram; the index's has HIST_BINS // 2
NEIGHBOURS = 10  # nearest features by decoder cosine
LOGIT_TOKENS = 10  # tokens raised and lowered most, per feature
SHARD_FEATURES = 64  # features per data file
KEEP_ENTRIES = 2**25  # non-zero codes kept from pass 1 for pass 2 (about 0.6 GB); more: encode again
MANIFEST = "browser.json"
TEMPLATES = Path(__file__).parent / "browser_templates"
ASSETS = ("browser.js", "browser.css")


def _import_jinja2():
    try:
        import jinja2
    except ImportError as e:
        raise UserError(
            "the browser needs the jinja2 library, which is not installed: pip install 'saekit[browse]'"
        ) from e
    return jinja2


def _round(values, digits: int = 3) -> list:
    """values (an array) rounded to `digits` significant digits, as Python numbers (short in JSON); NaN -> None."""
    return [None if v != v else v if v == 0 else float(f"{v:.{digits}g}") for v in np.asarray(values).tolist()]


# --- the passes over the activations


def _merge(best: torch.Tensor, payloads: list[torch.Tensor], features, keys, new_payloads) -> tuple:
    """The K largest keys per feature among best (F, K) and new entries (feature, key): (best', payloads').

    payloads are (F, K) tensors aligned with best, new_payloads flat tensors aligned with the new
    entries. The new entries are sorted by feature, then key (largest first); each feature's first K
    fill a (F, K) table of candidates (-inf where it has fewer), and one torch.topk over the (F, 2K)
    pair of tables keeps the K largest, largest first.
    """
    n_features, k = best.shape
    order = torch.from_numpy(np.lexsort((-keys.numpy(), features.numpy())))  # (torch's stable int sort is slow)
    grouped = features[order]
    rank = torch.arange(len(order)) - torch.searchsorted(grouped, grouped)  # place in its feature's run
    first = rank < k
    slots = (grouped[first], rank[first])
    chosen = order[first]

    def table(old: torch.Tensor, new: torch.Tensor, fill) -> torch.Tensor:
        candidates = torch.full_like(old, fill)
        candidates[slots] = new[chosen].to(old.dtype)
        return torch.cat([old, candidates], dim=1)

    merged, where = table(best, keys, -math.inf).topk(k, dim=1)
    return merged, [table(old, new, 0).gather(1, where) for old, new in zip(payloads, new_payloads)]


class _Scan:
    """Pass 1: firing counts, sums, the TOP largest codes and a uniform sample of RESERVOIR firing rows."""

    def __init__(self, n_hidden: int, seed: int = 0):
        self.count = torch.zeros(n_hidden, dtype=torch.float64)
        self.total = torch.zeros(n_hidden, dtype=torch.float64)
        self.top = torch.zeros(n_hidden, TOP)  # codes; 0 where fewer than TOP rows fire
        self.top_rows = torch.full((n_hidden, TOP), -1, dtype=torch.long)
        self.keys = torch.full((n_hidden, RESERVOIR), -1.0)  # -1: no sample yet
        self.sample = torch.zeros(n_hidden, RESERVOIR)
        self.sample_rows = torch.full((n_hidden, RESERVOIR), -1, dtype=torch.long)
        self.generator = torch.Generator().manual_seed(seed)

    def add(self, rows: torch.Tensor, features: torch.Tensor, values: torch.Tensor) -> None:
        """The non-zero codes of a batch: (row, feature, code) entries, rows counted over the whole harvest."""
        n = len(self.count)
        self.count += torch.bincount(features, minlength=n)
        self.total += torch.bincount(features, weights=values.double(), minlength=n)
        self.top, (self.top_rows,) = _merge(self.top, [self.top_rows], features, values, [rows])
        keys = torch.rand(len(values), generator=self.generator)
        self.keys, (self.sample, self.sample_rows) = _merge(
            self.keys, [self.sample, self.sample_rows], features, keys, [values, rows]
        )


def _entries(model, source, batch_size: int, bar):
    """Yield (start, stop, (rows, features, codes)) per batch: the batch's non-zero codes as flat entries,
    rows counted over the whole source. A dictionary with k-sparse codes gives them without a dense
    (batch, n_hidden) tensor."""
    with torch.no_grad():
        for start in range(0, source.n, batch_size):
            stop = min(start + batch_size, source.n)
            x = check_finite(source.read(start, stop).to(model.W1.dtype), source, start)
            h = model.encode(x.to(model.W1.device))
            if isinstance(h, SparseCodes):
                rows = torch.arange(start, stop, device=h.values.device).repeat_interleave(h.values.shape[1])
                features, values = h.indices.flatten(), h.values.flatten()
            else:
                rows, features = h.nonzero(as_tuple=True)
                values, rows = h[rows, features], rows + start
            fired = values > 0
            yield start, stop, (rows[fired].cpu(), features[fired].cpu(), values[fired].float().cpu())
            bar.update(stop - start)


def _counted(batches: list, bar):
    """Yield the batches, counting their rows on the progress bar."""
    for start, stop, entries in batches:
        yield start, stop, entries
        bar.update(stop - start)


def _second_pass(batches, n_hidden: int, maximum: torch.Tensor, pairs: tuple[torch.Tensor, torch.Tensor]):
    """Pass 2 over (start, stop, entries) batches: (histograms (n_hidden, HIST_BINS) of the non-zero codes
    over (0, max], the codes at the (row, feature) pairs)."""
    histograms = torch.zeros(n_hidden * HIST_BINS, dtype=torch.long)
    wanted = pairs[0] * n_hidden + pairs[1]  # (row, feature) as one key, increasing with the row
    order = torch.argsort(wanted)
    wanted_sorted = wanted[order]
    values = torch.zeros(len(wanted))
    scale = HIST_BINS / maximum.clamp_min(1e-30)
    for start, stop, (rows, features, codes) in batches:
        bins = (codes * scale[features]).ceil().long().clamp(1, HIST_BINS) - 1
        histograms += torch.bincount(features * HIST_BINS + bins, minlength=n_hidden * HIST_BINS)
        keys, by_key = torch.sort(rows * n_hidden + features)
        lo, hi = torch.searchsorted(wanted_sorted, torch.tensor([start * n_hidden, stop * n_hidden])).tolist()
        if hi > lo and len(keys):
            at = torch.searchsorted(keys, wanted_sorted[lo:hi]).clamp(max=len(keys) - 1)
            found = keys[at] == wanted_sorted[lo:hi]
            values[order[lo:hi][found]] = codes[by_key[at[found]]]
    return histograms.view(n_hidden, HIST_BINS), values


# --- contexts


def _bands(scan: _Scan) -> list[list[tuple[str, list[int], list[float]]]]:
    """Per feature: [(label, rows, codes)] of the quantile bands of its sample, highest first (top rows left out)."""
    sample, rows, keys = scan.sample.numpy(), scan.sample_rows.numpy(), scan.keys.numpy()
    top_rows = scan.top_rows.numpy()
    result = []
    for f in range(len(sample)):
        ok = (keys[f] >= 0) & ~np.isin(rows[f], top_rows[f])  # a key below 0: the feature did not fire there
        order = np.argsort(sample[f][ok], kind="stable")
        chosen_rows, chosen = rows[f][ok][order], sample[f][ok][order]
        n = len(chosen)
        bands = []
        for b in reversed(range(BANDS)):
            lo, hi = b * n // BANDS, (b + 1) * n // BANDS
            picks: list[int] = (
                np.unique(np.linspace(lo, hi - 1, PER_BAND).round().astype(int)).tolist() if hi > lo else []
            )
            label = f"{100 * b // BANDS}–{100 * (b + 1) // BANDS}%"
            picks.reverse()  # highest first
            bands.append((label, [int(chosen_rows[i]) for i in picks], [float(chosen[i]) for i in picks]))
        result.append(bands)
    return result


class _Contexts:
    """The token ids and harvest rows around context centres: (C, BEFORE + 1 + AFTER) each, -1 where none."""

    def __init__(self, provenance: Provenance, centres: torch.Tensor):
        rows = provenance.rows
        window, position = rows["window"][centres], rows["position"][centres]
        offsets = torch.arange(-BEFORE, AFTER + 1)
        q = position[:, None] + offsets  # positions in the window
        starts = provenance.window_starts
        length = (starts[1:] - starts[:-1])[window][:, None]
        valid = (q >= 0) & (q < length)
        flat = (starts[window][:, None] + q).clamp(0, max(len(provenance.window_tokens) - 1, 0))
        self.tokens = torch.where(valid, provenance.window_tokens[flat].long(), -1)
        # Rows are in text order, so (window, position) keys increase with the row: find them by bisection.
        span = int(length.max()) + 1 if len(length) else 1
        keys = rows["window"] * span + rows["position"]
        wanted = window[:, None] * span + q
        found = torch.searchsorted(keys, wanted).clamp(max=len(keys) - 1)
        self.rows = torch.where(valid & (keys[found] == wanted), found, -1)


def _display_strings(tokenizer, ids: list[int]) -> dict[int, str]:
    """How each token reads in running text: the text a token adds after another one (its leading space or not)."""
    if tokenizer is None:
        return {i: f"#{i}" for i in ids}
    single = tokenizer.batch_decode([[i] for i in ids], clean_up_tokenization_spaces=False)
    double = tokenizer.batch_decode([[i, i] for i in ids], clean_up_tokenization_spaces=False)
    strings = {}
    for i, one, two in zip(ids, single, double):
        strings[i] = two[len(one) :] if two.startswith(one) and len(two) > len(one) else one
    return strings


# --- nearest features and logit effects


def _neighbours(W2: torch.Tensor, block: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(cosines, indices), each (n_hidden, NEIGHBOURS): the features whose decoder atoms are nearest."""
    atoms = torch.nn.functional.normalize(W2.t().float(), dim=1)
    n = len(atoms)
    k = min(NEIGHBOURS, n - 1)
    cosines, indices = torch.zeros(n, k), torch.zeros(n, k, dtype=torch.long)
    for start in range(0, n, block):
        sims = atoms[start : start + block] @ atoms.t()
        sims[torch.arange(len(sims)), torch.arange(start, start + len(sims))] = -math.inf  # not itself
        cosines[start : start + block], indices[start : start + block] = sims.topk(k, dim=1)
    return cosines, indices


def _logit_effects(W2: torch.Tensor, unembedding: torch.Tensor, block: int = 1024):
    """(raised values, raised ids, lowered values, lowered ids), each (n_hidden, LOGIT_TOKENS): atom . W_U."""
    atoms = W2.t().float()
    n = len(atoms)
    k = min(LOGIT_TOKENS, len(unembedding))
    out = [
        torch.zeros(n, k),
        torch.zeros(n, k, dtype=torch.long),
        torch.zeros(n, k),
        torch.zeros(n, k, dtype=torch.long),
    ]
    for start in range(0, n, block):
        effects = atoms[start : start + block] @ unembedding.t().float()
        stop = start + len(effects)
        out[0][start:stop], out[1][start:stop] = effects.topk(k, dim=1)
        low, low_ids = (-effects).topk(k, dim=1)
        out[2][start:stop], out[3][start:stop] = -low, low_ids
    return out


def _unembedding(model: str, d: int) -> torch.Tensor:
    """The output embeddings (vocab, d) of a causal language model, offline."""
    folder = resolve_model_folder(model)
    if not has_lm_head(folder):
        raise UserError(
            f"{model} has no language-model head (its config.json names no causal-LM architecture); logit "
            f"effects need one (e.g. GPT2LMHeadModel): leave out --model"
        )
    net, _ = load_model(folder, "cpu", lm_head=True)
    weight = net.get_output_embeddings().weight.detach()
    if weight.shape[1] != d:
        raise UserError(
            f"the unembedding of {model} takes vectors of {weight.shape[1]}, but the dictionary's atoms have {d}; "
            f"logit effects need a dictionary of the residual stream"
        )
    return weight


# --- the site


def _check_out(out: Path) -> None:
    """Refuse an output that is a file, or a folder holding anything but a site (whole or cut short)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} is a file; give a folder")
    ours = {MANIFEST, "index.html", "feature.html", "assets", "data"}
    others = (
        [p.name for p in out.iterdir() if p.name not in ours and not p.name.endswith(".tmp")] if out.is_dir() else []
    )
    if others:
        raise UserError(
            f"output folder {out} holds other files ({', '.join(sorted(others)[:3])}); choose an empty or new folder"
        )


class _Site:
    """Writes the site's files atomically and counts their bytes."""

    def __init__(self, out: Path):
        self.out, self.bytes = out, 0

    def write(self, name: str, data: bytes) -> None:
        atomic_write(self.out / name, data)
        self.bytes += len(data)

    def script(self, name: str, assignment: str, obj) -> None:
        self.write(name, f"{assignment} = {json.dumps(obj, separators=(',', ':'), allow_nan=False)};\n".encode())


def browse(
    run,
    data,
    out,
    *,
    model: str | None = None,
    batch_size: int = 4096,
    max_rows: int | None = None,
    progress: bool = True,
) -> dict:
    """Write the feature browser of RUN's dictionary over the harvest `data` into `out`; return its manifest.

    `model` (optional): the causal language model the harvest came from, for the logit effects.
    `max_rows`: use only the first rows of the harvest. See the module docstring.
    """
    jinja2 = _import_jinja2()
    if batch_size < 1 or (max_rows is not None and max_rows < 1):
        raise UserError(f"batch_size ({batch_size}) and max_rows ({max_rows}) must be positive integers")
    out, started = Path(out), time.time()
    _check_out(out)
    sae = RunFolder(run).load_model()
    sae.eval()
    manifest = read_manifest(data)
    source = open_vectors(data)
    if source.d != sae.n_inputs:
        raise UserError(f"{data} holds vectors of {source.d}, but the dictionary in {run} takes {sae.n_inputs}")
    n_rows = source.n if max_rows is None else min(source.n, max_rows)
    provenance, tokenizer = load_provenance(data), load_tokenizer(data)
    unembedding = _unembedding(model, sae.n_inputs) if model is not None else None

    bar = tqdm(total=2 * n_rows, unit="row", desc="browse", disable=not progress, file=sys.stderr)
    view = _Prefix(source, n_rows)
    scan = _Scan(sae.n_hidden)
    kept: list | None = []  # pass 1's entries, for pass 2, while they fit in KEEP_ENTRIES
    for start, stop, entries in _entries(sae, view, batch_size, bar):
        scan.add(*entries)
        if kept is not None and sum(len(e[2][0]) for e in kept) + len(entries[0]) <= KEEP_ENTRIES:
            kept.append((start, stop, entries))
        else:
            kept = None
    pages = _Pages(scan, n_rows)
    pairs = (torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    if provenance is not None:
        provenance = provenance._replace(rows={k: v[:n_rows] for k, v in provenance.rows.items()})
        pages.contexts = _Contexts(provenance, pages.centres)
        has = pages.contexts.rows >= 0
        pairs = (pages.contexts.rows[has], pages.owners[:, None].expand_as(has)[has])
    again = _entries(sae, view, batch_size, bar) if kept is None else _counted(kept, bar)
    pages.histograms, values = _second_pass(again, sae.n_hidden, scan.top[:, 0], pairs)
    bar.close()
    if pages.contexts is not None:
        pages.acts = torch.full(pages.contexts.rows.shape, math.nan)
        pages.acts[pages.contexts.rows >= 0] = values
    pages.cosines, pages.near = _neighbours(sae.W2.detach().cpu())
    if unembedding is not None:
        pages.effects = _logit_effects(sae.W2.detach().cpu(), unembedding)
    strings = _display_strings(tokenizer, pages.token_ids())

    if out.is_dir():  # a site written before: it goes first, its manifest before all
        (out / MANIFEST).unlink(missing_ok=True)
        shutil.rmtree(out / "data", ignore_errors=True)
    site = _Site(out)
    n_shards = math.ceil(sae.n_hidden / SHARD_FEATURES)
    for s in tqdm(range(n_shards), unit="file", desc="write", disable=not progress, file=sys.stderr):
        features = range(s * SHARD_FEATURES, min((s + 1) * SHARD_FEATURES, sae.n_hidden))
        site.script(f"data/features/{s:05d}.js", f"SAEKIT_SHARDS[{s}]", pages.records(features))
    meta = {
        "run": str(run),
        "data": str(data),
        "model": manifest.get("model"),
        "layer": manifest.get("layer"),
        "hook_module": manifest.get("hook_module"),
        "target_layer": manifest.get("target_layer") if sae.transcoder else None,
        "target_hook_module": manifest.get("target_hook_module") if sae.transcoder else None,
        "logit_model": model,
        "n_features": sae.n_hidden,
        "n_rows": n_rows,
        "d": sae.n_inputs,
        "dictionary": sae.describe(),
        "shard_features": SHARD_FEATURES,
        "hist_bins": HIST_BINS,
        "before": BEFORE,
        "missing": _missing(provenance, tokenizer),
        "saekit_version": __version__,
    }
    site.script("data/meta.js", "var SAEKIT_META", meta)
    site.script("data/vocab.js", "var SAEKIT_VOCAB", {str(i): text for i, text in strings.items()})
    site.script("data/index.js", "var SAEKIT_INDEX", pages.index())
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True)
    for asset in ASSETS:
        site.write(f"assets/{asset}", (TEMPLATES / asset).read_bytes())
    for page in ("feature.html", "index.html"):
        site.write(page, env.get_template(page).render(meta=meta).encode())
    result = {**meta, "bytes": site.bytes, "seconds": round(time.time() - started, 3)}
    write_json(out / MANIFEST, result)
    return result


class _Prefix:
    """The first n rows of a source (a VectorSource view)."""

    def __init__(self, source, n: int):
        self.source, self.n, self.d, self.name = source, n, source.d, source.name

    def read(self, start: int, stop: int) -> torch.Tensor:
        return self.source.read(start, stop)

    def where(self, row: int) -> str:
        return self.source.where(row)


def _missing(provenance, tokenizer) -> list[str]:
    """What the harvest lacks for the pages, said plainly."""
    if provenance is None:
        return [
            "This harvest has no provenance (it was written by an older saekit), so the pages show no text: "
            "harvest again with this saekit to see each feature's contexts."
        ]
    if tokenizer is None:
        return ["This harvest has no tokenizer folder: tokens are shown by their ids."]
    return []


class _Pages:
    """Everything the pages show, as arrays over features and contexts, and the JSON records made from them.

    Contexts are ordered feature by feature: a feature's TOP contexts (those with a positive code),
    then its bands' contexts, highest band first.
    """

    def __init__(self, scan: _Scan, n_rows: int):
        self.scan, self.n_rows = scan, n_rows
        self.bands = _bands(scan)
        rows: list[int] = []
        owners: list[int] = []
        values: list[float] = []
        top_rows, top = scan.top_rows.tolist(), scan.top.tolist()
        for f, feature_bands in enumerate(self.bands):
            n_top = sum(v > 0 for v in top[f])
            rows += top_rows[f][:n_top] + [r for _, rs, _ in feature_bands for r in rs]
            values += top[f][:n_top] + [v for _, _, vs in feature_bands for v in vs]
            owners += [f] * (len(rows) - len(owners))
        self.centres, self.owners = torch.tensor(rows, dtype=torch.long), torch.tensor(owners, dtype=torch.long)
        self.values = torch.tensor(values)
        self.first = np.searchsorted(self.owners.numpy(), np.arange(scan.top.shape[0] + 1))  # each feature's first
        self.contexts: _Contexts | None = None
        self.acts = torch.zeros(0)  # (contexts, BEFORE + 1 + AFTER) codes at the shown tokens; NaN: not harvested
        self.histograms = torch.zeros(0)
        self.cosines, self.near = torch.zeros(0), torch.zeros(0, dtype=torch.long)
        self.effects: list[torch.Tensor] | None = None

    def token_ids(self) -> list[int]:
        """Every token id the pages show."""
        ids = set(self.contexts.tokens[self.contexts.tokens >= 0].tolist()) if self.contexts is not None else set()
        if self.effects is not None:
            ids |= {*self.effects[1].flatten().tolist(), *self.effects[3].flatten().tolist()}
        return sorted(ids)

    def records(self, features: range) -> list[dict]:
        """One JSON-ready dict per feature (browser.js draws them)."""
        lo, hi = int(self.first[features.start]), int(self.first[features.stop])
        shown = [{"r": r, "v": v} for r, v in zip(self.centres[lo:hi].tolist(), _round(self.values[lo:hi]))]
        if self.contexts is not None:
            for entry, tokens, acts in zip(shown, self.contexts.tokens[lo:hi].tolist(), self.acts[lo:hi].numpy()):
                entry["t"], entry["a"] = tokens, _round(acts)
        scan = self.scan
        records = []
        for f in features:
            mine = shown[int(self.first[f]) - lo : int(self.first[f + 1]) - lo]
            n, n_top = float(scan.count[f]), int((scan.top[f] > 0).sum())
            bands, at = [], n_top
            for label, rows, _ in self.bands[f]:
                bands.append({"label": label, "contexts": mine[at : at + len(rows)]})
                at += len(rows)
            record = {
                "f": f,
                "n": int(n),
                "density": n / self.n_rows,
                "mean": float(scan.total[f]) / n if n else 0.0,
                "max": float(scan.top[f, 0]),
                "hist": self.histograms[f].tolist(),
                "top": mine[:n_top],
                "bands": bands,
                "near": [[j, c] for j, c in zip(self.near[f].tolist(), _round(self.cosines[f]))],
            }
            if self.effects is not None:
                record["up"] = [[i, v] for i, v in zip(self.effects[1][f].tolist(), _round(self.effects[0][f]))]
                record["down"] = [[i, v] for i, v in zip(self.effects[3][f].tolist(), _round(self.effects[2][f]))]
            records.append(record)
        return records

    def index(self) -> dict:
        """The index page's data: one array per column."""
        scan = self.scan
        count = scan.count.numpy()
        tokens: list[list[int]] = [[] for _ in count]
        if self.contexts is not None:
            centre_tokens = self.contexts.tokens[:, BEFORE].tolist()
            for f in range(len(count)):
                for c in range(int(self.first[f]), int(self.first[f]) + int((scan.top[f] > 0).sum())):
                    if centre_tokens[c] not in tokens[f] and len(tokens[f]) < 8:
                        tokens[f].append(centre_tokens[c])
        return {
            "density": _round(count / self.n_rows),
            "mean": _round(np.where(count > 0, scan.total.numpy() / np.maximum(count, 1), 0)),
            "max": _round(scan.top[:, 0]),
            "hist": self.histograms.view(len(count), HIST_BINS // 2, 2).sum(2).tolist(),
            "tokens": tokens,
        }
