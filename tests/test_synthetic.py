"""Synthetic ground-truth dictionaries (with a feature hierarchy and correlated pairs) and the scores
against them (recovery, MCC, precision / recall / F1, absorption), against hand-built cases, closed
forms and brute-force loops."""

import itertools
import math

import numpy as np
import pytest
import torch

from saekit.data import DataConfig, load_training_data
from saekit.data.synthetic import (
    SyntheticDictionary,
    absorption,
    assignment,
    best_match,
    dictionary_metrics,
    feature_recovery,
    mcc,
    recovery_score,
)
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


# --- a feature hierarchy and correlated pairs ---------------------------------------------------------


def _active(sample, n_atoms):
    """(n, n_atoms) int: how many entries with a non-zero coefficient name each atom in each row."""
    counts = torch.zeros(sample.values.shape[0], n_atoms, dtype=torch.int64)
    return counts.scatter_add(1, sample.indices, (sample.values > 0).long())


def _within(observed, p, n):
    """observed frequency within 5 standard errors of p over n trials."""
    return abs(observed - p) < 5 * math.sqrt(p * (1 - p) / n)


def test_hierarchy_children_fire_only_with_their_parent_one_at_a_time():
    # 4 parents (atoms 0-3) with 3 children each (atoms 4-15), 24 further atoms: 28 units, 3 drawn per row.
    synth = SyntheticDictionary(d=8, n_atoms=40, k=3, n_parents=4, n_children=3, child_probability=0.6, seed=2)
    assert synth.parent_of.tolist() == [-1] * 4 + [p for p in range(4) for _ in range(3)] + [-1] * 24
    n = 40_000
    sample = synth.sample(n)
    active = _active(sample, 40)
    assert active.max() == 1  # no atom twice in a row
    codes = _dense_loop(sample.values[:200], sample.indices[:200], 40)
    torch.testing.assert_close(sample.x[:200].double(), codes @ synth.atoms.double(), rtol=1e-5, atol=1e-5)
    assert torch.equal(codes > 0, active[:200] > 0)
    units = torch.cat([torch.arange(4), torch.arange(16, 40)])
    assert (active[:, units].sum(1) == 3).all()  # k units per row, children on top
    for p in range(4):
        children = active[:, 4 + 3 * p : 7 + 3 * p]
        assert (children.sum(1) <= 1).all()  # siblings never together
        assert not (children.any(1) & (active[:, p] == 0)).any()  # a child only with its parent
        with_parent = active[:, p] == 1
        rows = int(with_parent.sum())
        assert _within(rows / n, 3 / 28, n)  # a unit's chance to be among 3 of 28, drawn uniformly
        assert _within(float(children[with_parent].any(1).double().mean()), 0.6, rows)
        for j in range(3):
            assert _within(float(children[with_parent, j].double().mean()), 0.6 / 3, rows)


def test_pairs_with_one_draw_follow_their_closed_form():
    # k = 1 of 10 uniform units; pairs (0, 1) and (2, 3). Atom 0 fires when drawn (1/10) or brought by 1
    # (rho/10); both fire when either is drawn and brings the other: P(0 and 1) = 2 rho / 10.
    rho, n = 0.3, 100_000
    synth = SyntheticDictionary(d=4, n_atoms=10, k=1, n_pairs=2, pair_probability=rho, seed=1)
    assert synth.partner_of.tolist() == [1, 0, 3, 2] + [-1] * 6
    active = _active(synth.sample(n), 10).bool()
    assert active.sum(1).max() == 2 and active.max() == 1
    assert _within(float(active[:, 0].double().mean()), (1 + rho) / 10, n)
    assert _within(float((active[:, 0] & active[:, 1]).double().mean()), 2 * rho / 10, n)
    assert _within(float(active[:, 5].double().mean()), 1 / 10, n)
    assert not (active[:, 5] & active[:, [0, 1, 2, 3]].any(1)).any()  # unpaired atoms fire alone


