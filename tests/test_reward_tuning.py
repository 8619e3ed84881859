"""What the reward model's fit chooses on its own, and how little it spends choosing: the
id-embedding L2 path (stops where the held-out loss rises; only the chosen L2 runs to full
patience) and the residuals' prior SD (the evidence scan stops past its peak)."""

from __future__ import annotations

from dataclasses import replace
from itertools import pairwise

import numpy as np
import pytest

from genco.models.reward import RewardModelConfig
from genco.models.vocab import encode
from genco.training import reward_fit, term_choice
from genco.training.residuals import (
    EVIDENCE_FALLS,
    RESIDUAL_SD_GRID,
    _log_evidence,
    choose_sd,
)
from genco.worlds.simulate import WORLDS, log_impressions, make_world

SMALL = replace(WORLDS["per_product"], n_ads=8, n_candidates=4)


@pytest.fixture(scope="module")
def small_log():
    world = make_world(SMALL, seed=1)
    return world, encode(log_impressions(world, 30_000, seed=1), world.catalog)


def _fit(world, enc, **kw):
    config = RewardModelConfig(**{"epochs": 6, "batch_size": 2048, "residual": False, **kw})
    return reward_fit.train_reward_model(world.catalog, enc, config)


def _by_the_rule(t: dict) -> float:
    """The L2 the path's rule keeps: the last point tried whose paired held-out gain over the
    point kept before it exceeds L2_PATH_Z standard errors (the first, strongest, otherwise);
    every point tried after the first has its gain recorded and the path stops at the first
    one it does not keep."""
    tried, kept = [float(k) for k in t["l2_id_val_loss"]], None
    assert set(t["l2_id_gain"]) == {str(c) for c in tried[1:]} and t["l2_id_z"] == 1.0
    for i, c in enumerate(tried):
        g = t["l2_id_gain"].get(str(c))
        if g is not None and not g["gain"] > t["l2_id_z"] * g["se"]:
            assert i == len(tried) - 1  # the path stopped there
            break
        kept = c
    return kept


def test_the_path_moves_to_a_weaker_l2_only_past_its_paired_noise(small_log, monkeypatch):
    """With the bar below any difference the path runs to its weakest point; at an
    unreachable bar it never leaves its first, whatever the second's held-out loss."""
    world, enc = small_log
    monkeypatch.setattr(reward_fit, "L2_PATH_Z", -1e9)
    t = _fit(world, enc)[1].tuning
    assert t["l2_id"] == float(list(t["l2_id_val_loss"])[-1]) == reward_fit.L2_ID_GRID[-1]
    monkeypatch.setattr(reward_fit, "L2_PATH_Z", 1e9)
    t = _fit(world, enc)[1].tuning
    assert t["l2_id"] == reward_fit.L2_ID_GRID[0] and len(t["l2_id_val_loss"]) == 2
    gain = t["l2_id_gain"][str(reward_fit.L2_ID_GRID[1])]
    assert gain["se"] > 0 and t["l2_id_z"] == 1e9


def test_l2_path_stops_where_the_held_out_loss_rises(small_log, monkeypatch):
    """A middle point far too strong (10: ids and appeal crushed to zero) fits worse held
    out than the first, so the path ends there: the weaker third point is never fitted."""
    world, enc = small_log
    monkeypatch.setattr(reward_fit, "L2_ID_GRID", (1e-2, 10.0, 1e-4))
    _, report = _fit(world, enc)
    t = report.tuning
    assert list(t["l2_id_val_loss"]) == ["0.01", "10.0"]
    assert t["l2_id_val_loss"]["10.0"] > t["l2_id_val_loss"]["0.01"]
    assert t["l2_id"] == 1e-2


def test_the_chosen_l2_alone_runs_to_full_patience(small_log):
    world, enc = small_log
    _, report = _fit(world, enc, patience=3, epochs=20)
    t = report.tuning
    losses = t["l2_id_val_loss"]
    tried = [float(k) for k in losses]
    assert tried == list(reward_fit.L2_ID_GRID[: len(tried)])
    assert t["l2_id"] == _by_the_rule(t)
    # The chosen point went on from its best weights: its history is the path's epochs plus
    # the rest (within the epoch cap), whose best is never worse than where it started.
    n_path, n_more = t["l2_id_epochs"][str(t["l2_id"])], t["l2_id_final_epochs"]
    assert n_more >= 1 and report.epochs == n_path + n_more <= 20
    assert [h["epoch"] for h in report.history] == list(range(1, report.epochs + 1))
    assert t["val_loss"] <= losses[str(t["l2_id"])]
    assert t["val_loss"] == min(h["val_loss"] for h in report.history)


