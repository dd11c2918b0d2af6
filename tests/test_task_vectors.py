"""The TaskVector value type."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mergelab.task_vectors import TaskVector, cosine_similarity_matrix


def test_from_states_skips_integer_buffers_and_apply_to_restores_the_expert():
    pre = {"w": torch.ones(2, 2), "steps": torch.tensor(3)}
    ft = {"w": torch.full((2, 2), 3.0), "steps": torch.tensor(5)}
    tv = TaskVector.from_states(pre, ft)
    assert set(tv.keys()) == {"w"}
    restored = tv.apply_to(pre)
    torch.testing.assert_close(restored["w"], ft["w"])
    assert restored["steps"].item() == 3  # integer buffers are copied from the pretrained model


def test_arithmetic_norms_and_flatten():
    a = TaskVector({"x": torch.tensor([3.0, 0.0]), "y": torch.tensor([[4.0]])})
    b = TaskVector({"x": torch.tensor([1.0, 1.0]), "y": torch.tensor([[0.0]])})
    assert a.norm() == pytest.approx(5.0)
    assert a.layer_norms() == {"x": pytest.approx(3.0), "y": pytest.approx(4.0)}
    torch.testing.assert_close((a + b)["x"], torch.tensor([4.0, 1.0]))
    torch.testing.assert_close((a - b)["x"], torch.tensor([2.0, -1.0]))
    torch.testing.assert_close((-a)["y"], torch.tensor([[-4.0]]))
    torch.testing.assert_close((0.5 * a)["x"], (a * 0.5)["x"])
    torch.testing.assert_close((a / 2)["y"], torch.tensor([[2.0]]))
    torch.testing.assert_close(sum([a, b])["x"], (a + b)["x"])
    torch.testing.assert_close(a.flatten(), torch.tensor([3.0, 0.0, 4.0]))
    assert a.numel() == 3
    # any real scalar: NumPy's (on either side, as a coefficient from np.linspace is) and one-element tensors
    for scalar in (np.float32(0.5), np.float64(0.5), torch.tensor(0.5)):
        torch.testing.assert_close((a * scalar)["x"], torch.tensor([1.5, 0.0]))
    torch.testing.assert_close((np.float32(0.5) * a)["x"], torch.tensor([1.5, 0.0]))
    torch.testing.assert_close((np.int64(2) * a)["y"], torch.tensor([[8.0]]))
    with pytest.raises(TypeError):
        a * "2"
    with pytest.raises(ValueError, match="coefficient=nan is not valid"):
        a.apply_to({"x": torch.zeros(2), "y": torch.zeros(1, 1)}, float("nan"))


def test_cosine_similarity_matrix_on_known_vectors():
    tvs = {"a": TaskVector({"x": torch.tensor([1.0, 0.0])}), "b": TaskVector({"x": torch.tensor([1.0, 1.0])}),
           "c": TaskVector({"x": torch.tensor([0.0, -2.0])})}
    names, cos = cosine_similarity_matrix(tvs)
    assert names == ["a", "b", "c"]
    torch.testing.assert_close(cos.diagonal(), torch.ones(3))
    assert cos[0, 1].item() == pytest.approx(1 / math.sqrt(2))
    assert cos[0, 2].item() == pytest.approx(0.0, abs=1e-7)
    assert cos[1, 2].item() == pytest.approx(-1 / math.sqrt(2))


def test_arithmetic_refuses_mismatched_vectors():
    a = TaskVector({"x": torch.zeros(2)})
    with pytest.raises(ValueError, match="shape"):
        a + TaskVector({"x": torch.zeros(3)})