def test_pairs_and_hierarchy_together():
    synth = SyntheticDictionary(d=6, n_atoms=30, k=4, n_parents=2, n_children=2, n_pairs=3, seed=4)
    assert synth.partner_of[6:12].tolist() == [7, 6, 9, 8, 11, 10]  # the pairs come after the hierarchy
    sample = synth.sample(20_000)
    assert sample.values.shape == (20_000, 12)  # k drawn, k children's slots, k partners' slots
    active = _active(sample, 30)
    assert active.max() == 1  # a partner already drawn is not added twice
    both = float((active[:, 6] & active[:, 7]).double().mean())
    assert both > 2 * float(active[:, 6].double().mean()) * float(active[:, 7].double().mean())  # correlated


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(n_parents=2), "both parents and children"),
        (dict(n_children=2), "both parents and children"),
        (dict(n_parents=3, n_children=3), "take 12 atoms, more than the 10"),
        (dict(n_pairs=6), "take 12 atoms"),
        (dict(n_parents=2, n_children=3, child_probability=1.5), "child probability"),
        (dict(n_pairs=1, pair_probability=-0.1), "pair probability"),
        (dict(n_parents=-1, n_children=2), ">= 0"),
        (dict(k=3, n_parents=2, n_children=4), "between 1 and the 2 atoms that are not children"),
    ],
)
def test_bad_structure_raises_user_error(kwargs, message):
    settings = dict(d=3, n_atoms=10, k=2) | kwargs
    with pytest.raises(UserError, match=message):
        SyntheticDictionary(**settings)


def test_training_data_carry_the_hierarchy_and_bad_settings_are_named():
    cfg = DataConfig(data="synthetic", n_examples=50, synthetic_parents=3, synthetic_children=2, synthetic_pairs=1)
    data = load_training_data(cfg, seed=3)
    truth = SyntheticDictionary(64, 256, 8, seed=3, n_parents=3, n_children=2, n_pairs=1)
    assert torch.equal(data.true_parents, truth.parent_of) and torch.equal(data.true_atoms, truth.atoms)
    assert torch.equal(data.x, truth.sample(50).x.double())
    assert "3 parents with 2 children each, 1 correlated pairs" in data.description
    with pytest.raises(UserError, match="synthetic data: a hierarchy needs both"):
        DataConfig(synthetic_parents=3)
    with pytest.raises(UserError, match="synthetic data: the child probability"):
        DataConfig(synthetic_parents=3, synthetic_children=2, synthetic_child_probability=2.0)


# --- one-to-one matching, MCC, precision / recall / F1, absorption ---------------------------------------


def _brute_force_assignment(true_atoms, learned_atoms):
    """The largest sum of signed cosines over every one-to-one matching, by trying them all."""
    t = torch.as_tensor(true_atoms, dtype=torch.float64)
    u = torch.as_tensor(learned_atoms, dtype=torch.float64)
    cos = (t / t.norm(dim=1, keepdim=True)) @ (u / u.norm(dim=1, keepdim=True)).T
    if len(t) <= len(u):
        return max(
            sum(float(cos[i, j]) for i, j in enumerate(p)) for p in itertools.permutations(range(len(u)), len(t))
        )
    return max(sum(float(cos[i, j]) for j, i in enumerate(p)) for p in itertools.permutations(range(len(t)), len(u)))


@pytest.mark.parametrize("n_true,n_learned", [(4, 6), (5, 5), (6, 4)])
def test_assignment_is_the_best_one_to_one_matching(n_true, n_learned):
    g = torch.Generator().manual_seed(n_true * 10 + n_learned)
    true_atoms, learned = torch.randn(n_true, 3, generator=g), torch.randn(n_learned, 3, generator=g)
    match = assignment(true_atoms, learned)
    matched = match.learned >= 0
    assert int(matched.sum()) == min(n_true, n_learned)
    assert len(set(match.learned[matched].tolist())) == int(matched.sum())  # one-to-one
    assert float(match.cosine.sum()) == pytest.approx(_brute_force_assignment(true_atoms, learned), abs=1e-12)
    assert mcc(true_atoms, learned) == pytest.approx(float(match.cosine.sum()) / min(n_true, n_learned), abs=1e-12)


