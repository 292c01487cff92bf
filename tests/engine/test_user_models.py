"""A user's model builder and loss in the engines (build_model, loss_function, scoring)."""
from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedmpi.engine.evaluate import accuracy_loss, stacked_accuracy
from fedmpi.engine.losses import loss_function
from fedmpi.engine.models import build_model
from fedmpi.engine.params import flatten
from fedmpi.errors import ConfigError


@pytest.fixture()
def usermod(monkeypatch):
    mod = types.ModuleType("fake_user_mod")

    def mlp(input_shape, classes, width=4):
        return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], width), nn.ReLU(), nn.Linear(width, classes))

    def with_dropout(input_shape, classes):
        return nn.Sequential(nn.Dropout(0.9), nn.Linear(input_shape[0], classes))

    mod.mlp, mod.with_dropout = mlp, with_dropout
    mod.per_row = lambda outputs, targets: F.cross_entropy(outputs, targets, reduction="none") * 2
    mod.scalar = lambda outputs, targets: outputs.sum()
    monkeypatch.setitem(sys.modules, "fake_user_mod", mod)
    return mod


def test_the_same_seed_builds_the_same_weights_and_model_args_reach_the_builder(usermod):
    a = build_model("fake_user_mod:mlp", (6,), 3, seed=5, args={"width": 7})
    b = build_model("fake_user_mod:mlp", (6,), 3, seed=5, args={"width": 7})
    c = build_model("fake_user_mod:mlp", (6,), 3, seed=6, args={"width": 7})
    assert a[1].weight.shape == (7, 6) and torch.equal(flatten(list(a.parameters())), flatten(list(b.parameters())))
    assert not torch.equal(flatten(list(a.parameters())), flatten(list(c.parameters())))


def test_a_builder_that_raises_is_one_config_error(usermod):
    with pytest.raises(ConfigError, match=r"'fake_user_mod:mlp': building the model raised TypeError"):
        build_model("fake_user_mod:mlp", (6,), 3, seed=0, args={"depth": 2})


def test_the_user_loss_is_the_reported_test_loss_and_its_shape_is_checked(usermod):
    model = build_model("fake_user_mod:mlp", (6,), 3, seed=0)
    x, y = torch.randn(20, 6), torch.randint(0, 3, (20,))
    flat = flatten(list(model.parameters()))
    _, ce = accuracy_loss(model, flat, x, y)
    _, doubled = accuracy_loss(model, flat, x, y, loss_function("fake_user_mod:per_row"))
    assert doubled == pytest.approx(2 * ce, rel=1e-6)
    assert loss_function("cross_entropy") is None
    with pytest.raises(ConfigError, match=r"must return one loss per row \(shape \[20\]\), got \[\]"):
        accuracy_loss(model, flat, x, y, loss_function("fake_user_mod:scalar"))


def test_scoring_runs_the_model_in_eval_mode_and_restores_its_mode(usermod):
    model = build_model("fake_user_mod:with_dropout", (6,), 3, seed=0)
    x, y = torch.randn(50, 6), torch.randint(0, 3, (50,))
    flat = flatten(list(model.parameters()))
    assert accuracy_loss(model, flat, x, y) == accuracy_loss(model, flat, x, y)  # no Dropout draws
    stacked = stacked_accuracy(model, flat[None].repeat(2, 1), x, y, [0, 25], [25, 25])
    assert stacked[0] == pytest.approx(accuracy_loss(model, flat, x[:25], y[:25])[0]) and model.training
