"""Dropout in the batched engine: each node's masks drawn as the sequential engine draws them, from
(seed, node, round)."""
import numpy as np
import pytest
import torch
from test_buffers import UNEQUAL, config, rel_diff, shards
from torch import nn

from fedmpi.engine.batched import BatchedEngine, check_stackable
from fedmpi.engine.dropout import draw_masks
from fedmpi.engine.params import flatten, model_tensors
from fedmpi.engine.sequential import SequentialEngine
from fedmpi.errors import ConfigError

# float32 after two rounds, measured at most 1.1e-7 relative per node (BatchNorm and two Dropouts).
TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def dropout_net(seed=1):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Dropout(0.3), nn.Flatten(), nn.Linear(4 * 6 * 6, 8), nn.ReLU(), nn.Dropout(0.5),
                         nn.Linear(8, 10))


def train(engine_cls, cfg, rounds=2, first_node=3, counts=UNEQUAL):
    x, y, offsets = shards(counts)
    model = dropout_net()
    engine = engine_cls(model, x, y, offsets, first_node, cfg)
    main, history = flatten(model_tensors(model)), []
    for rnd in range(1, rounds + 1):
        vectors = torch.cat([c.params for c in engine.train(main, rnd)])
        history.append(vectors)
        main = vectors.mean(0)
    return history


@pytest.mark.parametrize("chunk", [1, 4, 0])
def test_batched_equals_sequential_with_dropout_at_any_chunk(chunk):
    ref, got = train(SequentialEngine, config()), train(BatchedEngine, config(chunk=chunk))
    for r, g in zip(ref, got):
        assert g.shape == r.shape and rel_diff(g, r) <= TOL


def test_the_masks_depend_on_the_node_and_the_round_not_the_block():
    """Nodes 3..8 trained as one block, or as two blocks as two ranks hold them: the same vectors (up to the
    rounding of another chunk cut; masks drawn by position in the block would differ by 1e-2 and more)."""
    whole = train(BatchedEngine, config())
    x, y, offsets = shards(UNEQUAL)
    parts = []
    for lo, hi in ((0, 2), (2, 6)):
        block = offsets[lo:hi + 1] - offsets[lo]
        engine = BatchedEngine(dropout_net(), x[offsets[lo]:offsets[hi]], y[offsets[lo]:offsets[hi]], block,
                               3 + lo, config())
        parts.append(torch.cat([c.params for c in engine.train(flatten(model_tensors(dropout_net())), 1)]))
    assert rel_diff(torch.cat(parts), whole[0]) <= 1e-6
    again = train(BatchedEngine, config(), rounds=1)  # the same run again: the same draws
    assert torch.equal(again[0], whole[0])


def test_draw_masks_scales_kept_units_and_leaves_padding_and_idle_nodes_at_one():
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    noise = draw_masks([("d", 0.25, (50,))], gens, torch.tensor([3, 0, 2]), 4, torch.zeros(1))["d"]
    assert noise.shape == (3, 4, 50)
    assert set(noise[0, :3].unique().tolist()) == {0.0, torch.tensor(1 / 0.75).item()}
    assert torch.equal(noise[0, 3:], torch.ones(1, 50)) and torch.equal(noise[1], torch.ones(4, 50))
    torch.manual_seed(3)
    expect = nn.functional.dropout(torch.ones(2, 50), 0.25, training=True)  # torch's own draw from the same seed
    assert torch.equal(noise[2, :2], expect)


def test_channel_and_alpha_dropout_are_refused_in_one_line():
    for module in (nn.Dropout2d(0.5), nn.AlphaDropout(0.5)):
        with pytest.raises(ConfigError, match=rf"with {type(module).__name__} .*engine: sequential"):
            check_stackable(nn.Sequential(nn.Conv2d(1, 2, 3), module))
    check_stackable(dropout_net())
    assert np.isfinite(train(BatchedEngine, config(), rounds=1)[0].numpy()).all()