@pytest.mark.parametrize("kw", [{"patience": 1}, {"epochs": 1}])
def test_nothing_to_go_on_with(small_log, kw):
    """Patience 1: the path's points already ran to full patience. One epoch: the chosen
    point already made every pass ``epochs`` allows."""
    world, enc = small_log
    config = RewardModelConfig(**{"epochs": 6, "batch_size": 2048, "residual": False, **kw})
    _, report = reward_fit.train_reward_model(world.catalog, enc, config)
    assert "l2_id_final_epochs" not in report.tuning
    assert report.epochs == report.tuning["l2_id_epochs"][str(report.tuning["l2_id"])]
    assert report.epochs <= config.epochs


def test_a_small_log_runs_the_path_on_every_row(small_log, monkeypatch):
    """At or below L2_SAMPLE_MIN_ROWS merged training rows nothing is sampled."""
    world, enc = small_log
    calls = _record_fits(monkeypatch)
    _, report = _fit(world, enc, patience=3, epochs=8)
    n_train = report.train_rows
    assert "l2_id_sample_rows" not in report.tuning
    assert calls and all(n == n_train for n, _ in calls)


def _record_fits(monkeypatch) -> list[tuple[int, float]]:
    """(training impressions, L2) of every ``_fit_structure`` call: the real fit, recorded."""
    calls: list[tuple[int, float]] = []
    real = reward_fit._fit_structure

    def recorded(model, train, val, n_train, config, *args, **kw):
        calls.append((n_train, config.l2_id))
        return real(model, train, val, n_train, config, *args, **kw)

    monkeypatch.setattr(reward_fit, "_fit_structure", recorded)
    return calls


def test_a_large_log_chooses_the_l2_on_a_sample_and_fits_it_once_on_every_row(
    small_log, monkeypatch
):
    """Above the threshold (lowered here) the path's fits see a sample of the training
    impressions, each L2 scaled by the sample's share; then one fit on every training row at
    the chosen L2, from the path's best weights, whose held-out loss never ends worse."""
    world, enc = small_log
    monkeypatch.setattr(reward_fit, "L2_SAMPLE_ROWS", 6_000)
    monkeypatch.setattr(reward_fit, "L2_SAMPLE_MIN_ROWS", 0)
    calls = _record_fits(monkeypatch)
    _, report = _fit(world, enc, patience=3, epochs=8)
    t, n_train = report.tuning, report.train_rows
    scale = n_train / 6_000
    tried = [float(k) for k in t["l2_id_val_loss"]]
    assert t["l2_id_sample_rows"] == 6_000
    # The first L2 twice: the three-way term's choice (on by default) fits it without and with.
    assert "three_way_gain" in t
    path = [(6_000, pytest.approx(c * scale)) for c in tried]
    assert calls[:-1] == path[:1] + path
    assert calls[-1] == (n_train, t["l2_id"])
    assert t["l2_id"] == _by_the_rule(t)
    # The report's epochs are the passes over every row: the final fit's alone.
    assert report.epochs == t["l2_id_final_epochs"] == len(report.history) <= 8
    assert t["val_loss"] <= t["l2_id_val_loss"][str(t["l2_id"])]


def test_the_sampled_path_still_stops_where_the_held_out_loss_rises(small_log, monkeypatch):
    world, enc = small_log
    monkeypatch.setattr(reward_fit, "L2_ID_GRID", (1e-2, 10.0, 1e-4))
    monkeypatch.setattr(reward_fit, "L2_SAMPLE_ROWS", 6_000)
    monkeypatch.setattr(reward_fit, "L2_SAMPLE_MIN_ROWS", 0)
    _, report = _fit(world, enc)
    assert list(report.tuning["l2_id_val_loss"]) == ["0.01", "10.0"]
    assert report.tuning["l2_id"] == 1e-2


def test_path_sample_is_a_seeded_uniform_subset_of_the_training_rows(monkeypatch):
    monkeypatch.setattr(reward_fit, "L2_SAMPLE_ROWS", 1_000)
    monkeypatch.setattr(reward_fit, "L2_SAMPLE_MIN_ROWS", 2_000)
    tr = np.random.default_rng(0).permutation(10_000)[:9_000]  # a time split's order
    assert reward_fit._path_sample(tr, 2_000, seed=0) is None  # merged rows at the threshold
    a = reward_fit._path_sample(tr, 9_000, seed=0)
    assert len(a) == len(np.unique(a)) == 1_000 and np.all(np.diff(a) > 0)
    assert np.isin(a, tr).all()
    assert np.array_equal(a, reward_fit._path_sample(tr, 9_000, seed=0))
    assert not np.array_equal(a, reward_fit._path_sample(tr, 9_000, seed=1))
    # Uniform over the training rows: the sample's mean row is near theirs.
    assert abs(a.mean() - tr.mean()) < 4 * tr.std() / np.sqrt(1_000)


