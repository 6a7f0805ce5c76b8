"""saekit.eval.spliced (and `saekit eval RUN --model ...`) on a tiny random GPT-2 with its language-model head and a
tiny random BERT, both built here with word-level tokenizers, offline.

The yardstick is written here, independently of saekit: each window runs alone (a batch of one,
no padding); our own forward hook on the module we know holds hidden_states[L] (GPT-2's block
h[L-1] or its final ln_f, BERT's encoder.layer[L-1]) captures the activations and puts in their
place, at the text tokens, the dictionary's reconstruction computed here from its weights, zeros,
or the mean; cross-entropy, KL and the pooled cosine are computed here in float64.
"""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from conftest import assert_one_line_error, make_model, run_cli, word_documents, word_tokenizer  # noqa: E402

from saekit.errors import UserError  # noqa: E402
from saekit.eval import spliced_eval  # noqa: E402
from saekit.run import RunFolder  # noqa: E402

WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "in", "park", "sun", "is", "hot", "today", "big", "red"]
CONTEXT = 7
D = 32


def _documents():
    return word_documents(WORDS, 10, 2, 15, seed=1)


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    path = tmp_path_factory.mktemp("texts") / "docs.txt"
    path.write_text("\n".join(_documents()) + "\n")
    return path


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """(folder, model, raw tokenizer): a GPT-2 with its LM head, ids [PAD] 0, [UNK] 1, [BOS] 2."""
    fast, raw = word_tokenizer(WORDS)
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=D, n_head=2, vocab_size=len(WORDS) + 3, n_positions=16, bos_token_id=2, eos_token_id=2
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    folder = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder, model, raw


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """(folder, model, raw tokenizer): a BERT without a head, ids [PAD] 0, [UNK] 1, [CLS] 2, [SEP] 3."""
    fast, raw = word_tokenizer(WORDS, "[CLS] $A [SEP]", cls_token="[CLS]", sep_token="[SEP]")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=len(WORDS) + 4,
        hidden_size=D,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
    )
    model = transformers.BertModel(config).eval()
    folder = tmp_path_factory.mktemp("bert")
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder, model, raw


def _windows(raw, template, n_special):
    """Each document's windows of token ids, as the tokenizer cuts them (CONTEXT - n_special words each)."""
    windows = []
    for doc in _documents():
        ids = [raw.token_to_id(w) for w in doc.split()]
        step = CONTEXT - n_special
        windows += [template(ids[i : i + step]) for i in range(0, len(ids), step)]
    return windows


def _hooked(module, replace=None):
    """Run-time hook on module: records its output tensor in .seen; replace(h) returns the new output tensor."""
    seen = []

    def hook(m, inputs, output):
        h = output[0] if isinstance(output, tuple) else output
        seen.append(h)
        if replace is None:
            return None
        new = replace(h)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return module.register_forward_hook(hook), seen


