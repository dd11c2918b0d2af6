"""Per-image responses (mergelab.analysis.responses): subsets agree with the full vector, full vectors
are cached per weights, forward passes are counted."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mergelab.analysis.responses import ResponseEvaluator, state_digest


class FakeBench:
    """Two tasks of 5 and 7 'images' (vectors), a linear encoder and identity heads."""

    tasks = ("a", "b")
    device = torch.device("cpu")
    key = "fake"
    data_version = 0  # stands for what evaluation keys name beside the weights (a split's size, a data copy)

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.data = {t: (torch.randn(n, 3, generator=g), torch.randint(0, 3, (n,), generator=g))
                     for t, n in (("a", 5), ("b", 7))}
        self.heads = {t: torch.nn.Identity() for t in self.tasks}

    def split(self, task, split="val"):
        return self.data[task]

    def images(self, task, split, indices):
        return self.data[task][0][torch.as_tensor(indices, dtype=torch.long)]

    def new_encoder(self, state=None):
        enc = torch.nn.Linear(3, 3)
        if state is not None:
            enc.load_state_dict(state)
        return enc

    def head_digest(self, task):
        return task

    def evaluation_key(self, task, split):
        return f"{task}-{split}-{self.data_version}"

    def eval_features(self, encoder, images):
        return encoder(images).float()


def test_an_evaluation_code_bump_gives_responses_a_new_cache_key(data_dir, monkeypatch):
    """Cached responses are evaluations: a bump of the evaluation code's version must not read those that
    older code wrote."""
    from mergelab import codeversion

    state = {k: v.clone() for k, v in torch.nn.Linear(3, 3).state_dict().items()}
    before = ResponseEvaluator(FakeBench(), split="val")._cache_path(state)
    monkeypatch.setitem(codeversion.CODE_VERSIONS, "evaluation", codeversion.CODE_VERSIONS["evaluation"] + 1)
    assert ResponseEvaluator(FakeBench(), split="val")._cache_path(state) != before


def test_responses_are_keyed_by_each_tasks_evaluation_key(data_dir):
    """The benchmark's evaluation key names the data and arithmetic of a task's split (at the clip size its
    own key names the model alone): responses of other data are never read from an earlier file."""
    state = {k: v.clone() for k, v in torch.nn.Linear(3, 3).state_dict().items()}
    bench = FakeBench()
    before = ResponseEvaluator(bench, split="val")._cache_path(state)
    bench.data_version = 1
    assert ResponseEvaluator(bench, split="val")._cache_path(state) != before
    assert ResponseEvaluator(bench, ["a"], split="val")._cache_path(state) != before


def test_responses_use_the_benchmarks_evaluation_arithmetic(data_dir):
    """Responses run the encoder through the benchmark's eval_features (a size's autocast, say), as evaluate
    does, so per-example correctness and the cached accuracy come from one forward pass's arithmetic."""

    class Negated(FakeBench):
        def eval_features(self, encoder, images):
            return -encoder(images).float()

    state = {k: v.clone() for k, v in torch.nn.Linear(3, 3).state_dict().items()}
    bench = Negated()
    full = ResponseEvaluator(bench, split="val", cache=False).full(state)
    truth = np.concatenate([(-(bench.data[t][0] @ state["weight"].T + state["bias"])).argmax(-1).numpy()
                            == bench.data[t][1].numpy() for t in bench.tasks])
    assert (full == truth).all()


def test_subset_matches_full_and_full_is_cached(data_dir):
    bench = FakeBench()
    ev = ResponseEvaluator(bench, split="val")
    assert ev.num_items == 12 and list(ev.offsets) == [0, 5, 12]
    state = {k: v.clone() for k, v in torch.nn.Linear(3, 3).state_dict().items()}
    full = ev.full(state)
    truth = np.concatenate([(bench.data[t][0] @ state["weight"].T + state["bias"]).argmax(-1).numpy()
                            == bench.data[t][1].numpy() for t in bench.tasks])
    assert (full == truth).all() and ev.forward_passes == 12
    assert (ev.full(state) == full).all() and ev.forward_passes == 12  # read from the cache
    assert len(list((data_dir / "responses").glob("*.npz"))) == 1
    items = np.array([11, 0, 6])
    assert (ev.subset(state, items) == full[items]).all() and ev.forward_passes == 15
    acc = ev.per_task_accuracy(full)
    assert acc["a"] == pytest.approx(full[:5].mean()) and acc["b"] == pytest.approx(full[5:].mean())
    (cached,) = (data_dir / "responses").glob("*.npz")
    cached.write_bytes(b"not a zip")  # damaged (a crash, a full disk): computed again, not read, not fatal
    with pytest.warns(RuntimeWarning, match="is unreadable"):
        assert (ev.full(state) == full).all()
    assert ev.forward_passes == 15 + 12
    other = {k: v + 1 for k, v in state.items()}
    assert state_digest(other) != state_digest(state)
    with pytest.raises(ValueError, match="0..11"):
        ev.subset(state, [12])


