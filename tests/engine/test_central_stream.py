"""The centralized baseline streamed from the shard file in each epoch's order equals it on the whole block."""
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch
from shardfiles import make_valid

from fedmpi.data.shards import read_nodes, read_test
from fedmpi.data.shuffled import ShuffledRows
from fedmpi.engine.central import train_central
from fedmpi.engine.rows import Inputs
from fedmpi.errors import DataError

CPU = torch.device("cpu")
SHAPE = (1, 4, 4)


def cfg(epochs=3):
    return SimpleNamespace(model="2nn", model_args={}, loss="cross_entropy", seed=5, central_epochs=epochs,
                           batch_size=8, lr=0.05, momentum=0.9)


@pytest.mark.parametrize("chunk_rows", [5, 13, 1 << 16], ids=["below-a-batch", "across-batches", "one-chunk"])
def test_streamed_baseline_equals_the_baseline_on_every_shard_in_memory(tmp_path, chunk_rows):
    path = make_valid(tmp_path / "c.h5", nodes=5, per_node=9, shape=SHAPE, classes=3)
    whole = read_nodes(path, "train", 0, 5)
    tx, ty = read_test(path)
    test = (Inputs(torch.from_numpy(tx), 1 / 255), torch.from_numpy(ty))
    want = train_central(cfg(), Inputs(torch.from_numpy(whole.x), 1 / 255), torch.from_numpy(whole.y), *test,
                         SHAPE, 3)
    rows = ShuffledRows(path, 45, 3, 1 / 255, CPU, chunk_rows=chunk_rows)
    got = train_central(cfg(), rows, rows.labels, *test, SHAPE, 3)
    assert got == want and got["samples"] == 45 and len(set(got["test_loss"])) == 3


def test_a_bad_label_anywhere_in_the_file_is_refused_as_it_is_read(tmp_path):
    path = make_valid(tmp_path / "b.h5", nodes=5, per_node=9, shape=SHAPE, classes=3)
    with h5py.File(path, "r+") as f:
        y = f["train/y"][:]
        y[40] = 3
        f["train/y"][:] = y
    rows = ShuffledRows(path, 45, 3, 1 / 255, CPU)
    rows.epoch(torch.randperm(45, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(DataError, match=rf"shard file {path}: /train/y\[40\] = 3 is outside the classes \[0, 3\)"):
        rows[torch.from_numpy(rows.order[:8])]


def test_a_batch_out_of_the_epochs_order_is_refused(tmp_path):
    path = make_valid(tmp_path / "o.h5", nodes=2, per_node=9, shape=SHAPE)
    rows = ShuffledRows(path, 18, 3, 1 / 255, CPU)
    rows.epoch(torch.arange(18))
    assert torch.equal(rows[torch.arange(4)], Inputs(torch.from_numpy(read_nodes(path, "train", 0, 2).x), 1 / 255)[:4])
    with pytest.raises(DataError, match="not the next one of its epoch"):
        rows[torch.tensor(np.array([9, 10]))]
