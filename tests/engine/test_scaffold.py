"""SCAFFOLD in the engines: the batched paths (hand-written MLP, vmap) follow the sequential reference."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fedmpi.engine.batched import BatchedEngine
from fedmpi.engine.models import build_model
from fedmpi.engine.params import flatten
from fedmpi.engine.sequential import SequentialEngine
from fedmpi.fl.algorithms import scaffold_server_control

UNEQUAL = [37, 50, 13, 64, 0, 8]  # with batch 8: short last batches, and a node without data
SHAPE = (1, 12, 12)
TOL = 1e-5


def shards(counts, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(sum(counts), *SHAPE, generator=gen)
    y = torch.randint(0, 10, (sum(counts),), generator=gen)
    return x, y, np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def rel_diff(a, b):
    return float((a - b).abs().max() / b.abs().max())


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def config(algorithm="scaffold", chunk=0):
    return SimpleNamespace(seed=7, local_epochs=2, batch_size=8, lr=0.01, momentum=0.9, chunk_nodes=chunk,
                           prox_mu=0.0, algorithm=algorithm)


def run_rounds(engine_cls, model_name, cfg, rounds, rows=None, counts=UNEQUAL):
    """`rounds` rounds over `rows` (all nodes when None), plain mean, server c as combine.py moves it;
    returns the last round's node params, the node controls and the server control."""
    x, y, offsets = shards(counts)
    model = build_model(model_name, SHAPE, 10, seed=1)
    engine = engine_cls(model, x, y, offsets, 3, cfg)
    main = flatten(list(model.parameters()))
    for rnd in range(1, rounds + 1):
        chunks = list(engine.train(main, rnd, rows))
        params = torch.cat([c.params for c in chunks])
        if cfg.algorithm == "scaffold":
            deltas = [c.control_delta for c in chunks if c.control_delta is not None]
            scaffold_server_control(engine.server_control, torch.cat(deltas).sum(0), len(counts))
        main = params.mean(0)
    control = engine.state().get("control")
    return params, control, getattr(engine, "server_control", None)


@pytest.mark.parametrize("model_name", ["2nn", "cnn"])
def test_with_zero_control_variates_round_one_is_fedavg_exactly(model_name):
    for engine_cls in (SequentialEngine, BatchedEngine):
        fedavg, _, _ = run_rounds(engine_cls, model_name, config("fedavg"), rounds=1)
        scaffold, control, c = run_rounds(engine_cls, model_name, config(), rounds=1)
        assert torch.equal(scaffold, fedavg)
        assert (control[np.array(UNEQUAL) > 0] != 0).any(1).all() and (c != 0).any()


@pytest.mark.parametrize("model_name", ["2nn", "cnn"])
def test_batched_equals_sequential_over_two_rounds(model_name):
    ref, ref_ci, ref_c = run_rounds(SequentialEngine, model_name, config(), rounds=2)
    got, got_ci, got_c = run_rounds(BatchedEngine, model_name, config(chunk=4), rounds=2)
    assert rel_diff(got, ref) <= TOL and rel_diff(got_ci, ref_ci) <= TOL and rel_diff(got_c, ref_c) <= TOL
    assert (got_ci[UNEQUAL.index(0)] == 0).all()  # the node without data took no step: c_i stays zero
    fedavg, _, _ = run_rounds(BatchedEngine, model_name, config("fedavg", chunk=4), rounds=2)
    assert rel_diff(got, fedavg) > 1e-4  # in round 2 the correction acted


@pytest.mark.parametrize("model_name", ["2nn", "cnn"])
def test_a_sampled_subset_keeps_the_other_nodes_controls(model_name):
    rows = np.array([0, 2, 3, 5])  # not contiguous: the batched engine gathers and writes back c_i
    ref, ref_ci, ref_c = run_rounds(SequentialEngine, model_name, config(chunk=3), rounds=2, rows=rows)
    got, got_ci, got_c = run_rounds(BatchedEngine, model_name, config(chunk=3), rounds=2, rows=rows)
    assert rel_diff(got, ref) <= TOL and rel_diff(got_ci, ref_ci) <= TOL and rel_diff(got_c, ref_c) <= TOL
    assert (got_ci[[1, 4]] == 0).all() and (got_ci[rows] != 0).any(1).all()


def test_fedavg_keeps_no_control_state():
    x, y, offsets = shards([8, 8])
    engine = BatchedEngine(build_model("2nn", SHAPE, 10, seed=1), x, y, offsets, 0, config("fedavg"))
    assert engine.control is None and set(engine.state()) == {"momentum"}