def test_one_to_one_scores_by_hand():
    # Both true atoms are closest to learned atom 0 (cosines 0.9 and 0.72 + 0.6 sqrt(0.19) = 0.9815...);
    # one to one, t0 - l0 (0.9) and t1 - l1 (0.6) sum to 1.5, more than t0 - l1 and t1 - l0 (0.9815).
    true_atoms = [[1.0, 0.0], [0.8, 0.6]]
    learned = [[0.9, math.sqrt(0.19)], [0.0, 1.0]]
    second = 0.72 + 0.6 * math.sqrt(0.19)
    assert best_match(true_atoms, learned).learned.tolist() == [0, 0]
    assert recovery_score(true_atoms, learned) == pytest.approx((0.9 + second) / 2)
    match = assignment(true_atoms, learned)
    assert match.learned.tolist() == [0, 1] and match.cosine.tolist() == pytest.approx([0.9, 0.6])
    assert mcc(true_atoms, learned) == pytest.approx(0.75)
    assert feature_recovery(true_atoms, learned, threshold=0.85) == pytest.approx((0.5, 0.5, 0.5))
    assert feature_recovery(true_atoms, learned, threshold=0.5) == pytest.approx((1.0, 1.0, 1.0))
    # A third learned atom matches nothing: precision 2/3, recall 1, F1 2 (2/3) / (5/3) = 0.8.
    assert feature_recovery(true_atoms, [*learned, [-1.0, 0.0]], threshold=0.5) == pytest.approx((2 / 3, 1.0, 0.8))
    # Flipped atoms are no match (signed cosines), and a missing learned atom leaves a true one out.
    # (Matching each with the other's flip, cosine 0 twice, beats -1 twice.)
    assert mcc([[1.0, 0.0], [0.0, 1.0]], [[-1.0, 0.0], [0.0, -1.0]]) == pytest.approx(0.0)
    assert mcc(true_atoms, [[0.0, 1.0]]) == pytest.approx(0.6)
    assert assignment(true_atoms, [[0.0, 1.0]]).learned.tolist() == [-1, 0]


def test_permuted_copy_has_mcc_and_f1_one():
    atoms = SyntheticDictionary(d=12, n_atoms=30, k=2).atoms
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(0))
    assert mcc(atoms, atoms[perm] * 3) == pytest.approx(1.0)
    assert feature_recovery(atoms, atoms[perm]) == pytest.approx((1.0, 1.0, 1.0))


def test_absorption_by_hand():
    e = torch.eye(3, dtype=torch.float64)
    parent_of = [-1, 0, 0]  # atom 0 is the parent of atoms 1 and 2

    def rows(*atoms):
        return torch.stack(atoms)

    # Child 1's unit carries its parent too (cosine 1/sqrt(2) with each), child 2's does not.
    assert absorption(e, rows(e[0] + e[1], e[2], e[0]), parent_of) == pytest.approx(0.5)
    assert absorption(e, rows(e[0] + e[1], e[2], e[0]), parent_of, threshold=0.8) == 0.0
    # Child 2's unit e0 + 2 e2: cosine 2/sqrt(5) with the child, 1/sqrt(5) = 0.447 with the parent.
    assert absorption(e, rows(e[0] + e[1], e[0] + 2 * e[2]), parent_of) == pytest.approx(1.0)
    assert absorption(e, rows(e[1], e[2], e[0]), parent_of) == 0.0
    assert absorption(e, rows(e[0]), parent_of) == 0.0  # children not learned at all are not absorbed
    with pytest.raises(UserError, match="no hierarchy"):
        absorption(e, e, [-1, -1, -1])
    with pytest.raises(UserError, match="parent_of must hold"):
        absorption(e, e, [-1, 0])
    with pytest.raises(UserError, match="parent_of must hold"):
        absorption(e, e, [-1, 3, 0])


def test_dictionary_metrics_over_the_live_units(monkeypatch):
    e = torch.eye(3, dtype=torch.float64)
    learned = torch.stack([e[0], e[1] + e[0], e[2], -e[0]])  # the last unit never fires
    live = torch.tensor([True, True, True, False])
    metrics = dictionary_metrics(e, learned, live, torch.tensor([-1, 0, -1]))
    assert metrics["recovery"] == pytest.approx((1 + 1 / math.sqrt(2) + 1) / 3)
    assert metrics["mcc"] == pytest.approx((1 + 1 / math.sqrt(2) + 1) / 3)
    assert (metrics["precision"], metrics["recall"], metrics["f1"]) == pytest.approx((2 / 3, 2 / 3, 2 / 3))
    assert metrics["absorption"] == 1.0
    assert dictionary_metrics(e, learned)["precision"] == pytest.approx(2 / 4)  # the dead unit counts when given
    assert "absorption" not in dictionary_metrics(e, learned, live)
    monkeypatch.setattr("saekit.data.synthetic.MAX_ASSIGNMENT", 8)
    assert sorted(dictionary_metrics(e, learned, live)) == ["recovery"]  # 3 x 3 cosines: too many
    with pytest.raises(UserError, match="needs 9 cosines"):
        assignment(e, learned[:3])