def _reference(model, module, windows, special, sae_weights, lm: bool, source=None, W_skip=None):
    """Every number spliced evaluation reports, computed window by window in float64. A transcoder reads
    the output of `source` and replaces that of `module` (with W_skip, x W_skip^T is added to its output)."""
    W1, b1, W2, b2, activation = sae_weights
    source = module if source is None else source
    runs = []
    with torch.no_grad():
        xs, ys = [], []  # per window: (seq, d) activations at source (the dictionary's input) and at module
        for w in windows:
            hooks = [_hooked(m) for m in (source, module)]
            model(input_ids=torch.tensor([w]))
            for handle, _ in hooks:
                handle.remove()
            xs.append(hooks[0][1][0][0].double())
            ys.append(hooks[1][1][0][0].double())
        keeps = [torch.tensor([t not in special for t in w]) for w in windows]
        x = torch.cat([h[k] for h, k in zip(xs, keeps)])
        y = torch.cat([h[k] for h, k in zip(ys, keeps)])
        mean = y.mean(0)

        def reconstruct(x):
            y_hat = activation(x @ W1.double().T + b1.double()) @ W2.double().T + b2.double()
            return y_hat if W_skip is None else y_hat + x @ W_skip.double().T

        codes = activation(x @ W1.double().T + b1.double())
        y_hat = reconstruct(x)
        for w, k, x_w in zip(windows, keeps, xs):
            outputs = {}
            for name, fill in [
                ("clean", None),
                ("spliced", lambda h, x_w=x_w, k=k: reconstruct(x_w[k])),
                ("zero", lambda h: torch.zeros_like(h)),
                ("mean_ablation", lambda h: mean.expand_as(h)),
            ]:

                def replace(h, fill=fill, k=k):
                    new = h.clone()
                    new[0, k] = fill(h[0, k].double()).to(h.dtype)
                    return new

                handle, _ = _hooked(module, None if fill is None else replace)
                out = model(input_ids=torch.tensor([w]))
                handle.remove()
                outputs[name] = out.logits[0].double() if lm else out.last_hidden_state[0].double().mean(0)
            runs.append((w, outputs))
    ref = {
        "n_tokens_spliced": len(x),
        "fvu": float(((y_hat - y) ** 2).sum() / ((y - mean) ** 2).sum()),
        "l0": float((codes > 0).sum(1).double().mean()),
        "dead_fraction": float(((codes > 0).sum(0) == 0).double().mean()),
        "mse": float(((y_hat - y) ** 2).mean()),
    }
    names = ("spliced", "zero", "mean_ablation")
    if lm:
        ce = {name: 0.0 for name in ("clean", *names)}
        kl = {name: 0.0 for name in names}
        n = 0
        for w, outputs in runs:
            clean = torch.log_softmax(outputs["clean"], -1)
            for t in range(len(w) - 1):
                if w[t + 1] in special:
                    continue
                n += 1
                for name, logits in outputs.items():
                    logp = torch.log_softmax(logits, -1)
                    ce[name] -= float(logp[t, w[t + 1]])
                    if name != "clean":
                        kl[name] += float((clean[t].exp() * (clean[t] - logp[t])).sum())
        ref.update({f"ce_loss_{k}": v / n for k, v in ce.items()})
        ref.update({f"kl_{k}": v / n for k, v in kl.items()})
        ref["n_predictions"] = n
        ref["ce_loss_score"] = (ref["ce_loss_zero"] - ref["ce_loss_spliced"]) / (
            ref["ce_loss_zero"] - ref["ce_loss_clean"]
        )
        ref["kl_score"] = (ref["kl_zero"] - ref["kl_spliced"]) / ref["kl_zero"]
    else:
        for name in names:
            cosines = [torch.cosine_similarity(o["clean"], o[name], dim=0) for _, o in runs]
            ref[f"cosine_{name}"] = float(sum(cosines) / len(cosines))
        ref["cosine_score"] = (ref["cosine_spliced"] - ref["cosine_zero"]) / (1 - ref["cosine_zero"])
    return ref


def _partial(d=D, n_dead=16, seed=3):
    """A dictionary that is nearly right: 0.8 x through a noisy encoder, and n_dead units that never fire."""
    g = torch.Generator().manual_seed(seed)
    W1, b1, W2, b2 = _identity(d)
    W1 = torch.cat([W1 + 0.1 * torch.randn(W1.shape, generator=g), torch.randn(n_dead, d, generator=g)])
    b1 = torch.cat([b1, torch.full((n_dead,), -1e3)])
    W2 = torch.cat([0.8 * W2, torch.randn(d, n_dead, generator=g)], dim=1)
    return W1, b1, W2, b2 + 0.01


def _relu_run(path, weights, d=D):
    """A run folder at path holding the relu dictionary (W1, b1, W2, b2); returns (model, weights and activation)."""
    sae = make_model(d, len(weights[1]), "relu", "linear", dtype=torch.float32)
    with torch.no_grad():
        for name, value in zip(("W1", "b1", "W2", "b2"), weights):
            getattr(sae, name).copy_(value)
    RunFolder(path).save_model(sae)
    return sae, (*weights, torch.relu)


def _check(result, ref, rel=2e-4):
    for key, value in ref.items():
        assert result[key] == pytest.approx(value, rel=rel, abs=1e-6), key


