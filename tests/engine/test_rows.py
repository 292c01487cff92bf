"""Inputs stay in the file's dtype; every gather converts its rows exactly as converting the whole block did."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fedmpi.engine.batched import BatchedEngine
from fedmpi.engine.central import train_central
from fedmpi.engine.evaluate import accuracy_loss, per_node_accuracy, stacked_accuracy
from fedmpi.engine.models import build_model
from fedmpi.engine.params import flatten
from fedmpi.engine.rows import Inputs, batch_rows
from fedmpi.engine.sequential import SequentialEngine

SHAPE = (1, 12, 12)
SCALE = 1 / 255
COUNTS = [37, 50, 13, 64, 0, 8]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def images(n=sum(COUNTS), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, *SHAPE), generator=gen, dtype=torch.uint8),
            torch.randint(0, 10, (n,), generator=gen))


def whole_block(data, scale):
    """The conversion of the whole block at load time, as it was before rows were converted per batch."""
    return data if data.dtype == torch.float32 and scale == 1.0 else data.float().mul_(scale)


@pytest.mark.parametrize("dtype, scale", [(torch.uint8, SCALE), (torch.float32, 1.0), (torch.float32, 0.5)])
def test_gathered_rows_are_bit_identical_to_the_converted_block(dtype, scale):
    data = images()[0].to(dtype)
    before = data.clone()
    full, x = whole_block(data.clone(), scale), Inputs(data, scale)
    idx = torch.tensor([[5, 0, 5], [171, 3, 9]])
    for key in (idx, idx.reshape(-1), slice(4, 40), slice(0, 0)):
        got = x[key]
        assert got.dtype == torch.float32 and torch.equal(got, full[key])
    assert torch.equal(x.reshape(len(x), -1)[idx], full.reshape(len(full), -1)[idx])
    assert x.data.dtype == dtype and torch.equal(x.data, before)  # the stored block was not converted or scaled


def test_uint8_rows_are_scaled_and_the_block_stays_a_quarter_of_float32():
    x = Inputs(torch.tensor([[0, 128, 255]], dtype=torch.uint8), SCALE)
    assert x[0].tolist() == pytest.approx([0.0, 128 / 255, 1.0]) and x[:].dtype == torch.float32
    assert x.stored_bytes() == 3 and x.element_size() == 4
    assert torch.equal(batch_rows(torch.tensor([[2.0, -4.0]]), 0, 0.5), torch.tensor([1.0, -2.0]))


def train(engine_cls, model_name, x, y, rounds=2, stateless=False):
    offsets = np.concatenate([[0], np.cumsum(COUNTS)]).astype(np.int64)
    cfg = SimpleNamespace(seed=7, local_epochs=2, batch_size=8, lr=0.01, momentum=0.9, chunk_nodes=3, prox_mu=0.0,
                          local_state="reset" if stateless else "keep")
    model = build_model(model_name, SHAPE, 10, seed=1)
    engine = engine_cls(model, x, y, offsets, 3, cfg)
    main, history = flatten(list(model.parameters())), []
    for rnd in range(1, rounds + 1):
        params = torch.cat([c.params for c in engine.train(main, rnd, np.array([0, 1, 3, 5]))])
        history.append(params)
        main = params.mean(0)
    return history


@pytest.mark.parametrize("engine_cls, model_name", [(BatchedEngine, "2nn"), (BatchedEngine, "cnn"),
                                                    (SequentialEngine, "2nn")],
                         ids=["batched-mlp", "batched-vmap", "sequential"])
def test_training_on_uint8_rows_is_bit_identical_to_training_on_the_float_block(engine_cls, model_name):
    data, y = images()
    want = train(engine_cls, model_name, whole_block(data, SCALE), y)
    got = train(engine_cls, model_name, Inputs(data, SCALE), y)
    for w, g in zip(want, got):
        assert torch.equal(w, g)
    assert not torch.equal(got[0], got[1])  # the rounds trained


def test_scoring_uint8_rows_equals_scoring_the_float_block():
    data, y = images(40)
    model = build_model("cnn", SHAPE, 10, seed=1)
    flat = flatten(list(model.parameters()))
    params = torch.stack([flat, flat * 0.5, flat * -1.0])
    full, x = whole_block(data, SCALE), Inputs(data, SCALE)
    offsets, starts, counts = np.array([0, 7, 7, 40]), np.array([0, 7, 20]), np.array([7, 0, 20])
    assert accuracy_loss(model, flat, x, y) == accuracy_loss(model, flat, full, y)
    assert np.array_equal(per_node_accuracy(model, flat, x, y, offsets),
                          per_node_accuracy(model, flat, full, y, offsets), equal_nan=True)
    assert np.array_equal(stacked_accuracy(model, params, x, y, starts, counts),
                          stacked_accuracy(model, params, full, y, starts, counts), equal_nan=True)


def test_the_centralized_baseline_on_uint8_rows_equals_the_float_block():
    data, y = images(60)
    cfg = SimpleNamespace(model="2nn", model_args={}, loss="cross_entropy", seed=3, central_epochs=2, batch_size=8,
                          lr=0.05, momentum=0.9)
    test_x, test_y = images(30, seed=1)
    want = train_central(cfg, whole_block(data, SCALE), y, whole_block(test_x, SCALE), test_y, SHAPE, 10)
    got = train_central(cfg, Inputs(data, SCALE), y, Inputs(test_x, SCALE), test_y, SHAPE, 10)
    assert got == want and got["test_acc"][0] > 0
