"""BatchNorm's running statistics: kept per node or averaged, trained alike by both engines, scored in eval mode."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from fedmpi.config import load_config, parse_overrides
from fedmpi.engine.batched import BatchedEngine, check_stackable
from fedmpi.engine.evaluate import accuracy_loss, stacked_accuracy
from fedmpi.engine.params import flatten, model_tensors, parameter_count
from fedmpi.engine.sequential import SequentialEngine
from fedmpi.errors import ConfigError

# Unequal shards with batch 8: 37, 45 and 13 end on a short batch of 5 rows (padded in the batched engine),
# 0 has none. A BatchNorm batch of 2 rows is ill-conditioned (each output is about +-1): there float32
# rounding grows to 6e-5 in two rounds while float64 agrees to 1e-14 (test below), so float32 cases use 5.
UNEQUAL = [37, 45, 13, 64, 0, 8]
# float32 after two rounds, measured at most 7.5e-7 relative per node; the bar the engines must meet is 1e-5.
TOL = 1e-5
SHAPE = (1, 12, 12)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def bn_net(seed=1):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 10))


def shards(counts, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(sum(counts), *SHAPE, generator=gen)
    y = torch.randint(0, 10, (sum(counts),), generator=gen)
    return x, y, np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def config(buffers="average", chunk=0):
    return SimpleNamespace(seed=7, local_epochs=2, batch_size=8, lr=0.01, momentum=0.9, chunk_nodes=chunk,
                           prox_mu=0.0, buffers=buffers)


def run_rounds(engine_cls, cfg, rounds=2, counts=UNEQUAL):
    """FedAvg rounds (plain mean of the nodes' vectors, buffers included); every round's node vectors, the state."""
    x, y, offsets = shards(counts)
    model = bn_net()
    engine = engine_cls(model, x, y, offsets, 3, cfg)
    main, history = flatten(model_tensors(model)), []
    for rnd in range(1, rounds + 1):
        vectors = torch.cat([c.params for c in engine.train(main, rnd)])
        history.append(vectors)
        main = vectors.mean(0)
    return history, engine.state(), parameter_count(model)


def rel_diff(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("buffers", ["average", "local"])
def test_batched_equals_sequential_with_batchnorm_over_two_rounds(buffers):
    ref, ref_state, size = run_rounds(SequentialEngine, config(buffers))
    got, got_state, _ = run_rounds(BatchedEngine, config(buffers, chunk=4))
    for r, g in zip(ref, got):
        assert g.shape == r.shape and g.shape[1] > size  # the vectors carry the running statistics
        assert rel_diff(g, r) <= TOL
        assert rel_diff(g[:, size:], r[:, size:]) <= TOL
    assert rel_diff(got_state["momentum"], ref_state["momentum"]) <= TOL
    # Round 1 moved the running statistics of every node with data, and of no other (running_mean starts at 0).
    means = got[0][:, size:size + 4]
    assert all((means[k].abs().max() > 1e-3) == (n > 0) for k, n in enumerate(UNEQUAL))
    if buffers == "local":
        assert rel_diff(got_state["buffers"], ref_state["buffers"]) <= TOL
        assert torch.equal(got_state["buffers"], got[-1][:, size:])  # what each node ended with, kept


def test_in_float64_the_engines_agree_to_rounding_even_on_a_two_row_batch():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        counts = [50, 13, 0, 8]  # 50 = 6 * 8 + 2
        ref, _, _ = run_rounds(SequentialEngine, config(), counts=counts)
        got, _, _ = run_rounds(BatchedEngine, config(chunk=4), counts=counts)
    finally:
        torch.set_default_dtype(previous)
    assert got[-1].dtype == torch.float64 and rel_diff(got[-1], ref[-1]) <= 1e-13


def test_local_buffers_start_each_round_from_the_nodes_own_not_the_average():
    avg, _, size = run_rounds(BatchedEngine, config("average"))
    local, state, _ = run_rounds(BatchedEngine, config("local"))
    assert torch.equal(avg[0], local[0])  # round 1: every node starts from the model's initial buffers
    assert not torch.allclose(avg[1][:, size:], local[1][:, size:])
    one, one_state, _ = run_rounds(BatchedEngine, config("local"), rounds=1)
    # round 2 of node k started from node k's round-1 statistics: rerun it by hand from those
    x, y, offsets = shards(UNEQUAL)
    engine = SequentialEngine(bn_net(), x, y, offsets, 3, config("local"))
    engine.store.get("buffers").copy_(one_state["buffers"])
    engine.store.get("momentum").copy_(one_state["momentum"])
    again = torch.cat([c.params for c in engine.train(one[0].mean(0), 2)])
    assert rel_diff(again, local[1]) <= TOL


def test_padding_rows_never_enter_the_batch_statistics():
    """A node with 13 rows in batches of 8 trains its short batch beside a node of 64: its statistics must be
    those of its own 5 rows, as the sequential engine's; alone in its chunk it gives the same vector."""
    counts = [13, 64]
    together, _, size = run_rounds(BatchedEngine, config(chunk=2), rounds=1, counts=counts)
    ref, _, _ = run_rounds(SequentialEngine, config(), rounds=1, counts=counts)
    assert rel_diff(together[0][0], ref[0][0]) <= TOL


def test_scoring_uses_the_running_statistics_in_eval_mode_and_moves_none():
    model = bn_net()
    x, y, _ = shards([40])
    flat = flatten(model_tensors(model)).clone()
    size = parameter_count(model)
    before = [b.clone() for b in model.buffers()]
    first = accuracy_loss(model, flat, x, y)
    assert first == accuracy_loss(model, flat, x, y) and model.training  # mode restored
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers()))
    shifted = flat.clone()
    shifted[size:size + 4] += 3.0  # the first BatchNorm's running_mean
    assert accuracy_loss(model, shifted, x, y)[1] != first[1]
    stacked = stacked_accuracy(model, torch.stack([flat, shifted]), x, y, np.array([0, 0]), np.array([40, 40]))
    from fedmpi.engine.evaluate import predict_stats
    expect = [predict_stats(model, v, x, y)[0].float().mean().item() for v in (flat, shifted)]
    assert np.allclose(stacked, expect)


