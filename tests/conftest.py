"""Shared pieces for the core tests: an independent implementation of the classic cost, and small data.

`reference_terms` is the issue's cost written out plainly in torch (no buffers, no closed-form
gradient, no clamping), so tests can compare saekit's numbers with it and differentiate it with
autograd. It is the yardstick; nothing in it comes from saekit.
"""

import dataclasses
import os
import signal
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _restore_signal_handlers():
    """Put Ctrl-C and SIGTERM back after each test: an interrupted CLI run ignores them from then on
    (saekit.cli._report, right for a process about to exit), which would leak into later tests. Each
    test starts with Python's own Ctrl-C handler, as a program run from a terminal does, even where
    pytest itself was started with SIGINT ignored (a shell's background job)."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def run_cli(argv):
    """saekit's main(argv) as the shell would see it: the exit status, also when argparse exits."""
    from saekit.cli import main

    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def assert_one_line_error(code, err, *words):
    """A user error: status 2 and one line `saekit: error: ...` naming each of words, no traceback."""
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("saekit: error:"), err
    for word in words:
        assert word in lines[0], lines[0]


def find_mnist_dir() -> Path:
    """The folder holding mnist/ (SAEKIT_DATA_DIR, or ../shared/data beside the repository); else skips the test."""
    for candidate in (os.environ.get("SAEKIT_DATA_DIR"), Path(__file__).resolve().parents[2] / "shared" / "data"):
        if candidate and (Path(candidate) / "mnist" / "t10k-labels-idx1-ubyte.gz").is_file():
            return Path(candidate)
    pytest.skip("real MNIST files not found (set SAEKIT_DATA_DIR or provide ../shared/data)")


def reference_terms(W1, b1, W2, b2, x, lambda_, rho, beta, target=None):
    """(reconstruction, weight decay, sparsity) of J for x (m, n_in); W1 (n_hidden, n_in), W2 (n_in, n_hidden)."""
    y = x if target is None else target
    m = x.shape[0]
    a2 = 1 / (1 + torch.exp(-(x @ W1.T + b1)))
    x_hat = 1 / (1 + torch.exp(-(a2 @ W2.T + b2)))
    reconstruction = 0.5 * ((x_hat - y) ** 2).sum() / m
    decay = lambda_ / 2 * ((W1**2).sum() + (W2**2).sum())
    rho_hat = a2.mean(0)
    kl = rho * torch.log(rho / rho_hat) + (1 - rho) * torch.log((1 - rho) / (1 - rho_hat))
    return reconstruction, decay, beta * kl.sum()


def reference_cost(*args, **kw):
    return sum(reference_terms(*args, **kw))


def random_problem(m=7, n_in=6, n_hidden=4, dtype=torch.float64, seed=0, scale=0.5):
    """Random weights and data in (0, 1): (W1, b1, W2, b2, x) with W2 (n_in, n_hidden) contiguous."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    W1, b1 = scale * randn(n_hidden, n_in), 0.1 * randn(n_hidden)
    W2, b2 = scale * randn(n_in, n_hidden), 0.1 * randn(n_in)
    x = torch.rand(m, n_in, generator=g, dtype=torch.float64) * 0.8 + 0.1
    return tuple(t.to(dtype) for t in (W1, b1, W2, b2, x))


@pytest.fixture(scope="session")
def patches():
    """500 normalised 8x8 natural-image patches, (500, 64) float64 in [0.1, 0.9]."""
    from saekit.data.images import natural_image_patches

    return natural_image_patches(500, 8, seed=0)


def make_model(
    n_inputs: int,
    n_hidden: int,
    kind: str = "sigmoid",
    output: str = "sigmoid",
    *,
    dtype=torch.float64,
    seed: int | None = 0,
    n_outputs: int | None = None,
    **settings,
):
    """A saekit model built as the library builds it (saekit.kinds.build), for tests; a transcoder with
    n_outputs. Settings the kind does not have (k for a sigmoid kind, say) are left out, so one call
    serves every kind."""
    from saekit.kinds import KINDS, build, config

    known = {f.name for f in dataclasses.fields(KINDS[kind].Config)}
    settings = {name: value for name, value in settings.items() if name in known}
    cfg = config(kind, n_hidden=n_hidden, output=output, **settings)
    return build(cfg, n_inputs, n_outputs=n_outputs, dtype=dtype, seed=seed)


def with_random_biases(model, seed: int = 0):
    """model (float64) with non-zero biases b1 ~ 0.1 N(0, 1), b2 ~ 0.3 N(0, 1) drawn from seed + 100, so
    that pre_bias matters; returns it."""
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        model.b1.copy_(0.1 * torch.randn(model.b1.shape, generator=g, dtype=torch.float64))
        model.b2.copy_(0.3 * torch.randn(model.b2.shape, generator=g, dtype=torch.float64))
    return model


def word_tokenizer(words, template: str = "[BOS] $A", **roles):
    """A fast tokenizer, built offline, that splits on whitespace and knows `words`: ids 0 [PAD], 1 [UNK],
    then the special tokens of `roles` (e.g. bos_token="[BOS]", or cls_token and sep_token for
    template "[CLS] $A [SEP]"), then the words. (transformers' tokenizer, raw tokenizers.Tokenizer)"""
    import tokenizers
    import transformers

    roles = roles or {"bos_token": "[BOS]"}
    vocabulary = {w: i for i, w in enumerate(["[PAD]", "[UNK]", *roles.values(), *words])}
    raw = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocabulary, unk_token="[UNK]"))
    raw.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    raw.post_processor = tokenizers.processors.TemplateProcessing(
        single=template, special_tokens=[(t, vocabulary[t]) for t in roles.values()]
    )
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", pad_token="[PAD]", **roles)
    return fast, raw


def word_documents(words, n: int, shortest: int, longest: int, seed: int = 0) -> list[str]:
    """n lines of shortest..longest random words from `words` (seeded)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(shortest, longest + 1, (n,), generator=g).tolist()
    return [" ".join(words[i] for i in torch.randint(len(words), (k,), generator=g).tolist()) for k in lengths]
