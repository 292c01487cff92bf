"""Ditto in the engines: personal models against hand-computed arrays, and batched against sequential."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from fedmpi.engine.batched import BatchedEngine
from fedmpi.engine.models import build_model
from fedmpi.engine.params import flatten
from fedmpi.engine.sequential import SequentialEngine, batch_generator
from fedmpi.fl.algorithms import ditto_start

UNEQUAL = [37, 50, 13, 64, 0, 8]  # with batch 8: short last batches, and a node without data
SHAPE = (1, 12, 12)
TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def config(personalize="ditto", lam=0.5, chunk=0, momentum=0.9, lr=0.01, epochs=2, batch=8):
    return SimpleNamespace(seed=7, local_epochs=epochs, batch_size=batch, lr=lr, momentum=momentum,
                           chunk_nodes=chunk, prox_mu=0.0, algorithm="fedavg", local_state="keep",
                           personalize=personalize, ditto_lambda=lam)


def shards(counts, seed=0, shape=SHAPE, classes=10):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(sum(counts), *shape, generator=gen)
    y = torch.randint(0, classes, (sum(counts),), generator=gen)
    return x, y, np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def rel_diff(a, b):
    return float((a - b).abs().max() / b.abs().max())


def run_rounds(engine_cls, model, cfg, rounds, rows=None, counts=UNEQUAL, shape=SHAPE):
    """`rounds` plain-mean rounds; returns (last round's node params, personal models [nodes, P], mains)."""
    x, y, offsets = shards(counts, shape=shape)
    model = build_model(model, shape, 10, seed=1) if isinstance(model, str) else model
    engine = engine_cls(model, x, y, offsets, 3, cfg)
    main, mains = flatten(list(model.parameters())), []
    for rnd in range(1, rounds + 1):
        mains.append(main)
        chunks = list(engine.train(main, rnd, rows))
        params = torch.cat([c.params for c in chunks])
        main = params.mean(0)
    return params, engine.state().get("personal"), mains


def test_ditto_start_takes_the_main_model_for_a_node_that_never_trained():
    personal = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, -2.0]])
    got = ditto_start(personal, torch.tensor([5.0, 6.0, 7.0]))
    assert torch.equal(got, torch.tensor([[5.0, 6.0, 7.0], [1.0, 0.0, -2.0]]))


def hand_ditto(x, y, w_rounds, seed, node, lam, lr, m, epochs, batch):
    """Ditto's personal model of one node for a linear softmax model, in numpy float64: each round v starts
    from the kept v (round 1: the received w), takes the sgd steps on CE + lam/2 ||v - w||^2 with a fresh
    momentum buffer, over the batches sgd_epochs draws."""
    v = None
    for rnd, (W, b) in enumerate(w_rounds, 1):
        v = [W.copy(), b.copy()] if v is None else v
        bufs = [np.zeros_like(W), np.zeros_like(b)]
        gen = batch_generator(seed, node, rnd)
        for _ in range(epochs):
            order = torch.randperm(len(y), generator=gen).numpy()
            for s in range(0, len(y), batch):
                idx = order[s:s + batch]
                z = x[idx] @ v[0].T + v[1]
                p = np.exp(z - z.max(1, keepdims=True))
                p /= p.sum(1, keepdims=True)
                p[np.arange(len(idx)), y[idx]] -= 1
                p /= len(idx)
                grads = [p.T @ x[idx] + lam * (v[0] - W), p.sum(0) + lam * (v[1] - b)]
                for i in range(2):
                    bufs[i] = m * bufs[i] + grads[i]
                    v[i] = v[i] - lr * bufs[i]
    return np.concatenate([v[0].ravel(), v[1].ravel()])


@pytest.mark.parametrize("engine_cls", [SequentialEngine, BatchedEngine])
def test_personal_model_matches_hand_computed_ditto_over_two_rounds(engine_cls):
    """One node, a linear model (the MLP kernel in the batched engine): v_k follows Algorithm 1's
    personal update, starting round 2 from its own v_k, not from the new global model."""
    cfg = config(lam=0.7, lr=0.1, momentum=0.5, epochs=1, batch=3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    torch.manual_seed(3)
    x, y, offsets = shards([7], shape=(4,), classes=3)
    engine = engine_cls(model, x, y, offsets, 3, cfg)
    main, mains = flatten(list(model.parameters())), []
    for rnd in (1, 2):
        mains.append(main.double().numpy())
        (chunk,) = engine.train(main, rnd)
        main = chunk.params[0] + 0.05  # a global model that differs from the node's own update
    w_rounds = [(w[:12].reshape(3, 4), w[12:]) for w in mains]
    want = hand_ditto(x.double().numpy(), y.numpy(), w_rounds, 7, 3, 0.7, 0.1, 0.5, 1, 3)
    got = engine.state()["personal"][0].double().numpy()
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    assert np.array_equal(chunk.personal[0].numpy(), engine.state()["personal"][0].numpy())


@pytest.mark.parametrize("engine_cls", [SequentialEngine, BatchedEngine])
def test_the_global_update_is_fedavgs_and_lambda_zero_gives_the_local_model_in_round_one(engine_cls):
    fedavg, none, _ = run_rounds(engine_cls, "2nn", config("none"), rounds=1)
    ditto, personal, _ = run_rounds(engine_cls, "2nn", config(lam=0.0), rounds=1)
    assert none is None and torch.equal(ditto, fedavg)  # the Allreduce gets the same update
    # Same start, same batches, a fresh momentum in both: with no pull v_k is the node's local model.
    assert torch.equal(personal, ditto)


@pytest.mark.parametrize("engine_cls", [SequentialEngine, BatchedEngine])
def test_a_strong_pull_keeps_the_personal_model_at_the_global_one(engine_cls):
    """lr * lambda = 1 (plain SGD): every step puts v back at w, up to one gradient step; the global
    model's own training (12 to 48 steps here) drifts away."""
    cfg = config(lam=1.0 / 0.05, lr=0.05, momentum=0.0, epochs=6)
    params, personal, mains = run_rounds(engine_cls, "2nn", cfg, rounds=1)
    trained = np.array(UNEQUAL) > 0
    away = (params - mains[0]).norm(dim=1)[trained]
    pulled = (personal - mains[0]).norm(dim=1)[trained]
    assert (pulled < 0.35 * away).all(), (pulled, away)
    _, loose, _ = run_rounds(engine_cls, "2nn", config(lam=0.0, lr=0.05, momentum=0.0, epochs=6), rounds=1)
    assert ((loose - mains[0]).norm(dim=1)[trained] > 0.9 * away).all()


@pytest.mark.parametrize("model_name", ["2nn", "cnn"])
def test_batched_equals_sequential_over_two_rounds_on_a_sampled_subset(model_name):
    rows = np.array([0, 2, 4, 5])  # not contiguous, and node 4 has no data
    ref, ref_v, _ = run_rounds(SequentialEngine, model_name, config(chunk=3), rounds=2, rows=rows)
    got, got_v, mains = run_rounds(BatchedEngine, model_name, config(chunk=3), rounds=2, rows=rows)
    assert rel_diff(got, ref) <= TOL and rel_diff(got_v, ref_v) <= TOL
    assert (got_v[[1, 3]] == 0).all()  # never trained: no personal model yet
    assert torch.equal(got_v[4], mains[0])  # no data: v_k is the first global model it received
    assert rel_diff(got_v[[0, 2, 5]], got[[0, 2, 3]]) > 1e-4  # the pull and the kept v_k acted
