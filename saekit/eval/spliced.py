"""Spliced evaluation: how much of a model's behaviour survives when a layer is replaced by the dictionary.

    saekit eval RUN --model MODEL --layer L --text PATH

The model reads the text as `saekit harvest` reads it (the same windows, batches and kept tokens;
see saekit.data.harvest), and each batch runs four times: clean; with the layer's output
replaced, at the kept tokens, by the dictionary's reconstruction of it ("spliced"); by zeros
("zero"); and by the mean activation over the kept tokens of the whole text ("mean_ablation").
Special tokens, padding and (with drop_first) the first token keep their clean activations, as
they are not in a harvest either. The replacement is a forward hook on the module whose output
is hidden_states[L]: the outermost one, found by running the model once with every module
hooked (for BERT, encoder.layer.{L-1}; for GPT-2, h.{L-1}, and ln_f for the last layer); or on
the base model's module `hook_module`. The dictionary works in the model's activation space (a
run trained with --scale-inputs has the scale folded into its saved weights).

Causal language models (saved with a language-model head, e.g. GPT2LMHeadModel; loaded with
AutoModelForCausalLM). A prediction is the model's distribution at position t over token t+1;
it counts where token t+1 is a text token (neither padding nor special). Log-softmax in float32;
sums over all predictions of the text, divided by their number before any ratio:

    ce_loss_X      mean over predictions of -log p_X(token t+1), X in clean, spliced, zero, mean_ablation
    ce_loss_score  (ce_loss_zero - ce_loss_spliced) / (ce_loss_zero - ce_loss_clean): 1 = as the clean model
    kl_X           mean over predictions of KL(p_clean || p_X)
    kl_score       (kl_zero - kl_spliced) / kl_zero

Models without one (sentence encoders such as all-MiniLM-L6-v2, loaded with AutoModel): a
window's output is the mean of its last hidden states over its tokens (sentence-transformers'
mean pooling; padding left out), and

    cosine_X       mean over windows of the cosine between the clean and the X output
    cosine_score   (cosine_spliced - cosine_zero) / (1 - cosine_zero)

Both add the dictionary's reconstruction metrics on the same tokens (saekit.eval.metrics.
evaluate_stream: mse, fvu, l0, dead_fraction, ...).

Transcoders. With `target_layer` or `target_hook_module` (the place the transcoder reconstructs,
e.g. an MLP's output "h.3.mlp" from its input "h.3.ln_2"), the replaced output is the target's:
spliced, it is the transcoder's output computed from the clean input activations (the input
comes before the target, so its activations are the clean run's), and the mean ablation is the
target's mean. A transcoder spliced in place of an MLP is how it is judged in practice.
"""

import sys

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.harvest import (
    Batch,
    Point,
    TextModel,
    capture,
    check_max_tokens,
    first_output,
    has_lm_head,
    open_text_model,
    resolve_model_folder,
    text_tokens,
)
from ..data.vectors import ArraySource, PairedSource
from ..errors import UserError
from .metrics import evaluate_stream

REPLACEMENTS = ("spliced", "zero", "mean_ablation")


def module_name(reader: TextModel, batch: Batch, point: Point) -> str:
    """The name (in the base model) of the module whose output is the point: its hook_module, or the
    outermost module whose output is hidden_states[layer] on batch (among modules at the same depth,
    the last to finish)."""
    if point.hook_module is not None:
        return point.hook_module
    layer = point.layer
    finished: list[tuple[str, torch.Tensor]] = []
    hooks = [
        module.register_forward_hook(lambda m, i, output, name=name: finished.append((name, first_output(output))))
        for name, module in reader.net.base_model.named_modules()
        if name
    ]
    try:
        with torch.no_grad():
            hidden = reader.forward(batch, output_hidden_states=True).hidden_states[layer]
    finally:
        for hook in hooks:
            hook.remove()
    matches = [
        name
        for name, output in finished
        if isinstance(output, torch.Tensor) and output.shape == hidden.shape and torch.equal(output, hidden)
    ]
    if not matches:
        raise UserError(
            f"no module of the {reader.net.config.model_type} model outputs hidden_states[{layer}], so it "
            f"cannot be replaced; name the module to splice with --hook-module"
        )
    return min(reversed(matches), key=lambda name: name.count("."))


