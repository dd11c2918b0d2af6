"""Item Response Theory (mergelab.analysis.irt): recovery of known parameters, the estimators'
boundary cases and the errors a user gets for bad input."""

from __future__ import annotations

import numpy as np
import pytest

from mergelab.analysis.irt import (IRTModel, estimate_accuracy, fit_ability, fit_irt, fit_merge_weights,
                                   log_likelihood, p_irt, select_anchors, subset_mean)


def synthetic(M: int = 200, N: int = 200, D: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    a = rng.normal(0, 1.0, (N, D)) + 0.5
    b = rng.normal(0, 1.0, N)
    theta = rng.normal(0, 1.0, (M, D))
    truth = IRTModel(a, b)
    return truth, theta, (rng.random((M, N)) < truth.prob(theta)).astype(float)


def r2_up_to_linear_map(fitted: np.ndarray, true: np.ndarray) -> float:
    """Share of the variance of ``true`` explained by a linear map of ``fitted`` (the model's
    rotation/sign/scale freedom)."""
    X = np.column_stack([fitted, np.ones(len(fitted))])
    coef, *_ = np.linalg.lstsq(X, true, rcond=None)
    resid = true - X @ coef
    return 1 - float((resid ** 2).sum() / ((true - true.mean(0)) ** 2).sum())


@pytest.fixture(scope="module")
def fitted():
    truth, theta, responses = synthetic()
    model, theta_hat = fit_irt(responses, dim=2, seed=0)
    return truth, theta, responses, model, theta_hat


def test_recovers_known_items_and_abilities(fitted):
    truth, theta, _, model, theta_hat = fitted
    # difficulty is identified only up to the shift a . mean(theta); abilities are N(0, I) in both
    assert np.corrcoef(model.difficulty, truth.difficulty)[0, 1] > 0.9
    assert r2_up_to_linear_map(model.discrimination, truth.discrimination) > 0.7
    assert r2_up_to_linear_map(theta_hat, theta) > 0.8


def test_fit_beats_a_one_dimensional_fit_on_held_out_models():
    truth, theta, responses = synthetic(M=260, seed=1)
    train, held = responses[:200], responses[200:]
    scores = {}
    for D in (1, 2):
        model, _ = fit_irt(train, dim=D)
        th = np.stack([fit_ability(model, np.arange(model.num_items), r) for r in held])
        scores[D] = log_likelihood(model, th, held)
    assert scores[2] > scores[1]


def test_estimators_equal_the_subset_mean_on_all_items(fitted):
    _, _, responses, model, theta_hat = fitted
    y, everything = responses[5], np.arange(model.num_items)
    est = estimate_accuracy(model, everything, y, theta_hat[:3])
    for value in est.as_dict().values():
        assert value == pytest.approx(y.mean(), abs=1e-12)


def test_all_right_or_all_wrong_subsets_give_finite_estimates(fitted):
    _, _, _, model, theta_hat = fitted
    items = np.arange(10)
    for y in (np.ones(10), np.zeros(10)):
        theta = fit_ability(model, items, y)
        lam = fit_merge_weights(model, theta_hat[:4], items, y)
        assert np.isfinite(theta).all() and np.isfinite(lam).all()
        est = estimate_accuracy(model, items, y, theta_hat[:4])
        assert all(np.isfinite(v) and 0 <= v <= 1 for v in est.as_dict().values())
    high = estimate_accuracy(model, items, np.ones(10), theta_hat[:4]).p_irt
    low = estimate_accuracy(model, items, np.zeros(10), theta_hat[:4]).p_irt
    assert high > low


def test_irt_estimates_beat_the_subset_mean_on_small_subsets(fitted):
    """On data the model generated, p-IRT from 25 items is closer to the full mean than the
    25-item mean, on average over models."""
    truth, theta, responses, model, _ = fitted
    rng = np.random.default_rng(3)
    err_mean, err_pirt = [], []
    for m in range(40):
        items = np.sort(rng.choice(model.num_items, 25, replace=False))
        y = responses[m, items]
        full = responses[m].mean()
        err_mean.append(abs(subset_mean(y) - full))
        err_pirt.append(abs(p_irt(model, items, y, fit_ability(model, items, y)) - full))
    assert np.mean(err_pirt) < np.mean(err_mean)


def test_anchors_random_and_clustered(fitted):
    model = fitted[3]
    for scheme in ("random", "clustered"):
        items, weights = select_anchors(model, 20, scheme, seed=0)
        assert len(np.unique(items)) == 20 and items.min() >= 0 and items.max() < model.num_items
        assert weights.sum() == pytest.approx(1.0)
        again, _ = select_anchors(model, 20, scheme, seed=0)
        assert (again == items).all()
    _, w = select_anchors(model, 20, "clustered")
    assert w.std() > 0  # clusters of different sizes weigh differently


@pytest.mark.parametrize("call, match", [
    (lambda m, t: estimate_accuracy(m, [], [], t), "empty"),
    (lambda m, t: select_anchors(m, m.num_items + 1), "1..200"),
    (lambda m, t: fit_ability(m, np.arange(m.num_items + 1), np.ones(m.num_items + 1)), "n <= N"),
    (lambda m, t: fit_ability(m, [0, 1, 2], [0, 2, 1]), "only 0"),
    (lambda m, t: fit_ability(m, [0, 1, 2], [0, 1]), "one answer per item"),
    (lambda m, t: fit_ability(m, [0, 1, 1], [0, 1, 1]), "repeats"),
    (lambda m, t: fit_merge_weights(m, t[:, :1], [0, 1], [1, 0]), "endpoint_theta"),
    (lambda m, t: fit_irt(np.array([[0, 0.5]]), 1), "only 0"),
    (lambda m, t: fit_irt(np.ones((3, 4)), 0), "dim=0"),
    (lambda m, t: select_anchors(m, 5, "kmeans"), "scheme='kmeans'"),
    (lambda m, t: select_anchors(m, 2.7), r"n=2.7 is not valid"),
    (lambda m, t: fit_irt(np.ones((3, 4)), 1.5), r"dim=1.5 is not valid"),
    (lambda m, t: fit_irt(np.ones((3, 4)), 1, max_iter=0), r"max_iter=0 is not valid"),
    (lambda m, t: fit_irt(np.ones((3, 4)), 1, prior_sd=0), r"prior_sd=0 is not valid; use a positive number"),
    (lambda m, t: fit_ability(m, [0, 1], [1, 0], prior_sd=-1), r"prior_sd=-1 is not valid"),
    (lambda m, t: fit_merge_weights(m, t[:2], [0, 1], [1, 0], prior_sd=0), r"prior_sd=0 is not valid"),
    (lambda m, t: fit_ability(m, [0.5, 1.5], [1, 0]), r"items must be item indices \(integers\); got dtype float64"),
    (lambda m, t: fit_ability(m, np.arange(m.num_items) < 2, np.ones(2)), r"a boolean mask: pass np.flatnonzero"),
    (lambda m, t: p_irt(m, [0, 1], [1, 0], t[:2]), r"theta must be one finite ability vector of shape \(D=2,\)"),
    (lambda m, t: log_likelihood(m, t[:, :1], np.ones((t.shape[0], m.num_items))), r"theta must be \(M, D=2\)"),
])
def test_bad_inputs_get_clear_errors(fitted, call, match):
    with pytest.raises(ValueError, match=match):
        call(fitted[3], fitted[4])


def test_mp_and_gmp_irt_are_the_merged_ability_estimate_and_its_average_with_the_subset_mean(fitted):
    """mp-IRT reads p-IRT at the merged ability lambda @ theta_endpoints fitted on the answers, gmp-IRT averages it
    with the subset mean (MERGE3's weight 1/2); on a model whose ability is a combination of the endpoints',
    mp-IRT from a tenth of the items is closer to its full accuracy than the subset mean, over many subsets."""
    _, theta, responses, model, theta_hat = fitted
    endpoints = theta_hat[:3]  # three "experts"
    rng = np.random.default_rng(5)
    items = np.sort(rng.choice(model.num_items, 20, replace=False))
    y = responses[10, items]
    est = estimate_accuracy(model, items, y, endpoints)
    lam = fit_merge_weights(model, endpoints, items, y, 1.0)
    assert est.mp_irt == pytest.approx(p_irt(model, items, y, lam @ endpoints))
    assert est.gmp_irt == pytest.approx(0.5 * est.subset_mean + 0.5 * est.mp_irt)
    assert estimate_accuracy(model, items, y, endpoints, gmp_weight=0.25).gmp_irt == pytest.approx(
        0.25 * est.subset_mean + 0.75 * est.mp_irt)
    # a merged model: its ability is a combination of the endpoints' (answers drawn from the fitted model)
    merged_theta = np.array([0.5, 0.3, 0.2]) @ endpoints
    p = model.prob(merged_theta)
    errors = {"subset_mean": [], "mp_irt": []}
    for draw in range(30):
        answers = (rng.random(model.num_items) < p).astype(float)
        sub = np.sort(rng.choice(model.num_items, 20, replace=False))
        e = estimate_accuracy(model, sub, answers[sub], endpoints)
        errors["subset_mean"].append(abs(e.subset_mean - answers.mean()))
        errors["mp_irt"].append(abs(e.mp_irt - answers.mean()))
    assert np.mean(errors["mp_irt"]) < 0.8 * np.mean(errors["subset_mean"])


def test_clustered_anchors_are_each_clusters_nearest_item_weighted_by_its_share(fitted):
    from sklearn.cluster import KMeans

    model = fitted[3]
    items, weights = select_anchors(model, 12, "clustered", seed=4)
    features = np.column_stack([model.discrimination, model.difficulty])
    km = KMeans(n_clusters=12, n_init=1, random_state=4).fit(features)
    for c in range(12):
        members = np.flatnonzero(km.labels_ == c)
        nearest = members[np.argmin(np.linalg.norm(features[members] - km.cluster_centers_[c], axis=1))]
        j = int(np.flatnonzero(items == nearest)[0])
        assert weights[j] == pytest.approx(members.size / model.num_items)
    assert subset_mean(np.array([1.0, 0.0]), np.array([0.75, 0.25])) == pytest.approx(0.75)  # the weights count


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + np.exp(-z))