@pytest.mark.parametrize("true_sd", [0.0, 0.05, 0.2])
def test_evidence_scan_stops_past_its_peak_with_the_full_grids_choice(true_sd):
    """Groups of 200-2,000 impressions whose true residuals have SD true_sd: the scan
    chooses what the whole grid would, and stops EVIDENCE_FALLS falls after its peak."""
    rng = np.random.default_rng(7)
    n_groups = 3_000
    group = np.arange(n_groups)
    s = rng.normal(-3.0, 0.3, n_groups)
    w = rng.integers(200, 2_000, n_groups).astype(float)
    r = rng.standard_t(4, n_groups) * true_sd
    y = rng.binomial(w.astype(int), 1 / (1 + np.exp(-(s + r)))) / w
    sd, evidence = choose_sd(group, n_groups, s, y, w)
    full = {c: _log_evidence(group, n_groups, s, y, w, c) for c in RESIDUAL_SD_GRID}
    assert sd == max(RESIDUAL_SD_GRID, key=lambda c: (full[c], -c))
    tried = [float(k) for k in evidence]
    assert tried == list(RESIDUAL_SD_GRID[: len(tried)])
    assert len(tried) < len(RESIDUAL_SD_GRID)  # the point: SDs far past the peak are skipped
    tail = [evidence[str(c)] for c in tried[-EVIDENCE_FALLS - 1 :]]
    assert all(a > b for a, b in pairwise(tail))
    assert all(evidence[str(c)] == pytest.approx(full[c]) for c in tried)


