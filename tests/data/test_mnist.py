"""The tutorial's data on the real MNIST in ../shared/data/mnist (skipped, with the reason, when absent)."""
import numpy as np
import pytest
from conftest import MNIST_DIR, fedmpi, read_metrics

from fedmpi.data.shards import read_attrs, read_nodes

pytestmark = pytest.mark.skipif(not (MNIST_DIR / "train-images-idx3-ubyte.gz").exists(),
                                reason=f"real MNIST not found in {MNIST_DIR}")


def test_tutorial_split_and_three_short_rounds_on_real_mnist(tmp_path):
    data = tmp_path / "mnist.h5"
    result = fedmpi(["run", "--config", "jobs/mnist_iid.yaml", "--data-dir", str(MNIST_DIR), "--set",
                     f"data_file={data}", "rounds=3", "local_epochs=2", "central_epochs=1",
                     "--out", str(tmp_path / "run")], ranks=2, timeout=300)
    assert result.returncode == 0, result.stderr
    attrs = read_attrs(data)
    assert (attrs["num_nodes"], attrs["samples_per_node"], attrs["input_shape"]) == (100, 450, [1, 28, 28])
    shards = read_nodes(data, "train", 0, 100)
    assert np.all(shards.counts == 450)
    for node in (0, 57, 99):
        assert np.bincount(shards.node(node)[1], minlength=10).tolist() == [45] * 10
    assert len(np.unique(shards.x.reshape(45000, -1), axis=0)) > 44_000  # distinct images, not repeats
    rows = read_metrics(tmp_path / "run")
    acc = [r["test_acc"] for r in rows]
    # Three short rounds (2 local epochs each) climb steadily towards the centralized model,
    # which after one epoch over all 45,000 images is already far ahead (measured 0.51, 0.67, 0.79; 0.94).
    assert acc[0] < acc[1] < acc[2] and acc[2] >= 0.7
    assert rows[-1]["central_acc"] >= 0.92 and rows[-1]["central_acc"] > acc[2]
    assert all(r["payload_bytes"] == 4 * 199_210 + 12 for r in rows)
