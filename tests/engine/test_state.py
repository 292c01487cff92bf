"""Per-node state: what each local_state keeps, and that a stateless node trains as a fresh optimizer."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fedmpi.config import Config, node_state_names
from fedmpi.engine.batched import BatchedEngine
from fedmpi.engine.models import build_model
from fedmpi.engine.params import flatten
from fedmpi.engine.sequential import SequentialEngine
from fedmpi.engine.state import NodeState, make_state

SHAPE = (1, 8, 8)
COUNTS = [20, 9, 31, 16]


def config(local_state="keep", momentum=0.9):
    return SimpleNamespace(seed=3, local_epochs=2, batch_size=8, lr=0.05, momentum=momentum, chunk_nodes=2,
                           prox_mu=0.0, local_state=local_state)


def data():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(sum(COUNTS), *SHAPE, generator=gen)
    y = torch.randint(0, 10, (sum(COUNTS),), generator=gen)
    return x, y, np.concatenate([[0], np.cumsum(COUNTS)]).astype(np.int64)


def two_rounds(engine_cls, cfg, rows=None):
    """Round 1 from the initial model, round 2 from round 1's mean; both rounds' node params."""
    x, y, offsets = data()
    model = build_model("2nn", SHAPE, 10, seed=1)
    engine = engine_cls(model, x, y, offsets, 5, cfg)
    main, out = flatten(list(model.parameters())), []
    for rnd in (1, 2):
        params = torch.cat([c.params for c in engine.train(main, rnd, rows)])
        out.append(params)
        main = params.mean(0)
    return out, engine


def test_which_configs_keep_state():
    assert node_state_names(Config()) == ("momentum",)
    assert node_state_names(Config(local_state="reset")) == ()
    assert node_state_names(Config(momentum=0.0)) == ()


@pytest.mark.parametrize("engine_cls", [SequentialEngine, BatchedEngine])
def test_a_stateless_engine_holds_no_node_tensor(engine_cls):
    for cfg in (config("reset"), config("keep", momentum=0.0)):
        _, engine = two_rounds(engine_cls, cfg)
        assert engine.state() == {}


@pytest.mark.parametrize("engine_cls", [SequentialEngine, BatchedEngine])
def test_at_momentum_0_keep_and_reset_give_the_same_bits(engine_cls):
    keep, engine = two_rounds(engine_cls, config("keep", 0.0))
    reset, _ = two_rounds(engine_cls, config("reset", 0.0))
    assert engine.state() == {}  # momentum 0 keeps nothing even with local_state keep
    for a, b in zip(keep, reset):
        assert torch.equal(a, b)


@pytest.mark.parametrize("engine_cls", [SequentialEngine, BatchedEngine])
def test_reset_is_a_fresh_optimizer_each_round(engine_cls):
    """reset == keep in round 1; in round 2 reset equals keep with every momentum zeroed before it."""
    keep, keep_engine = two_rounds(engine_cls, config("keep"))
    reset, _ = two_rounds(engine_cls, config("reset"))
    assert torch.equal(keep[0], reset[0])
    assert not torch.allclose(keep[1], reset[1])  # carried momentum matters here: a real comparison
    x, y, offsets = data()
    model = build_model("2nn", SHAPE, 10, seed=1)
    fresh = engine_cls(model, x, y, offsets, 5, config("keep"))
    again = torch.cat([c.params for c in fresh.train(keep[0].mean(0), 2)])
    assert torch.equal(again, reset[1])
    assert keep_engine.state()["momentum"].abs().sum() > 0


@pytest.mark.parametrize("engine_cls", [SequentialEngine, BatchedEngine])
def test_reset_on_a_sampled_subset(engine_cls):
    rows = np.array([0, 2, 3])
    reset, _ = two_rounds(engine_cls, config("reset"), rows)
    all_nodes, _ = two_rounds(engine_cls, config("reset"))
    # another chunk cut pads batches differently: the same math up to float32 rounding
    assert torch.allclose(reset[0], all_nodes[0][rows], rtol=0, atol=1e-6)


def test_the_store_registers_once_and_resets_rows():
    store = NodeState(3, 4, torch.device("cpu"))
    assert store.get("momentum") is None and store.as_dict() == {}
    m = store.register("momentum")
    assert store.register("momentum") is m and m.shape == (3, 4)
    store.register("control")  # a second named state, as SCAFFOLD's control variates would be
    m += 1
    store.tensors["control"] += 2
    store.reset_row(1)
    assert m[1].abs().sum() == 0 and store.tensors["control"][1].abs().sum() == 0 and m[0].sum() == 4
    assert torch.equal(store.rows("momentum", torch.tensor([2, 0])), m[[2, 0]])
    assert store.rows("absent", torch.tensor([0])) is None
    assert set(make_state(Config(), 2, 3, torch.device("cpu")).as_dict()) == {"momentum"}
    assert make_state(Config(local_state="reset"), 2, 3, torch.device("cpu")).as_dict() == {}


def test_kept_buffers_start_from_the_models_and_a_reset_row_goes_back_to_them():
    initial = torch.tensor([0.0, 0.0, 1.0, 1.0])  # running_mean, running_var of a BatchNorm of 2 channels
    store = make_state(Config(buffers="local"), 3, 5, torch.device("cpu"), initial_buffers=initial)
    kept = store.get("buffers")
    assert kept.shape == (3, 4) and torch.equal(kept, initial.expand(3, -1))
    assert store.get("momentum").shape == (3, 5)
    kept += 7
    store.get("momentum").add_(1)
    store.reset_row(2)
    assert torch.equal(kept[2], initial) and torch.equal(kept[0], initial + 7)
    assert store.get("momentum")[2].abs().sum() == 0
