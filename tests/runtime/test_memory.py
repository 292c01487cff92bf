"""The memory estimates against hand-computed numbers, and against what prepare really allocates."""
import dataclasses
import tracemalloc

import pytest
from conftest import MNIST_DIR

from fedmpi.config import Config
from fedmpi.data.prepare import prepare
from fedmpi.errors import ConfigError
from fedmpi.runtime import memory
from fedmpi.runtime.memory import RankRows, Report, Work

ROWS = RankRows(nodes=50, train=22500, local=4500, max_train=450, max_local=90, test=10000, central=45000)
WORK = Work(pixels=784, params=199210, activations=1000, chunk=16, workers=2, batch_size=32, local_epochs=10,
            pixel_bytes=1)


def test_human_sizes():
    assert [memory.human(n) for n in (0, 512, 1024, 1.5 * 2**30, 437 * 2**40, 2**62)] == [
        "0 B", "512 B", "1.0 KiB", "1.5 GiB", "437.0 TiB", "4.0 EiB"]


def test_prepare_peak_by_hand():
    mib = 1 << 20  # prepare's own bookkeeping
    # synthetic: 100,000 images and labels held, while one block of 65,536 is drawn through float64 (16 B a pixel)
    assert memory.prepare_peak("synthetic", 100, 1000, 100)[0] == mib + 100_000 * (784 + 8) + 65_536 * 16 * 784
    # synthetic_shape 1x8x8, a million nodes of 12 + 2 (a 1 GB file, streamed): the raw images, 16 B of
    # partition indices a row and one gathered block of 65,536 rows
    rows = 10**6 * 14
    assert (memory.prepare_peak("synthetic", 10**6, 12, 2, 64)[0]
            == mib + (12 * 10**6 + 1000) * 72 + rows * 16 + 65_536 * 104)
    # below the streaming threshold (256 MiB of file), the gathered rows and the file's image in memory
    rows = 10**5 * 14
    assert (memory.prepare_peak("synthetic", 10**5, 12, 2, 64)[0]
            == mib + (12 * 10**5 + 1000) * 72 + rows * 104 + (rows + 1000) * 72 * 9 // 8)
    # mnist: 70,000 raw images and labels, then 100 x (450 + 90) gathered rows of 784 + 40 B, then the
    # file's image: those rows and the 10,000 test images once more, 784 + 8 B each, and an eighth of slack
    assert (memory.prepare_peak("mnist", 100, 450, 90)[0] == mib + 70_000 * 792 + 54_000 * 824 + 64_000 * 792 * 9 // 8
            == mib + 156_960_000)
    assert memory.prepare_peak("cifar10", 10, 100, 0)[0] == mib + 60_000 * 3080 + 1000 * 3112 + 11_000 * 3080 * 9 // 8
    # many local test rows on a real dataset, streamed: the partition's indices dominate
    rows = 10**4 * (10**6 + 6)
    assert (memory.prepare_peak("fashion-mnist", 10**4, 6, 10**6)[0]
            == mib + 70_000 * 792 + rows * 16 + 65_536 * 824)
    # the tutorial-sized 10,000 x 450 MNIST file (4 GB): 11.9 GiB in memory before, now the raw set and indices
    assert memory.prepare_peak("mnist", 10**4, 450, 90)[0] < 200 << 20
    peak, how = memory.prepare_peak("synthetic", 10**6, 10**6, 0)
    assert peak == mib + 10**12 * 792 + 1000 * 792 + 10**12 * 16 + 65_536 * 824
    assert "1,000,000,000,000 synthetic images" in how


@pytest.mark.parametrize("partition", ["balanced", "dirichlet"])
def test_the_prepare_estimate_covers_what_prepare_allocates(tmp_path, partition):
    cfg = Config(dataset="synthetic", partition=partition, nodes=50, samples_per_node=400, test_per_node=40,
                 data_file=str(tmp_path / "s.h5"))
    tracemalloc.start()
    try:
        prepare(cfg)
        measured = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    estimate = memory.prepare_peak("synthetic", 50, 400, 40)[0]
    assert measured <= estimate <= 1.25 * measured, (measured, estimate)


@pytest.mark.skipif(not (MNIST_DIR / "train-images-idx3-ubyte.gz").exists(), reason="MNIST not in ../shared/data")
def test_the_prepare_estimate_covers_what_prepare_allocates_on_mnist(tmp_path):
    cfg = Config(dataset="mnist", data_dir=str(MNIST_DIR), nodes=100, samples_per_node=450, test_per_node=90,
                 data_file=str(tmp_path / "m.h5"))
    tracemalloc.start()
    try:
        prepare(cfg)
        measured = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    estimate = memory.prepare_peak("mnist", 100, 450, 90)[0]
    assert measured <= estimate <= 1.25 * measured, (measured, estimate)


def test_a_chunks_working_set_by_hand():
    training = 16 * (4 * 199210 * 4 + 32 * 1000)         # params, grads, momentum, result; batch activations
    plan = 16 * 10 * 480 * 21                             # 10 epochs of ceil(450/32) = 15 batches of 32 slots
    scoring = 16 * 90 * (784 * 4 + 500)                   # local test rows gathered, forward activations
    assert memory.chunk_bytes(ROWS, WORK) == training + plan + scoring == 58_358_400


def test_a_ranks_parts_and_peak_by_hand_on_a_cpu():
    parts = memory.rank_parts(ROWS, WORK, gpu=False)
    row = 784 + 8  # the uint8 image as read (float32 only per gathered batch), int64 label
    assert parts == {"training rows": 22500 * row, "local test rows": 4500 * row, "test set": 10000 * row,
                     "momentum": 50 * 199210 * 4, "chunk working set": 2 * 58_358_400,
                     "centralized baseline": 45000 * row + 4 * 199210 * 4}
    # the baseline's copy of every shard is freed before the chunks are trained: the larger of the two counts
    assert memory.peak(parts) == 17_820_000 + 3_564_000 + 7_920_000 + 39_842_000 + 116_716_800
    floats = memory.rank_parts(ROWS, Work(**{**WORK.__dict__, "pixel_bytes": 4}), gpu=False)
    assert floats["training rows"] == 22500 * (784 * 4 + 8)  # a float32 file's rows, as they are


def test_a_stateless_rank_holds_no_momentum():
    """local_state reset, or momentum 0: no [nodes, P] buffer; the chunks' own buffers stay counted."""
    stateless = Work(**{**WORK.__dict__, "node_state": 0})
    parts = memory.rank_parts(ROWS, stateless, gpu=False)
    assert parts["momentum"] == 0 and parts["chunk working set"] == 2 * 58_358_400
    assert memory.peak(memory.rank_parts(ROWS, WORK, gpu=False)) - memory.peak(parts) == 50 * 199210 * 4


def test_on_a_gpu_the_images_are_uint8_there_and_on_the_host():
    parts = memory.rank_parts(ROWS, WORK, gpu=True)
    assert parts["training rows"] == 22500 * (784 + 8)
    assert memory.host_staging(ROWS, WORK) == (22500 + 4500 + 10000 + 45000) * (784 + 8)


def report(rank, host, need, free, device="cpu", device_free=None, staging=0):
    return Report(rank, host, device, {"training rows": need, "local test rows": 0, "test set": 0, "momentum": 0,
                                       "chunk working set": 0, "centralized baseline": 0}, free, device_free, staging)


def test_ranks_on_one_host_add_up_and_other_hosts_do_not():
    gib = 1 << 30
    assert memory.refusal([report(0, "a", 3 * gib, 10 * gib), report(1, "a", 3 * gib, 10 * gib),
                           report(2, "b", 9 * gib, 10 * gib)]) is None
    message = memory.refusal([report(0, "a", 3 * gib, 10 * gib), report(1, "a", 8 * gib, 10 * gib)])
    assert message == ("config needs about 11.0 GiB on host a (2 ranks; rank 1: training rows 8.0 GiB), which has "
                       "10.0 GiB available; lower samples_per_node, or spread the nodes over more hosts")
    assert memory.refusal([report(0, "a", 3 * gib, None)]) is None  # unknown: not checked


def test_ranks_sharing_a_gpu_add_up_on_it_and_stage_on_the_host():
    gib = 1 << 30
    gpu = [report(r, "a", 5 * gib, 64 * gib, "cuda:0", 12 * gib, staging=gib) for r in range(2)]
    assert memory.refusal(gpu) is None  # 10 of 12 GiB on the GPU, 2 of 64 on the host
    three = gpu + [report(2, "a", 5 * gib, 64 * gib, "cuda:0", 12 * gib, staging=gib)]
    assert "15.0 GiB on cuda:0 of host a (3 ranks" in memory.refusal(three)
    staged = [report(r, "a", gib, 2 * gib, "cuda:0", 80 * gib, staging=gib) for r in range(3)]
    assert "3.0 GiB on host a (3 ranks; rank 0: shard rows as read 1.0 GiB)" in memory.refusal(staged)


def test_meminfo_and_cgroup_limits_from_their_files(tmp_path):
    (tmp_path / "meminfo").write_text("MemTotal: 100 kB\nMemAvailable:   2048 kB\n")
    assert memory.meminfo_available(tmp_path / "meminfo") == 2048 * 1024
    assert memory.meminfo_available(tmp_path / "absent") is None
    proc = tmp_path / "cgroup"
    root = tmp_path / "sys"
    (root / "job" / "step").mkdir(parents=True)
    proc.write_text("0::/job/step\n")
    (root / "job" / "step" / "memory.max").write_text("max\n")
    (root / "job" / "step" / "memory.current").write_text("100\n")
    (root / "job" / "memory.max").write_text("1000000\n")
    (root / "job" / "memory.current").write_text("400000\n")
    (root / "job" / "memory.stat").write_text("anon 300000\ninactive_file 100000\n")
    assert memory.cgroup_room(proc, root) == 1000000 - (400000 - 100000)
    v1 = root / "memory" / "a"
    v1.mkdir(parents=True)
    proc.write_text("4:memory:/a\n0::/\n")
    (v1 / "memory.limit_in_bytes").write_text(f"{2**63 - 4096}\n")  # no limit
    (v1 / "memory.usage_in_bytes").write_text("5000\n")
    assert memory.cgroup_room(proc, root) is None
    (v1 / "memory.limit_in_bytes").write_text("8000\n")
    (v1 / "memory.stat").write_text("total_inactive_file 1000\n")
    assert memory.cgroup_room(proc, root) == 8000 - 4000
    proc.write_text("garbage\n")
    assert memory.cgroup_room(proc, root) is None


def test_prepare_refuses_what_cannot_fit_with_the_estimate(monkeypatch):
    monkeypatch.setattr(memory, "host_available", lambda: 1 << 20)
    with pytest.raises(ConfigError) as caught:
        memory.check_prepare("synthetic", 100, 1000, 0)
    assert str(caught.value) == (
        "config needs about 860.5 MiB to prepare the shard file (nodes x samples_per_node = 100,000 synthetic images "
        "of 784 px, drawn 65,536 at a time in float64 at 12,544 B each), this machine has 1.0 MiB available; lower "
        "nodes or samples_per_node")
    monkeypatch.setattr(memory, "host_available", lambda: None)
    memory.check_prepare("synthetic", 100, 1000, 0)  # unknown: not refused


def test_scaffold_adds_its_control_variates_by_hand():
    work = Work(pixels=784, params=199210, activations=1000, chunk=16, workers=2, batch_size=32, local_epochs=10,
                control=True, pixel_bytes=1)
    parts = memory.rank_parts(ROWS, work, gpu=False)
    assert parts["control variates"] == (50 + 3) * 199210 * 4  # c_i of 50 nodes, c, the deltas and their sum
    assert parts["chunk working set"] == 2 * (58_358_400 + 3 * 16 * 199210 * 4)
    # the larger chunks (193,213,440 B) outweigh the baseline (38,827,360 B) in the peak
    assert memory.peak(parts) == 17_820_000 + 3_564_000 + 7_920_000 + 39_842_000 + 42_232_520 + 193_213_440


def test_ditto_and_personal_layers_add_their_per_node_state_by_hand():
    base = Work(pixels=784, params=199210, activations=1000, chunk=16, workers=2, batch_size=32, local_epochs=10)
    plain = memory.rank_parts(ROWS, base, gpu=False)
    ditto = memory.rank_parts(ROWS, dataclasses.replace(base, personal=True), gpu=False)
    assert ditto["personal models"] == 50 * 199210 * 4  # v_k of the rank's 50 nodes
    assert ditto["chunk working set"] == plain["chunk working set"] + 2 * 2 * 16 * 199210 * 4  # start, momentum
    layers = memory.rank_parts(ROWS, dataclasses.replace(base, own_layers=2010), gpu=False)
    assert layers["personal layers"] == 50 * 2010 * 4 and "personal models" not in layers
    assert "personal layers" not in plain and "personal models" not in plain