def _replacing(keep: torch.Tensor, values: torch.Tensor):
    """A forward hook that puts values (n_kept, d) at the kept tokens (batch, seq) of the module's output."""

    def hook(module, inputs, output):
        hidden = first_output(output).clone()
        hidden[keep.to(hidden.device)] = values.to(hidden.device, hidden.dtype)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    return hook


def _run(reader: TextModel, batch: Batch, module: torch.nn.Module, hook=None) -> torch.Tensor:
    """The model's output on batch, with hook on module: logits (batch, seq, vocab), or pooled outputs (batch, d)."""
    handle = module.register_forward_hook(hook) if hook is not None else None
    try:
        out = reader.forward(batch)
    finally:
        if handle is not None:
            handle.remove()
    if hasattr(out, "logits"):
        return out.logits
    mask = batch.attention_mask.to(out.last_hidden_state.device, out.last_hidden_state.dtype)[..., None]
    return (out.last_hidden_state * mask).sum(1) / mask.sum(1)


def _take(batches, reader: TextModel, max_tokens: int | None) -> list[Batch]:
    """The batches up to the window in which max_tokens kept tokens are reached (all of them for None)."""
    taken, n = [], 0
    for batch in batches:
        counts = n + reader.kept(batch).sum(1).cumsum(0)
        if max_tokens is not None and int(counts[-1]) >= max_tokens:
            j = int((counts < max_tokens).sum()) + 1
            taken.append(Batch(batch.input_ids[:j], batch.attention_mask[:j], batch.documents[:j], batch.first_window))
            break
        taken.append(batch)
        n = int(counts[-1])
    return taken


def _ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator; NaN where the denominator is 0 (the ablation changed nothing)."""
    return numerator / denominator if denominator != 0 else float("nan")


class _Totals:
    """Sums over the text of each output's distance from the clean one (float64), and their count."""

    def __init__(self, causal: bool):
        self.causal = causal
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, name: str, value: torch.Tensor) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + float(value.double())

    def batch(self, clean: torch.Tensor, others: dict[str, torch.Tensor], batch: Batch, special: torch.Tensor) -> None:
        if not self.causal:
            for name, other in others.items():
                self.add(f"cosine_{name}", F.cosine_similarity(clean.double(), other.double(), dim=1).sum())
            self.count += len(clean)
            return
        scored = text_tokens(batch, special)[:, 1:].to(clean.device)  # predictions of text tokens
        targets = batch.input_ids[:, 1:].to(clean.device)[scored][:, None]
        clean_logp = clean[:, :-1].float().log_softmax(-1)[scored]  # (n_predictions, vocab)
        self.add("ce_loss_clean", -clean_logp.gather(1, targets).sum())
        for name, other in others.items():
            logp = other[:, :-1].float().log_softmax(-1)[scored]
            self.add(f"ce_loss_{name}", -logp.gather(1, targets).sum())
            self.add(f"kl_{name}", (clean_logp.exp() * (clean_logp - logp)).sum())
        self.count += len(targets)

    def result(self) -> dict:
        if self.count == 0:
            raise UserError("the text has no tokens to score (every window is too short); give longer text")
        m = {name: value / self.count for name, value in self.sums.items()}
        if not self.causal:
            m["cosine_score"] = _ratio(m["cosine_spliced"] - m["cosine_zero"], 1 - m["cosine_zero"])
            return {"n_windows_scored": self.count, **m}
        m["ce_loss_score"] = _ratio(m["ce_loss_zero"] - m["ce_loss_spliced"], m["ce_loss_zero"] - m["ce_loss_clean"])
        m["kl_score"] = _ratio(m["kl_zero"] - m["kl_spliced"], m["kl_zero"])
        return {"n_predictions": self.count, **m}


