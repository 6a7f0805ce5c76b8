"""Synthetic ground-truth dictionaries and the recovery score, against hand-built cases, closed
forms and brute-force loops."""

import math

import numpy as np
import pytest
import torch

from saekit.data.synthetic import SyntheticDictionary, best_match, recovery_score
from saekit.errors import UserError


def _dense_loop(values, indices, n_atoms):
    """(n, n_atoms) float64 codes, written one entry at a time."""
    codes = torch.zeros(values.shape[0], n_atoms, dtype=torch.float64)
    for row in range(values.shape[0]):
        for j in range(values.shape[1]):
            codes[row, indices[row, j]] += float(values[row, j])
    return codes


def _brute_force_score(true_atoms, learned_atoms):
    """Mean over true atoms of the best signed cosine, with plain Python floats."""

    def cosine(a, b):
        na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(x * x for x in b))
        return 0.0 if nb == 0 else sum(x * y for x, y in zip(a, b)) / (na * nb)

    true_atoms, learned_atoms = np.asarray(true_atoms).tolist(), np.asarray(learned_atoms).tolist()
    return sum(max(cosine(t, u) for u in learned_atoms) for t in true_atoms) / len(true_atoms)


# --- the generator ------------------------------------------------------------------------


def test_atoms_are_unit_rows():
    synth = SyntheticDictionary(d=16, n_atoms=40, k=3)
    assert synth.atoms.shape == (40, 16) and synth.atoms.dtype == torch.float32
    torch.testing.assert_close(synth.atoms.double().norm(dim=1), torch.ones(40, dtype=torch.float64))


@pytest.mark.parametrize("alpha", [0.0, 1.5])
def test_samples_use_exactly_k_atoms_and_reconstruct(alpha):
    synth = SyntheticDictionary(d=8, n_atoms=12, k=5, alpha=alpha, seed=3)
    x, values, indices = synth.sample(300)
    assert x.shape == (300, 8) and x.dtype == torch.float32
    codes = _dense_loop(values, indices, 12)
    assert ((codes != 0).sum(dim=1) == 5).all()  # k distinct atoms, all with a non-zero weight
    assert (codes >= 0).all()
    torch.testing.assert_close(x.double(), codes @ synth.atoms.double(), rtol=1e-5, atol=1e-5)


def test_noise_has_the_requested_spread():
    synth = SyntheticDictionary(d=20, n_atoms=30, k=4, noise_std=0.3, seed=1)
    x, values, indices = synth.sample(5000)
    residual = x.double() - _dense_loop(values, indices, 30) @ synth.atoms.double()
    # 100,000 N(0, 0.09) numbers: the sample std is within about 0.3 * 0.01 of 0.3.
    assert abs(residual.std().item() - 0.3) < 0.01
    assert abs(residual.mean().item()) < 0.01


def test_same_seed_same_data():
    a, b = SyntheticDictionary(10, 20, 3, seed=7), SyntheticDictionary(10, 20, 3, seed=7)
    assert torch.equal(a.atoms, b.atoms)
    first_a, first_b = a.sample(50), b.sample(50)
    for t_a, t_b in zip(first_a, first_b):
        assert torch.equal(t_a, t_b)
    assert not torch.equal(a.sample(50).x, first_a.x)  # the stream moves on
    assert torch.equal(a.sample(50, seed=4).x, a.sample(50, seed=4).x)
    assert not torch.equal(a.sample(50, seed=4).x, a.sample(50, seed=5).x)
    assert not torch.equal(SyntheticDictionary(10, 20, 3, seed=8).atoms, a.atoms)


def test_one_draw_follows_the_power_law():
    synth = SyntheticDictionary(d=2, n_atoms=5, k=1, alpha=1.0)
    p = np.array([1, 1 / 2, 1 / 3, 1 / 4, 1 / 5]) / (1 + 1 / 2 + 1 / 3 + 1 / 4 + 1 / 5)
    np.testing.assert_allclose(synth.probabilities.numpy(), p)
    n = 100_000
    counts = np.bincount(synth.sample(n).indices.numpy().ravel(), minlength=5)
    assert np.all(np.abs(counts / n - p) < 5 * np.sqrt(p * (1 - p) / n))


def test_two_draws_without_replacement():
    # Atom i is in a 2-atom sample if drawn first, or drawn second after some j: closed form
    # P(i) = p_i + sum_{j != i} p_j p_i / (1 - p_j).
    synth = SyntheticDictionary(d=2, n_atoms=5, k=2, alpha=1.0)
    p = synth.probabilities.numpy()
    included = np.array([p[i] + sum(p[j] * p[i] / (1 - p[j]) for j in range(5) if j != i) for i in range(5)])
    n = 100_000
    counts = np.bincount(synth.sample(n).indices.numpy().ravel(), minlength=5)
    assert np.all(np.abs(counts / n - included) < 5 * np.sqrt(included * (1 - included) / n))