def test_settings_rebuild_an_equal_evaluator(data_dir):
    """Workers rebuild the driver's evaluator from its settings: same items, same responses."""
    bench = FakeBench()
    ev = ResponseEvaluator(bench, ["b"], split="test", cache=False, batch_size=3)
    again = ResponseEvaluator(bench, **ev.settings())
    assert again.settings() == ev.settings() == {"tasks": ["b"], "split": "test", "cache": False, "batch_size": 3}
    state = {k: v.clone() for k, v in torch.nn.Linear(3, 3).state_dict().items()}
    assert again.num_items == ev.num_items == 7 and (again.full(state) == ev.full(state)).all()


def test_a_search_checkpoint_names_the_fitness_data_and_the_weights(data_dir, tmp_path):
    """Chapter 05 resumes a GA from its checkpoint: one written for other fitness data (at the clip size, a
    split of another size) or other experts (imported, say, with the same recipe) must not be resumed."""
    from mergelab.experiments.ch05_merge3 import search_checkpoint, search_key
    from mergelab.task_vectors import TaskVector

    torch.manual_seed(0)
    pre = {k: v.clone() for k, v in torch.nn.Linear(3, 3).state_dict().items()}
    tvs = {t: TaskVector.from_states(pre, {k: v + torch.randn_like(v) for k, v in pre.items()}) for t in ("a", "b")}
    bench = FakeBench()

    def path(evaluator, vectors):
        return search_checkpoint(tmp_path, {**search_key(evaluator, pre, vectors, 7, 1.0), "seed": 0})

    first = path(ResponseEvaluator(bench, split="val"), tvs)
    assert path(ResponseEvaluator(FakeBench(), split="val"), dict(tvs)) == first  # the same search: resumed
    bench.data_version = 1
    assert path(ResponseEvaluator(bench, split="val"), tvs) != first
    bench.data_version = 0
    other = {**tvs, "b": TaskVector.from_states(pre, {k: v - 1 for k, v in pre.items()})}
    assert path(ResponseEvaluator(bench, split="val"), other) != first
    # the genome's i-th coefficient scales the i-th task vector: the same vectors in another order are another search
    assert path(ResponseEvaluator(bench, split="val"), {"b": tvs["b"], "a": tvs["a"]}) != first


def test_an_irt_search_checkpoint_names_its_irt_fit(tmp_path):
    """The IRT model and the endpoints' abilities depend on the population they were fitted on (chapter 05's
    grids, random merges, held-out models): a search scored by another fit is another checkpoint."""
    from mergelab.analysis.irt import IRTModel
    from mergelab.experiments.ch05_merge3 import search_checkpoint

    rng = np.random.default_rng(0)
    model = IRTModel(rng.normal(size=(12, 2)), rng.normal(size=12))
    theta = rng.normal(size=(3, 2))
    key, items = {"fitness": "f", "seed": 0}, np.array([1, 5, 7])
    first = search_checkpoint(tmp_path, key, items, "gmp_irt", model, theta)
    assert search_checkpoint(tmp_path, key, items, "gmp_irt", IRTModel(model.discrimination.copy(),
                                                                     model.difficulty.copy()), theta.copy()) == first
    refit = IRTModel(model.discrimination, model.difficulty + 1e-3)
    assert search_checkpoint(tmp_path, key, items, "gmp_irt", refit, theta) != first
    assert search_checkpoint(tmp_path, key, items, "gmp_irt", model, theta + 1e-3) != first
    assert search_checkpoint(tmp_path, key, items, "p_irt", model, theta) != first
    assert search_checkpoint(tmp_path, key).name.startswith("full-")
    with pytest.raises(ValueError, match="endpoint_theta"):
        search_checkpoint(tmp_path, key, items, "gmp_irt")