@pytest.mark.slow  # runs transformers
@pytest.mark.parametrize(
    "layer, hook_module, found, module",
    [
        (1, None, "h.0", lambda m: m.transformer.h[0]),
        (2, None, "ln_f", lambda m: m.transformer.ln_f),  # the last hidden state is after the final layer norm
        (None, "h.1.mlp", "h.1.mlp", lambda m: m.transformer.h[1].mlp),
    ],
)
def test_causal_lm_matches_an_independent_computation(gpt2, texts, tmp_path, layer, hook_module, found, module):
    folder, model, raw = gpt2
    sae, weights = _relu_run(tmp_path, _partial())
    result, density = spliced_eval(
        sae,
        str(folder),
        texts,
        layer=layer,
        hook_module=hook_module,
        context_length=CONTEXT,
        batch_size=3,
        progress=False,
    )
    windows = _windows(raw, lambda ids: [2, *ids], 1)
    ref = _reference(model, module(model), windows, {0, 1, 2}, weights, lm=True)
    _check(result, ref)
    assert result["hook_module"] == found and result["head"] == "causal-lm"
    assert result["n_windows"] == len(windows)
    # A case where the numbers say something: some units are dead, and each replacement changes the loss.
    assert 0 < ref["dead_fraction"] < 1 and len({ref[f"ce_loss_{k}"] for k in ("clean", "spliced", "zero")}) == 3
    assert len(density) == 2 * D + 16


@pytest.mark.slow  # runs transformers
def test_sentence_encoder_matches_an_independent_computation(bert, texts, tmp_path):
    folder, model, raw = bert
    sae, weights = _relu_run(tmp_path, _partial())
    result, _ = spliced_eval(sae, folder, [texts], layer=1, context_length=CONTEXT, batch_size=4, progress=False)
    windows = _windows(raw, lambda ids: [2, *ids, 3], 2)
    ref = _reference(model, model.encoder.layer[0], windows, {0, 1, 2, 3}, weights, lm=False)
    _check(result, ref)
    assert result["hook_module"] == "encoder.layer.0" and result["head"] == "none (pooled outputs)"
    assert "ce_loss_score" not in result and result["n_windows_scored"] == len(windows)


def _identity(d):
    """relu(x [I; -I]^T) [I, -I]^T = relu(x) - relu(-x) = x, exactly."""
    eye = torch.eye(d)
    return torch.cat([eye, -eye]), torch.zeros(2 * d), torch.cat([eye, -eye], dim=1), torch.zeros(d)


@pytest.mark.slow  # runs transformers
@pytest.mark.parametrize("which", ["gpt2", "bert"])
def test_identity_scores_one_and_zero_dictionary_scores_zero(which, gpt2, bert, texts, tmp_path):
    folder = (gpt2 if which == "gpt2" else bert)[0]
    identity, _ = _relu_run(tmp_path / "identity", _identity(D))
    W1, b1, _, _ = _identity(D)
    zero, _ = _relu_run(tmp_path / "zero", (W1, b1, torch.zeros(D, 2 * D), torch.zeros(D)))
    kw = dict(layer=1, context_length=CONTEXT, progress=False)
    same, _ = spliced_eval(identity, folder, texts, **kw)
    none, _ = spliced_eval(zero, folder, texts, **kw)
    if which == "gpt2":
        assert same["ce_loss_spliced"] == same["ce_loss_clean"] and same["kl_spliced"] == 0
        assert same["ce_loss_score"] == 1 and same["kl_score"] == 1
        assert none["ce_loss_spliced"] == none["ce_loss_zero"] and none["ce_loss_score"] == 0 and none["kl_score"] == 0
        assert none["kl_zero"] > 0
    else:
        assert same["cosine_spliced"] == pytest.approx(1, abs=1e-6) and same["cosine_score"] == pytest.approx(
            1, abs=1e-6
        )
        assert none["cosine_spliced"] == none["cosine_zero"] < 0.999 and none["cosine_score"] == 0
    assert same["fvu"] == 0 and none["fvu"] == pytest.approx(none["fvu"]) and none["fvu"] > 0.9


