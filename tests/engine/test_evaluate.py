"""Scoring: the batched score of a chunk's models equals scoring each model alone."""
import numpy as np
import pytest
import torch

from fedmpi.engine.evaluate import per_node_accuracy, stacked_accuracy
from fedmpi.engine.models import build_model
from fedmpi.engine.params import flatten

SHAPE = (1, 12, 12)


@pytest.mark.parametrize("model_name", ["2nn", "cnn"])
def test_stacked_accuracy_equals_one_forward_per_model_on_unequal_and_empty_splits(model_name):
    gen = torch.Generator().manual_seed(3)
    model = build_model(model_name, SHAPE, 10, seed=0)
    base = flatten(list(model.parameters()))
    params = base + 0.5 * torch.randn(4, base.numel(), generator=gen)  # four different models
    x, y = torch.rand(40, *SHAPE, generator=gen), torch.randint(0, 10, (40,), generator=gen)
    starts, counts = np.array([0, 5, 5, 30]), np.array([5, 0, 25, 1])  # unequal, one empty
    got = stacked_accuracy(model, params, x, y, starts, counts)
    want = [per_node_accuracy(model, params[j], x[a:a + n], y[a:a + n], np.array([0, n]))[0]
            for j, (a, n) in enumerate(zip(starts, counts))]
    assert np.isnan(got[1]) and np.isnan(want[1])
    assert np.allclose(np.delete(got, 1), np.delete(want, 1), rtol=0, atol=1e-12)
    assert len(set(np.delete(got, 1).round(6))) > 1  # the models really differ, so the rows cannot mix up


def test_stacked_accuracy_of_no_rows_at_all_is_nan():
    model = build_model("2nn", SHAPE, 10, seed=0)
    params = flatten(list(model.parameters()))[None]
    got = stacked_accuracy(model, params, torch.zeros(0, *SHAPE), torch.zeros(0, dtype=torch.long), [0], [0])
    assert np.isnan(got).all() and got.shape == (1,)