HAND = IRTModel(np.array([[1.0], [2.0], [0.5], [-1.0]]), np.array([0.0, 1.0, -1.0, 0.5]))
"""Four items in one dimension, for estimates computed by hand."""


def test_p_irt_counts_the_answered_items_as_given_and_the_rest_by_their_probability():
    theta = np.array([0.7])
    # items 0 and 2 answered (1, 0); items 1 and 3 by P = sigmoid(a . theta - b)
    expected = 2 / 4 * 0.5 + 2 / 4 * (_sigmoid(2 * 0.7 - 1.0) + _sigmoid(-0.7 - 0.5)) / 2
    assert p_irt(HAND, np.array([0, 2]), np.array([1.0, 0.0]), theta) == pytest.approx(expected, abs=1e-12)
    other = p_irt(HAND, np.array([0, 2]), np.array([1.0, 1.0]), theta)  # the answers count, not only theta
    assert other - expected == pytest.approx(2 / 4 * 0.5, abs=1e-12)


def test_log_likelihood_is_the_mean_bernoulli_log_likelihood():
    theta = np.array([[0.7], [-0.2]])
    r = np.array([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0]])
    p = np.array([[_sigmoid(a * t - b) for a, b in zip([1.0, 2.0, 0.5, -1.0], [0.0, 1.0, -1.0, 0.5])]
                  for t in (0.7, -0.2)])
    expected = np.mean(r * np.log(p) + (1 - r) * np.log(1 - p))
    assert log_likelihood(HAND, theta, r) == pytest.approx(expected, abs=1e-12)


def test_with_uninformative_items_the_fits_return_their_priors_centre():
    flat = IRTModel(np.zeros((4, 2)), np.zeros(4))  # no item says anything about ability
    endpoints = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # mp-IRT's weights start at MERGE3's 1/K, and the prior keeps them there; the ability at 0
    np.testing.assert_allclose(fit_merge_weights(flat, endpoints, [0, 1], [1.0, 0.0]), np.full(3, 1 / 3), atol=1e-9)
    np.testing.assert_allclose(fit_ability(flat, [0, 1, 2], [1.0, 1.0, 0.0]), np.zeros(2), atol=1e-9)