def test_uniform_use_by_default():
    synth = SyntheticDictionary(d=2, n_atoms=8, k=3)
    n = 40_000
    counts = np.bincount(synth.sample(n).indices.numpy().ravel(), minlength=8)
    q = 3 / 8
    assert np.all(np.abs(counts / n - q) < 5 * np.sqrt(q * (1 - q) / n))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(d=0, n_atoms=5, k=1),
        dict(d=3, n_atoms=0, k=1),
        dict(d=3, n_atoms=5, k=0),
        dict(d=3, n_atoms=5, k=6),
        dict(d=3, n_atoms=5, k=2, noise_std=-1.0),
        dict(d=3, n_atoms=5, k=2, noise_std=float("nan")),
        dict(d=3, n_atoms=5, k=2, alpha=-0.5),
        dict(d=3, n_atoms=100, k=100, alpha=3.0),  # the last atoms would almost never come up
    ],
)
def test_bad_generator_settings_raise_user_error(kwargs):
    with pytest.raises(UserError):
        SyntheticDictionary(**kwargs)


def test_bad_sample_size_raises_user_error():
    with pytest.raises(UserError):
        SyntheticDictionary(3, 5, 2).sample(0)


# --- recovery score -----------------------------------------------------------------------


def test_permuted_rescaled_copy_scores_one():
    atoms = SyntheticDictionary(d=12, n_atoms=30, k=2).atoms
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(0))
    scales = torch.rand(30, 1, generator=torch.Generator().manual_seed(1)) * 5 + 0.1
    learned = atoms[perm] * scales
    match = best_match(atoms, learned)
    torch.testing.assert_close(match.cosine, torch.ones(30, dtype=torch.float64))
    assert torch.equal(perm[match.learned], torch.arange(30))  # each true atom finds its own copy
    assert recovery_score(atoms, learned) == pytest.approx(1.0)
    # Extra learned atoms, dead (zero) ones included, do not lower it.
    extra = torch.cat([learned, torch.zeros(5, 12), torch.randn(20, 12)])
    assert recovery_score(atoms, extra) == pytest.approx(1.0)


def test_random_atoms_match_brute_force():
    gen = torch.Generator().manual_seed(2)
    true_atoms, learned = torch.randn(15, 6, generator=gen), torch.randn(40, 6, generator=gen) * 3
    learned[7] = 0  # a dead unit
    score = recovery_score(true_atoms, learned)
    assert score == pytest.approx(_brute_force_score(true_atoms, learned), abs=1e-12)
    assert 0 < score < 1


def test_missing_atom_lowers_the_score():
    atoms = SyntheticDictionary(d=10, n_atoms=20, k=2, seed=5).atoms
    learned = atoms[1:]  # atom 0 never learned
    score = recovery_score(atoms, learned)
    assert score < 1
    assert score == pytest.approx(_brute_force_score(atoms, learned), abs=1e-12)


def test_hand_built_cases():
    # Flipped atoms do not count (codes are non-negative): best of cos = -1 and 0 is 0.
    assert recovery_score([[1.0, 0.0], [0.0, 1.0]], [[-1.0, 0.0], [0.0, -1.0]]) == pytest.approx(0.0)
    # A zero learned atom has cosine 0; (1, 1) against (1, 0) has cosine 1/sqrt(2).
    assert recovery_score([[1.0, 1.0]], [[0.0, 0.0], [1.0, 0.0]]) == pytest.approx(1 / math.sqrt(2))
    assert recovery_score([[3.0, 4.0]], np.zeros((2, 2))) == 0.0
    match = best_match(np.array([[0.0, 2.0], [1.0, 0.0]]), np.array([[1.0, 0.1], [0.1, 1.0]]))
    assert match.learned.tolist() == [1, 0]
    torch.testing.assert_close(match.cosine, torch.full((2,), 1 / math.sqrt(1.01), dtype=torch.float64))


@pytest.mark.parametrize(
    "true_atoms, learned",
    [
        ([[1.0, 0.0]], [[1.0, 0.0, 0.0]]),  # different d
        ([[0.0, 0.0]], [[1.0, 0.0]]),  # zero true atom
        ([1.0, 0.0], [[1.0, 0.0]]),  # not 2-d
        ([[1.0, float("nan")]], [[1.0, 0.0]]),
        ([[1.0, 0.0]], [[float("inf"), 0.0]]),
        (np.zeros((0, 2)), [[1.0, 0.0]]),
    ],
)
def test_bad_atoms_raise_user_error(true_atoms, learned):
    with pytest.raises(UserError):
        recovery_score(true_atoms, learned)
