"""Personal layers (FedPer) in the engines: each node trains with its own copy of the named layers."""
import numpy as np
import pytest
import torch
from test_ditto import UNEQUAL, config, rel_diff, shards

from fedmpi.engine.batched import BatchedEngine
from fedmpi.engine.models import build_model
from fedmpi.engine.params import flatten
from fedmpi.engine.sequential import SequentialEngine
from fedmpi.engine.state import with_own_layers
from fedmpi.errors import ConfigError
from fedmpi.fl.algorithms import personal_columns, shared_columns

SHAPE = (1, 12, 12)
HEAD = {"2nn": "5", "cnn": "9"}  # each model's last Linear


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_personal_columns_are_the_named_parameters_and_a_bad_name_is_refused():
    named = [("1.weight", 6), ("1.bias", 2), ("3.weight", 4), ("3.bias", 2), ("30.bias", 1)]
    assert personal_columns(named, ["3"]).tolist() == list(range(8, 14))  # "3" is not a prefix of "30.bias"
    assert personal_columns(named, ["1.bias", "30"]).tolist() == [6, 7, 14]
    assert shared_columns(torch.tensor([6, 7, 14]), 15).tolist() == [0, 1, 2, 3, 4, 5, *range(8, 14)]
    with pytest.raises(ConfigError, match="config key 'personal_layers': no parameter of the model is '4'"):
        personal_columns(named, ["1", "4"])
    with pytest.raises(ConfigError, match="names every parameter"):
        personal_columns(named, ["1", "3", "30"])


def test_a_node_starts_from_the_main_model_with_its_own_layers():
    main = torch.tensor([1.0, 2.0, 3.0, 4.0])
    own = torch.tensor([[0.0, 0.0], [7.0, -1.0]])  # node 0 has not trained yet
    got = with_own_layers(main, own, torch.tensor([1, 3]))
    assert torch.equal(got, torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 7.0, 3.0, -1.0]]))


def fedper_rounds(engine_cls, model_name, layers, rounds=2, rows=None):
    """Plain-mean rounds where only the shared columns move the main model (as the Allreduce does)."""
    cfg = config("none", chunk=3)
    cfg.personal_layers = layers
    x, y, offsets = shards(UNEQUAL)
    model = build_model(model_name, SHAPE, 10, seed=1)
    engine = engine_cls(model, x, y, offsets, 3, cfg)
    main = flatten(list(model.parameters()))
    first = main.clone()
    shared = engine.shared if engine.shared is not None else torch.arange(main.numel())
    for rnd in range(1, rounds + 1):
        params = torch.cat([c.params for c in engine.train(main, rnd, rows)])
        main = main.clone()
        main[shared] = params[:, shared].mean(0)
    return params, engine.state().get("layers"), main, first, engine


@pytest.mark.parametrize("model_name", ["2nn", "cnn"])
def test_batched_equals_sequential_and_each_node_keeps_its_own_layers(model_name):
    rows = np.array([0, 2, 4, 5])
    ref, ref_own, ref_main, first, engine = fedper_rounds(SequentialEngine, model_name, [HEAD[model_name]], rows=rows)
    got, own, main, _, _ = fedper_rounds(BatchedEngine, model_name, [HEAD[model_name]], rows=rows)
    assert rel_diff(got, ref) <= 1e-5 and rel_diff(own, ref_own) <= 1e-5 and rel_diff(main, ref_main) <= 1e-5
    cols = engine.cols
    assert own.shape == (len(UNEQUAL), len(cols)) and (own[[1, 3]] == 0).all()  # untrained: none yet
    assert torch.equal(own[rows], got[:, cols])  # each trained node's model holds its own
    assert rel_diff(own[0], own[2]) > 1e-3  # and they differ between nodes
    assert torch.equal(main[cols], first[cols])  # the main model's personal layers never move


def test_no_personal_layers_is_fedavg():
    fedavg, _, _, _, _ = fedper_rounds(BatchedEngine, "2nn", [])
    plain, none, _, _, engine = fedper_rounds(BatchedEngine, "2nn", [HEAD["2nn"]])
    assert none is not None and engine.cols is not None
    empty, state, _, _, engine = fedper_rounds(BatchedEngine, "2nn", [])
    assert state is None and engine.cols is None and torch.equal(empty, fedavg)
    assert rel_diff(plain, fedavg) > 1e-4
