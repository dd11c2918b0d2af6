"""Tests of mergelab.diagnostics on tiny synthetic inputs (each can fail)."""

import math

import pytest
import torch

from mergelab.analysis import diagnostics as D
from mergelab.task_vectors import TaskVector


def test_linear_probe_accuracy_separable_and_random():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 2
    X = torch.randn(200, 5, generator=g)
    X[:, 0] += 4 * (2 * y - 1)  # class carried by feature 0
    assert D.linear_probe_accuracy(X[:100], y[:100], X[100:], y[100:]) > 0.95
    noise = torch.randn(200, 5, generator=g)  # no information: near chance
    assert D.linear_probe_accuracy(noise[:100], y[:100], noise[100:], y[100:]) < 0.75
    with pytest.raises(ValueError, match="features must be"):
        D.linear_probe_accuracy(X[:, :3], y, X, y)


def _blobs(n: int, d: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    X = noise * torch.randn(n, d, generator=g)
    X[:, :3] += torch.nn.functional.one_hot(y, 3).float()
    return X, y


def test_validated_probe_chooses_c_on_validation_and_scores_test_once():
    train, val, test = _blobs(60, 40, 1.0, 0), _blobs(300, 40, 1.0, 1), _blobs(300, 40, 1.0, 2)
    grid = (0.01, 1.0, 100.0)
    out = D.validated_probe(train, val, test, grid=grid)
    by_c = {c: D.linear_probe_accuracy(*train, *val, C=c) for c in grid}
    assert out["val_accuracy"] == pytest.approx(max(by_c.values()))
    assert out["C"] == min(c for c in grid if by_c[c] == max(by_c.values()))  # ties: the stronger penalty
    assert out["accuracy"] == pytest.approx(D.linear_probe_accuracy(*train, *test, C=out["C"]))
    assert out["at_grid_edge"] == (out["C"] in (grid[0], grid[-1]))
    assert len(set(by_c.values())) > 1  # the grid matters on these data, so the choice is tested


def test_a_probe_started_from_another_c_reaches_the_same_optimum_in_fewer_iterations():
    X, y = (a.double().numpy() if a.is_floating_point() else a.numpy() for a in _blobs(300, 40, 1.0, 3))
    warm, cold_its, warm_its = None, 0, 0
    for C in (0.1, 10.0, 1e3, 1e5):
        cold = D._fit_probe(X, y, C)
        warm = D._fit_probe(X, y, C, start=warm)
        assert warm.coef_ == pytest.approx(cold.coef_, rel=1e-3, abs=1e-3 * abs(cold.coef_).max())
        assert (warm.predict(X) == cold.predict(X)).all()
        cold_its, warm_its = cold_its + int(cold.n_iter_[0]), warm_its + int(warm.n_iter_[0])
    assert warm_its < cold_its  # what validated_probe's path along its grid saves


def test_validated_probe_flags_an_edge_and_refuses_bad_grids():
    train, val, test = _blobs(90, 4, 0.05, 0), _blobs(90, 4, 0.05, 1), _blobs(90, 4, 0.05, 2)  # separable
    out = D.validated_probe(train, val, test, grid=(10.0, 100.0))
    assert out == {"accuracy": 1.0, "C": 10.0, "val_accuracy": 1.0, "at_grid_edge": True}
    for bad in ((), (1.0, 0.1), (0.0, 1.0), (1.0, math.inf)):
        with pytest.raises(ValueError, match="grid=.* is not valid|C=inf is not valid"):
            D.validated_probe(train, val, test, grid=bad)
    with pytest.raises(ValueError, match="C=0 is not valid"):
        D.linear_probe_accuracy(*train, *test, C=0)
    assert D.PROBE_C_GRID[0] < 1 < 1e5 < D.PROBE_C_GRID[-1] and list(D.PROBE_C_GRID) == sorted(D.PROBE_C_GRID)


def test_calibration_from_logits_values():
    labels = torch.tensor([0, 1, 1, 1])
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [2.0, 0.0]])
    c = D.calibration_from_logits(logits, labels)
    p = 1 / (1 + math.exp(-2))
    assert c["accuracy"] == pytest.approx(0.5)
    assert c["confidence"] == pytest.approx(p)
    assert c["top_class_share"] == pytest.approx(0.75)
    assert c["cross_entropy"] == pytest.approx((2 * -math.log(p) + 2 * -math.log(1 - p)) / 4)
    with pytest.raises(ValueError):
        D.calibration_from_logits(logits, labels[:3])