@torch.no_grad()
def spliced_eval(
    sae, model: str, texts, *, max_tokens: int | None = None, progress: bool = True, **reading
) -> tuple[dict, torch.Tensor]:
    """The dictionary `sae` spliced into `model` over the text: (metrics, density), density (n_hidden,) each
    unit's firing frequency on the kept tokens. `reading`: how the text is read, as in `saekit harvest`
    (layer or hook_module, a transcoder's target_layer or target_hook_module, context_length, batch_size,
    document, keep_special, drop_first, device; see saekit.data.harvest.open_text_model). See the module
    docstring."""
    check_max_tokens(max_tokens)
    causal = has_lm_head(resolve_model_folder(str(model)))
    reader = open_text_model(model, texts, **reading, lm_head=causal)
    if sae.transcoder != (len(reader.points) == 2):
        raise UserError(
            "this dictionary is a transcoder: give the place it reconstructs with --target-layer or "
            "--target-hook-module"
            if sae.transcoder
            else "--target-layer and --target-hook-module are for transcoders; this dictionary reconstructs its input"
        )
    batches = _take(reader.batches(), reader, max_tokens)
    if not batches:
        raise UserError(f"the text files ({reader.files[0]}, ...) hold no tokens; give files with text in them")
    names = [module_name(reader, batches[0], point) for point in reader.points]
    module = reader.net.base_model.get_submodule(names[-1])  # the place replaced: the input's, or the target's
    sae.eval()
    bar = tqdm(total=2 * len(batches), unit="batch", desc="spliced eval", disable=not progress, file=sys.stderr)
    rows = []  # per batch and place: the activations (n_kept, d) at the kept tokens
    for batch in batches:
        captured = capture(
            reader.net,
            batch.input_ids.to(reader.device),
            batch.attention_mask.to(reader.device),
            [Point(None, name) for name in names],
        )
        rows.append([hidden[reader.kept(batch).to(hidden.device)].float() for hidden in captured])
        bar.update()
    places = [torch.cat(parts) for parts in zip(*rows)]  # the input's rows, and a transcoder's targets'
    for name, rows_at, width, verb in zip(names, places, sae.widths, ("takes", "reconstructs")):
        if len(rows_at) == 0 or rows_at.shape[1] != width:
            bar.close()
            what = "no text tokens" if len(rows_at) == 0 else f"vectors of {rows_at.shape[1]}"
            raise UserError(
                f"module {name!r} of {model} gives {what}, but the dictionary {verb} {width}; "
                f"give the layer or module it was trained on"
            )
    sources = [ArraySource(rows_at.cpu()) for rows_at in places]
    metrics, density = evaluate_stream(sae, sources[0] if len(sources) == 1 else PairedSource(*sources))
    mean = places[-1].double().mean(0).float()
    totals = _Totals(causal)
    for batch, captured_rows in zip(batches, rows):
        keep = reader.kept(batch)
        inputs = captured_rows[0].to(sae.W1.device, sae.W1.dtype)
        replaced = captured_rows[-1]
        values = {"spliced": sae.decode(sae.encode(inputs), inputs), "zero": torch.zeros_like(replaced)}
        values["mean_ablation"] = mean.expand_as(replaced)
        clean = _run(reader, batch, module)
        others = {what: _run(reader, batch, module, _replacing(keep, values[what])) for what in REPLACEMENTS}
        totals.batch(clean, others, batch, reader.special_ids)
        bar.update()
    bar.close()
    head = {
        "model": str(model),
        "model_folder": str(reader.folder),
        "head": "causal-lm" if causal else "none (pooled outputs)",
        "layer": reading.get("layer"),
        "hook_module": names[0],
        **({"target_layer": reading.get("target_layer"), "target_hook_module": names[1]} if sae.transcoder else {}),
        "texts": [str(p) for p in reader.files],
        "context_length": reader.context_length,
        "keep_special": reader.keep_special,
        "drop_first": reader.drop_first,
        "n_windows": sum(len(b.input_ids) for b in batches),
        "n_tokens_spliced": len(places[0]),
    }
    return {**head, **totals.result(), **metrics}, density
