"""The engines call tick() before every training step; an exception from it ends the training at once."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fedmpi.engine.batched import BatchedEngine
from fedmpi.engine.models import build_model
from fedmpi.engine.params import flatten
from fedmpi.engine.sequential import SequentialEngine

SHAPE = (1, 12, 12)
COUNTS = [16, 16, 16, 16]  # batch 8, 2 epochs: 4 steps per node


class Stop(Exception):
    pass


def engine(kind, model_name="2nn", chunk=1, threads=1):
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(sum(COUNTS), *SHAPE, generator=gen)
    y = torch.randint(0, 10, (sum(COUNTS),), generator=gen)
    offsets = np.concatenate([[0], np.cumsum(COUNTS)]).astype(np.int64)
    cfg = SimpleNamespace(seed=3, local_epochs=2, batch_size=8, lr=0.01, momentum=0.9, chunk_nodes=chunk, prox_mu=0.0)
    model = build_model(model_name, SHAPE, 10, seed=1)
    cls = {"batched": BatchedEngine, "sequential": SequentialEngine}[kind]
    return cls(model, x, y, offsets, 0, cfg), flatten(list(model.parameters()))


@pytest.fixture(autouse=True)
def restore_threads():
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("kind,model_name,chunk", [("batched", "2nn", 1), ("batched", "2nn", 4),
                                                   ("batched", "cnn", 2), ("sequential", "2nn", 1)])
def test_tick_runs_once_per_step(kind, model_name, chunk):
    eng, main = engine(kind, model_name, chunk)
    calls = []
    chunks = list(eng.train(main, 1, None, lambda: calls.append(1)))
    assert sum(len(c.nodes) for c in chunks) == 4
    # Batched: the nodes of a chunk step together (4 steps per chunk); sequential: 4 steps per node.
    assert len(calls) == (4 * len(chunks) if kind == "batched" else 16)


@pytest.mark.parametrize("kind,threads", [("batched", 1), ("batched", 2), ("sequential", 1)])
def test_an_exception_from_tick_ends_the_training_within_a_step(kind, threads):
    eng, main = engine(kind, chunk=1, threads=threads)
    calls = []

    def tick():
        calls.append(1)
        if len(calls) >= 6:  # from mid-way through the second node on, as a stop flag stays set
            raise Stop

    got = []
    with pytest.raises(Stop):
        for chunk in eng.train(main, 1, None, tick):
            got.extend(chunk.nodes)
    assert got in ([0], [])  # nothing after the interruption came out
    # Each other worker thread stops at its next step (and at most one chunk it had just begun).
    assert 6 <= len(calls) <= 6 + 2 * (threads - 1)


def test_without_tick_the_result_is_the_same():
    a, main = engine("batched", chunk=2)
    b, _ = engine("batched", chunk=2)
    with_tick = torch.cat([c.params for c in a.train(main, 1, None, lambda: None)])
    without = torch.cat([c.params for c in b.train(main, 1)])
    assert torch.equal(with_tick, without)