def test_groups_of_one_row_take_the_shortcut_to_the_same_evidence():
    """Every row its own group, in order (a large space's log): sums and gathers are the
    rows themselves; the evidence and the modes equal those of the same rows shuffled."""
    from genco.training.residuals import _Groups, _residual_newton

    rng = np.random.default_rng(3)
    n = 2_000
    s = rng.normal(-3.0, 0.3, n)
    w = rng.integers(1, 50, n).astype(float)
    y = rng.binomial(w.astype(int), 0.05) / w
    own = np.arange(n)
    assert _Groups(own, n).own and not _Groups(rng.permutation(n), n).own
    assert not _Groups(np.repeat(np.arange(n // 2), 2), n // 2).own
    perm = rng.permutation(n)  # the same rows shuffled: row j is row perm[j], of group perm[j]
    for sd in (0.03, 0.3):
        shuffled = _log_evidence(perm, n, s[perm], y[perm], w[perm], sd)
        assert _log_evidence(own, n, s, y, w, sd) == pytest.approx(shuffled, rel=1e-12)
        r = _residual_newton(own, n, s, y, w, sd)
        assert np.allclose(r, _residual_newton(perm, n, s[perm], y[perm], w[perm], sd))


def test_three_way_gain_is_the_paired_mean_and_its_standard_error_over_impressions():
    """Merged rows (impressions, click rate) give the mean and standard error of the
    per-impression log-loss differences of the rows written out one impression each."""
    import torch

    rng = np.random.default_rng(5)
    n_rows = 300
    count = rng.integers(1, 40, n_rows)
    clicks = rng.binomial(count, 0.1)
    z_off = rng.normal(-2.0, 0.5, n_rows)
    z_on = z_off + rng.normal(0.0, 0.2, n_rows)
    gain, se = term_choice.paired_gain(
        *(torch.as_tensor(a, dtype=torch.float32) for a in (z_off, z_on, clicks / count, count))
    )
    # One impression per line: clicks then non-clicks of every row.
    zo, zn = np.repeat(z_off, count), np.repeat(z_on, count)
    y = np.concatenate([np.r_[np.ones(c), np.zeros(n - c)] for c, n in zip(clicks, count)])
    loss = lambda z: np.logaddexp(0.0, -z) * y + np.logaddexp(0.0, z) * (1 - y)  # noqa: E731
    d = loss(zo) - loss(zn)
    assert gain == pytest.approx(d.mean(), rel=1e-5)
    assert se == pytest.approx(d.std(ddof=1) / np.sqrt(len(d)), rel=1e-5)
    # The same fit twice gains nothing, with no noise: 0 is not > z x 0, so not kept.
    same = torch.as_tensor(z_off, dtype=torch.float32)
    ones = torch.ones(n_rows)
    assert term_choice.paired_gain(same, same, ones * 0.1, ones) == (0.0, 0.0)


SMALL3 = replace(WORLDS["per_product_3way"], n_ads=8, n_candidates=4)


@pytest.fixture(scope="module")
def small3_log():
    world = make_world(SMALL3, seed=2)
    return world, encode(log_impressions(world, 40_000, seed=2), world.catalog)


@pytest.mark.parametrize("z", [-np.inf, None, np.inf])
def test_the_three_way_term_is_kept_only_beyond_z_standard_errors(small3_log, monkeypatch, z):
    """The fit with the term is kept exactly when its held-out gain over the fit without it
    exceeds THREE_WAY_Z standard errors (z = -inf: always; inf: never; None: the default);
    the gain reported is the two held-out losses' difference, and a rejected term is exactly
    zero in the model returned."""
    world, enc = small3_log
    if z is not None:
        monkeypatch.setattr(term_choice, "THREE_WAY_Z", z)
    model, report = _fit(world, enc, dim3=3, epochs=4)
    t = report.tuning
    gain, se, loss = t["three_way_gain"], t["three_way_gain_se"], t["three_way_val_loss"]
    assert gain == pytest.approx(loss["off"] - loss["on"], abs=1e-6)
    assert se > 0
    assert t["three_way_z"] == term_choice.THREE_WAY_Z
    assert t["three_way"] == (gain > term_choice.THREE_WAY_Z * se)
    if z is not None:
        assert t["three_way"] == (z < 0)
    assert t["l2_id_val_loss"]["0.1"] == loss["on" if t["three_way"] else "off"]
    has_term = bool(model.w3.any() or model.id3.weight.any())
    assert has_term == t["three_way"]
    assert model.d3 == (3 if t["three_way"] else 0)  # a rejected term is not even computed


def test_the_three_way_choice_runs_on_the_path_sample(small3_log, monkeypatch):
    """Above the sample threshold both fits of the choice (without, then with the term) see
    the path's sample, at the first L2 scaled to it; only the chosen L2's last fit sees
    every row."""
    world, enc = small3_log
    monkeypatch.setattr(reward_fit, "L2_SAMPLE_ROWS", 8_000)
    monkeypatch.setattr(reward_fit, "L2_SAMPLE_MIN_ROWS", 0)
    calls = _record_fits(monkeypatch)
    _, report = _fit(world, enc, dim3=3, epochs=4)
    scale = report.train_rows / 8_000
    first = (8_000, pytest.approx(reward_fit.L2_ID_GRID[0] * scale))
    assert calls[:2] == [first, first]
    assert all(n == 8_000 for n, _ in calls[:-1]) and calls[-1][0] == report.train_rows
    assert "three_way_gain" in report.tuning


def test_a_rejected_term_saves_and_loads_to_the_same_scores(small3_log, monkeypatch, tmp_path):
    """Rejected, the fitted model skips the term (d3 = 0); its bundle loads with zero
    vectors, skipped too: the same logits. Warm started from it, a fit can still take the
    term up (the zeros, a saddle, are not loaded)."""
    import torch

    from genco.models.checkpoint import load_reward_model, save_reward_model
    from genco.models.reward import BoundModel

    world, enc = small3_log
    monkeypatch.setattr(term_choice, "THREE_WAY_Z", np.inf)
    model, _ = _fit(world, enc, dim3=3, epochs=2)
    assert model.d3 == 0
    save_reward_model(model, str(tmp_path))
    again, _ = load_reward_model(str(tmp_path))
    assert not again.id3.weight.any() and again.d3 == 0  # zero vectors: skipped
    rows = slice(0, 2_000)
    scores = []
    for m in (model, again):
        b = BoundModel(m, world.catalog)
        with torch.no_grad():
            scores.append(m(*b._inputs(enc.ads[rows], enc.combos[rows], enc.ctx[rows])))
    assert torch.equal(scores[0], scores[1])
    monkeypatch.setattr(term_choice, "THREE_WAY_Z", -np.inf)
    warm, report = reward_fit.train_reward_model(
        world.catalog, enc, replace(again.config, epochs=2), init=again
    )
    assert report.tuning["three_way"] and warm.d3 == 3 and warm.id3.weight.any()