def test_relative_norms_total_and_kinds():
    pre = {"conv1.weight": torch.ones(2, 3, 1, 1), "proj": torch.full((2, 2), 2.0), "count": torch.tensor(3)}
    tau = TaskVector({"conv1.weight": torch.full((2, 3, 1, 1), 0.1), "proj": torch.zeros(2, 2)})
    r = D.relative_norms(pre, tau)
    assert r["conv1"] == pytest.approx(0.1)
    assert r["proj"] == 0.0
    assert r["total"] == pytest.approx(math.sqrt(6 * 0.01) / math.sqrt(6 + 16))


class _ToyBench:
    """Accuracy of task t is the clamp of weight t: an exactly known benchmark."""

    tasks: tuple[str, ...] = ("a", "b")
    heads: dict = {}

    def evaluate(self, state, split="test", tasks=None):
        return {t: float(state[t].clamp(0, 1)) for t in (tasks or self.tasks)}


def test_own_task_curve_and_cross_matrix_on_a_known_benchmark():
    bench = _ToyBench()
    pre = {"a": torch.tensor(0.2), "b": torch.tensor(0.5)}
    tvs = {"a": TaskVector({"a": torch.tensor(0.6), "b": torch.tensor(-0.5)}),
           "b": TaskVector({"a": torch.tensor(0.0), "b": torch.tensor(0.4)})}
    curve = D.own_task_curve(bench, pre, tvs, alphas=(0.0, 0.5, 1.0))
    assert curve["a"] == pytest.approx({0.0: 0.2, 0.5: 0.5, 1.0: 0.8})
    assert D.gain_fraction(curve["a"], 0.5) == pytest.approx(0.5)
    sources, targets, M = D.cross_task_matrix(bench, pre, tvs, coefficient=0.5)
    assert sources == ["a", "b"] and targets == ["a", "b"]
    assert M[0, 1] == pytest.approx(-0.25)  # tau_a hurts task b
    assert M[1, 0] == pytest.approx(0.0)
    assert D.off_diagonal(sources, targets, M).tolist() == pytest.approx([-0.25, 0.0])
    assert D.off_diagonal_summary(sources, targets, M) == pytest.approx({"mean": -0.125, "min": -0.25})
    lone = D.off_diagonal_summary(["a"], ["a"], M[:1, :1])  # one task: no pair, nothing to average
    assert set(lone) == {"mean", "min"} and all(v != v for v in lone.values())


def test_alone_and_merged_shows_a_collective_loss_the_pairwise_matrix_splits():
    """Task c is hurt by 0.1 by each of the two other vectors at lambda .5 (the pairwise matrix) and by
    0.2 by both together: ``others`` is the sum, ``alone`` the own vector's share at lambda."""
    bench = _ToyBench()
    bench.tasks = ("a", "b", "c")
    pre = {"a": torch.tensor(0.2), "b": torch.tensor(0.5), "c": torch.tensor(0.3)}
    tvs = {"a": TaskVector({"a": torch.tensor(0.6), "b": torch.tensor(0.0), "c": torch.tensor(-0.2)}),
           "b": TaskVector({"a": torch.tensor(-0.2), "b": torch.tensor(0.4), "c": torch.tensor(-0.2)}),
           "c": TaskVector({"a": torch.tensor(0.0), "b": torch.tensor(0.0), "c": torch.tensor(0.4)})}
    r = D.alone_and_merged(bench, pre, tvs, coefficient=0.5)
    assert r["c"] == pytest.approx({"zero_shot": 0.3, "alone": 0.5, "merged": 0.3, "others": -0.2})
    assert r["a"] == pytest.approx({"zero_shot": 0.2, "alone": 0.5, "merged": 0.4, "others": -0.1})
    assert r["b"]["others"] == pytest.approx(0.0)
    _, _, M = D.cross_task_matrix(bench, pre, tvs, coefficient=0.5)
    assert M[0, 2] == pytest.approx(-0.1) and M[1, 2] == pytest.approx(-0.1)  # each alone costs c 0.1
    with pytest.raises(ValueError, match="task_vectors is empty"):
        D.alone_and_merged(bench, pre, {}, coefficient=0.5)