def test_the_batched_engine_refuses_only_what_it_cannot_stack():
    check_stackable(bn_net())
    cumulative = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, momentum=None))
    with pytest.raises(ConfigError, match=r"BatchNorm1d with a momentum.*engine: sequential"):
        check_stackable(cumulative)

    class Counter(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("seen", torch.zeros(1))

    with pytest.raises(ConfigError, match=r"cannot train a model with Counter .*engine: sequential"):
        check_stackable(nn.Sequential(nn.Linear(4, 4), Counter()))


@pytest.mark.parametrize("key,value", [("algorithm", "scaffold"), ("dp", "gaussian"), ("personalize", "ditto"),
                                       ("personal_layers", ["fc"])])
def test_buffers_refuse_algorithms_made_for_parameters_only(key, value):
    x, y, offsets = shards([8, 8])
    cfg = SimpleNamespace(**{**vars(config()), key: value})
    with pytest.raises(ConfigError, match=r"config key 'buffers'.*algorithm: fedavg, dp: none, personalize: none"):
        SequentialEngine(bn_net(), x, y, offsets, 0, cfg)


def test_the_buffers_key_takes_average_or_local_only(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("buffers: local\n")
    assert load_config(path).buffers == "local"
    assert load_config(None).buffers == "average"
    with pytest.raises(ConfigError, match=r"config key 'buffers'.*average.*local"):
        load_config(None, parse_overrides(["buffers=global"]))


def test_the_central_baseline_scores_a_batchnorm_model_with_its_running_statistics(monkeypatch):
    import sys
    import types

    from fedmpi.engine.central import train_central

    mod = types.ModuleType("fake_bn_mod")
    mod.net = lambda input_shape, classes: bn_net()
    monkeypatch.setitem(sys.modules, "fake_bn_mod", mod)
    x, y, _ = shards([64])
    cfg = SimpleNamespace(model="fake_bn_mod:net", model_args={}, seed=1, loss="cross_entropy", central_epochs=2,
                          batch_size=8, lr=0.01, momentum=0.9)
    result = train_central(cfg, x, y, x[:32], y[:32], SHAPE, 10)
    again = train_central(cfg, x, y, x[:32], y[:32], SHAPE, 10)
    assert len(result["test_acc"]) == 2 and result == again  # scored in eval mode: no draw, no batch statistics