@pytest.mark.slow  # runs transformers
def test_cli_writes_eval_json(gpt2, texts, tmp_path, capsys):
    folder = gpt2[0]
    _relu_run(tmp_path, _partial())
    common = ["eval", str(tmp_path), "--model", str(folder), "--text", str(texts), "--context-length", str(CONTEXT)]
    assert run_cli([*common, "--layer", "1", "--max-tokens", "20", "--no-progress"]) == 0
    out = capsys.readouterr().out
    written = json.loads((tmp_path / "eval.json").read_text())
    assert written["n_tokens_spliced"] >= 20 and written["hook_module"] == "h.0"
    assert "ce_loss_score" in out and (tmp_path / "eval_density.png").is_file()
    # The first windows up to the one that reaches 20 text tokens.
    lengths = [len(w) - 1 for w in _windows(gpt2[2], lambda ids: [2, *ids], 1)]
    n = next(i for i in range(len(lengths)) if sum(lengths[: i + 1]) >= 20) + 1
    assert (written["n_windows"], written["n_tokens_spliced"]) == (n, sum(lengths[:n]))
    assert_one_line_error(run_cli([*common, "--no-progress"]), capsys.readouterr().err, "--layer")
    assert_one_line_error(run_cli([*common, "--layer", "1", "--data", str(texts)]), capsys.readouterr().err, "--data")
    assert_one_line_error(
        run_cli(["eval", str(tmp_path), "--model", str(folder), "--layer", "1"]), capsys.readouterr().err, "--text"
    )


def _transcoder(d_in, d_hidden, d_out, skip: bool, seed=5):
    """A relu transcoder d_in -> d_out with random weights (and skip connection); returns (model, weights)."""
    g = torch.Generator().manual_seed(seed)
    sae = make_model(d_in, d_hidden, "relu", "linear", dtype=torch.float32, n_outputs=d_out, skip=skip)
    with torch.no_grad():
        for p, scale in [(sae.W1, 0.3), (sae.b1, 0.1), (sae.W2, 0.2), (sae.b2, 0.1), (sae.W_skip, 0.1)]:
            if p is not None:
                p.copy_(scale * torch.randn(p.shape, generator=g))
    weights = (sae.W1.detach(), sae.b1.detach(), sae.W2.detach(), sae.b2.detach(), torch.relu)
    return sae, weights


@pytest.mark.slow  # runs transformers
@pytest.mark.parametrize("skip", [False, True])
def test_a_transcoder_spliced_in_place_of_an_mlp_matches_an_independent_computation(gpt2, texts, skip):
    folder, model, raw = gpt2
    sae, weights = _transcoder(D, 48, D, skip)
    reading = dict(hook_module="h.0.ln_2", target_hook_module="h.0.mlp", context_length=CONTEXT, progress=False)
    result, density = spliced_eval(sae, str(folder), texts, batch_size=3, **reading)
    windows = _windows(raw, lambda ids: [2, *ids], 1)
    block = model.transformer.h[0]
    W_skip = sae.W_skip.detach() if skip else None
    ref = _reference(model, block.mlp, windows, {0, 1, 2}, weights, lm=True, source=block.ln_2, W_skip=W_skip)
    _check(result, ref)
    assert (result["hook_module"], result["target_hook_module"]) == ("h.0.ln_2", "h.0.mlp")
    assert len({ref[f"ce_loss_{k}"] for k in ("clean", "spliced", "zero")}) == 3 and len(density) == 48


@pytest.mark.slow  # runs transformers
def test_a_transcoder_needs_its_target_and_an_autoencoder_refuses_one(gpt2, texts, tmp_path):
    sae, _ = _transcoder(D, 8, D, skip=True)
    with pytest.raises(UserError, match="is a transcoder: give the place it reconstructs"):
        spliced_eval(sae, gpt2[0], texts, hook_module="h.0.ln_2", context_length=CONTEXT, progress=False)
    autoencoder, _ = _relu_run(tmp_path, _partial())
    with pytest.raises(UserError, match="are for transcoders"):
        spliced_eval(autoencoder, gpt2[0], texts, layer=1, target_layer=2, context_length=CONTEXT, progress=False)
    wide, _ = _transcoder(D, 8, D + 1, skip=False)
    with pytest.raises(UserError, match="vectors of 32, but the dictionary reconstructs 33"):
        kw = dict(hook_module="h.0.ln_2", target_hook_module="h.0.mlp", context_length=CONTEXT, progress=False)
        spliced_eval(wide, gpt2[0], texts, **kw)


@pytest.mark.slow  # runs transformers
def test_a_dictionary_of_another_width_is_refused(gpt2, texts, tmp_path):
    W1, b1, W2, b2 = _identity(D + 1)
    sae, _ = _relu_run(tmp_path, (W1, b1, W2, b2), d=D + 1)
    with pytest.raises(UserError, match="vectors of 32, but the dictionary takes 33"):
        spliced_eval(sae, gpt2[0], texts, layer=1, context_length=CONTEXT, progress=False)