def test_large_probes_use_lbfgs_so_no_hessian_is_formed():
    """CLIP's 512-d features on SUN397's 397 classes would give Newton-Cholesky a Hessian of 4e10 entries;
    past NEWTON_MAX_COEFFICIENTS the probe uses L-BFGS (no Hessian) and still fits."""
    assert D.probe_solver(64, 10) == "newton-cholesky"  # the tiny encoder: 650 coefficients
    assert D.probe_solver(512, 397) == D.probe_solver(512, 10) == "lbfgs"
    assert D.probe_solver(D.NEWTON_MAX_COEFFICIENTS - 1, 2) == "newton-cholesky"  # binary: one coefficient vector
    g = torch.Generator().manual_seed(0)
    classes, d = 60, 100  # 6060 coefficients: over the limit
    centres = 3 * torch.randn(classes, d, generator=g)
    y = torch.arange(1200) % classes
    X = centres[y] + torch.randn(1200, d, generator=g)
    assert D.probe_solver(d, classes) == "lbfgs"
    assert D.linear_probe_accuracy(X[:600], y[:600], X[600:], y[600:], C=1.0) > 0.9


def test_margins_from_logits_are_the_distance_to_the_decision_boundary():
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 3.0, 1.0], [1.0, 1.0, -5.0]])
    m = D.margins_from_logits(logits, torch.tensor([0, 0, 1]))
    assert m.dtype == torch.float64 and m.tolist() == pytest.approx([1.0, -3.0, 0.0])  # a tie is on the boundary
    assert ((m > 0) == (logits.argmax(-1) == torch.tensor([0, 0, 1]))).all()
    for logits_, labels in ((logits, torch.tensor([0, 1])), (logits[:, :1], torch.tensor([0, 0, 0]))):
        with pytest.raises(ValueError, match="logits must be"):
            D.margins_from_logits(logits_, labels)


class _BiasBench:
    """One two-class task whose encoder adds a bias (or, ``power=2``, the bias squared) to 2-d inputs and
    whose head reads the features as logits: the margin of an example along theta_0 + alpha tau is known."""

    tasks = ("a",)
    device = torch.device("cpu")

    def __init__(self, X: torch.Tensor, power: int = 1) -> None:
        self.X, self.power = X, power
        self.heads = {"a": torch.nn.Identity()}

    def split(self, task, split="val"):
        return self.X, torch.zeros(len(self.X), dtype=torch.long)

    def evaluate(self, state, split="val", tasks=None):  # argmax accuracy, apart from the margins
        return {"a": float((self.new_encoder(state)(self.X).argmax(-1) == 0).double().mean())}

    def new_encoder(self, state=None):
        bias, power = state["bias"], self.power

        class Encoder(torch.nn.Module):
            def forward(self, x):
                return x + bias ** power
        return Encoder()


def test_margin_linearity_is_exact_on_a_linear_network_and_places_each_crossing():
    # label 0 everywhere; margin(alpha) = (x0 - x1) + alpha * 1 for the bias vector tau = (1, 0)
    start = torch.tensor([-0.2, -0.5, -0.9, 0.5, -2.0])  # three gained (crossing at .2, .5, .9), one right, one wrong at both ends
    X = torch.stack([start, torch.zeros(5)], 1)
    pre, tau = {"bias": torch.zeros(2)}, {"a": TaskVector({"bias": torch.tensor([1.0, 0.0])})}
    alphas = (0.0, 0.3, 0.6, 1.0)
    r = D.margin_linearity(_BiasBench(X), pre, tau, alphas)["a"]
    assert r["accuracy"] == pytest.approx([0.2, 0.4, 0.6, 0.8]) and r["linearized_accuracy"] == r["accuracy"]
    assert r["max_gap"] == 0.0 == r["largest_gap"] and r["gained"] == pytest.approx(0.6)
    assert r["crossing_median"] == pytest.approx(0.5) and r["crossing_quartiles"] == pytest.approx([0.35, 0.7])
    assert r["mean_margin"] == pytest.approx([float(start.mean()), float(start.mean()) + 1], abs=1e-6)
    given = {"a": dict(zip(alphas, [0.0, 1.0, 1.0, 0.0]))}  # a measured curve passed in is the one compared
    assert D.margin_linearity(_BiasBench(X), pre, tau, alphas, curve=given)["a"]["accuracy"] == [0.0, 1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="curve lacks the points"):
        D.margin_linearity(_BiasBench(X), pre, tau, alphas, curve={"a": {0.0: 0.2, 1.0: 0.8}})
    # a network that is not linear along tau (the margin grows with alpha squared) departs from its linearization
    bent = D.margin_linearity(_BiasBench(X, power=2), pre, tau, alphas)["a"]
    assert bent["accuracy"] == pytest.approx([0.2, 0.2, 0.4, 0.8]) and bent["max_gap"] == pytest.approx(0.2)
    assert bent["largest_gap"] == pytest.approx(-0.2)  # the bent curve lies below its linearization
    for bad in ((0.0, 0.5), (0.5, 1.0), (0.0, 1.0, 1.0)):
        with pytest.raises(ValueError, match="alphas=.* is not valid"):
            D.margin_linearity(_BiasBench(X), pre, tau, bad)
    with pytest.raises(ValueError, match="task_vectors is empty"):
        D.margin_linearity(_BiasBench(X), pre, {}, alphas)


class _ProbeBench:
    """Two tasks of blobs whose encoder is a linear map of the weights ``state["w"]``, with a cache folder and an
    evaluation key per task and split (what :func:`linear_probe_fits` keys its cache on)."""

    device = torch.device("cpu")

    def __init__(self, cache_dir, data: str = "v1") -> None:
        self.cache_dir, self.data, self.tasks, self.encoded = cache_dir, data, ("a", "b"), 0
        self.splits = {(t, s): _blobs(60, 6, 0.6 + i / 2, seed=10 * i + j)
                       for i, t in enumerate(self.tasks) for j, s in enumerate(("train", "val", "test"))}

    def split(self, task, split="train"):
        self.encoded += 1
        return self.splits[(task, split)]

    def evaluation_key(self, task, split):
        return f"{task}/{split}/{self.data}"

    def new_encoder(self, state=None):
        w = state["w"]

        class Encoder(torch.nn.Module):
            def forward(self, x):
                return x @ w
        return Encoder()


def test_linear_probes_are_cached_by_weights_data_and_grid(tmp_path):
    """A re-run reads each task's probe back without encoding a split; other weights, data or grid fit again, as
    does a damaged file; ``cache=False`` fits and writes nothing."""
    state, grid = {"w": torch.eye(6)}, (0.1, 1.0, 10.0)
    bench = _ProbeBench(tmp_path)
    fresh = D.linear_probe_fits(bench, state, grid=grid, cache=False)
    assert not (tmp_path / "probe").exists()
    first = D.linear_probe_fits(bench, state, grid=grid)
    assert first == fresh and set(first) == {"a", "b"} and bench.encoded == 12
    assert len(list((tmp_path / "probe").glob("*.json"))) == 2
    again = D.linear_probe_fits(bench, state, grid=grid)
    assert again == first and bench.encoded == 12  # read back: no split encoded, no fit
    D.linear_probe_fits(bench, {"w": 2 * torch.eye(6)}, grid=grid)
    D.linear_probe_fits(bench, state, grid=(1.0, 10.0))
    D.linear_probe_fits(_ProbeBench(tmp_path, data="v2"), state, grid=grid)
    assert bench.encoded == 24 and len(list((tmp_path / "probe").glob("*.json"))) == 8
    path = D.probe_path(bench, state, "a", ("train", "val", "test"), grid)
    path.write_text('{"accuracy": 0.5')  # cut short
    assert D.linear_probe_fits(bench, state, ["a"], grid=grid)["a"] == first["a"] and bench.encoded == 27


def test_the_probes_digest_the_encoder_once_for_all_tasks(tmp_path, monkeypatch):
    """Each task's key names the weights' digest: it is computed once per call (at the clip size a ViT-B-32 digest
    costs a tenth of a second), and the keys equal those of probe_path on its own."""
    state, grid = {"w": torch.eye(6)}, (0.1, 1.0)
    bench = _ProbeBench(tmp_path)
    calls = []
    real = D.state_digest
    monkeypatch.setattr(D, "state_digest", lambda s: calls.append(1) or real(s))
    D.linear_probe_fits(bench, state, grid=grid)
    assert len(calls) == 1
    names = {p.name for p in (tmp_path / "probe").glob("*.json")}
    assert names == {D.probe_path(bench, state, t, ("train", "val", "test"), grid).name for t in ("a", "b")}
