"""The batched engine trains every node exactly as the sequential (reference) engine does."""
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fedmpi.config import Config, load_config, parse_overrides
from fedmpi.engine import make_engine
from fedmpi.engine.batched import BatchedEngine, parallel_in_order, split_rows
from fedmpi.engine.mlp import mlp_layers
from fedmpi.engine.models import build_model
from fedmpi.engine.params import flatten
from fedmpi.engine.plan import make_plan
from fedmpi.engine.sequential import SequentialEngine

# Unequal shards with batch 8: 37 and 13 end on a short batch, 64 has the most steps, 0 has none.
UNEQUAL = [37, 50, 13, 64, 0, 8]
EQUAL = [24, 24, 24, 24]
# float32, batched vs sequential after two rounds: measured 0.7-2.4e-7 (2nn and cnn, equal and unequal
# shards, chunks, FedProx), i.e. one or two float32 ulps; 1e-6 leaves a 4x margin. float64: 1.6-2.7e-16.
TOL = 1e-6
TOL64 = 3e-15
SHAPE = (1, 12, 12)  # small images keep the cnn's fc layer (and the test) small


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def shards(counts, seed=0):
    gen = torch.Generator().manual_seed(seed)
    total = sum(counts)
    x = torch.rand(total, *SHAPE, generator=gen)
    y = torch.randint(0, 10, (total,), generator=gen)
    return x, y, np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def config(chunk=0, epochs=2, prox_mu=0.0):
    # lr as in the tutorial: at 5x that, float32 rounding noise grows chaotically on random labels
    # within two rounds (the float64 test below shows the math itself agrees to 1e-15).
    return SimpleNamespace(seed=7, local_epochs=epochs, batch_size=8, lr=0.01, momentum=0.9, chunk_nodes=chunk,
                           prox_mu=prox_mu)


def rel_diff(a, b):
    """max |a - b| / max |b|: relative to the tensor's scale, so near-zero entries do not blow it up."""
    return float((a - b).abs().max() / b.abs().max())


def run_rounds(engine_cls, model_name, counts, cfg, rounds, first_node=3):
    """Train `rounds` FedAvg rounds (plain mean); returns every round's node params and the momentum."""
    x, y, offsets = shards(counts)
    model = build_model(model_name, SHAPE, 10, seed=1)
    engine = engine_cls(model, x, y, offsets, first_node, cfg)
    main, history = flatten(list(model.parameters())), []
    for rnd in range(1, rounds + 1):
        chunks = list(engine.train(main, rnd))
        assert [n for c in chunks for n in c.nodes] == list(range(first_node, first_node + len(counts)))
        params = torch.cat([c.params for c in chunks])
        history.append(params)
        main = params.mean(0)
    return history, engine.state()["momentum"].clone()


@pytest.mark.parametrize("model_name", ["2nn", "cnn"])
@pytest.mark.parametrize("counts", [EQUAL, UNEQUAL], ids=["equal", "unequal"])
def test_batched_equals_sequential_over_two_rounds(model_name, counts):
    cfg = config()
    ref, ref_mom = run_rounds(SequentialEngine, model_name, counts, cfg, rounds=2)
    got, got_mom = run_rounds(BatchedEngine, model_name, counts, cfg, rounds=2)
    for rnd, (r, g) in enumerate(zip(ref, got), 1):
        assert g.shape == r.shape
        assert rel_diff(g, r) <= TOL, f"round {rnd}"
    assert rel_diff(got_mom, ref_mom) <= TOL
    # Training moved every node with data, and the empty node kept the main model of its round.
    moved = (got[1] - got[0].mean(0)).abs().amax(1)
    assert all((moved[k] > 1e-3) == (n > 0) for k, n in enumerate(counts))


@pytest.mark.parametrize("model_name", ["2nn", "cnn"])
def test_in_float64_the_engines_agree_to_rounding(model_name):
    """Same math, not just close: in float64 only the summation order differs."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        ref, ref_mom = run_rounds(SequentialEngine, model_name, UNEQUAL, config(chunk=4), rounds=2)
        got, got_mom = run_rounds(BatchedEngine, model_name, UNEQUAL, config(chunk=4), rounds=2)
    finally:
        torch.set_default_dtype(previous)
    assert got[-1].dtype == torch.float64
    assert rel_diff(got[-1], ref[-1]) <= TOL64 and rel_diff(got_mom, ref_mom) <= TOL64


@pytest.mark.parametrize("model_name", ["2nn", "cnn"])
def test_chunks_smaller_than_the_node_count_give_the_same_result(model_name):
    whole, whole_mom = run_rounds(BatchedEngine, model_name, UNEQUAL, config(chunk=len(UNEQUAL)), rounds=2)
    for chunk in (1, 4):
        engine_chunks, mom = run_rounds(BatchedEngine, model_name, UNEQUAL, config(chunk=chunk), rounds=2)
        assert rel_diff(engine_chunks[-1], whole[-1]) <= TOL
        assert rel_diff(mom, whole_mom) <= TOL


def test_a_node_short_of_batches_skips_the_padded_steps():
    """A node with 1 batch per epoch next to one with 8 steps once per epoch, weight 1/size on its rows."""
    x, y, offsets = shards([5, 64])
    plan = make_plan(offsets, range(0, 2), 0, config(), 1, torch.device("cpu"), torch.float32)
    assert plan.idx.shape == (16, 2, 8)
    active = plan.active.numpy()
    assert active[:, 1].all() and active[[0, 8], 0].all() and active[:, 0].sum() == 2
    # Every node steps only where the short node has a batch: the first step of each epoch.
    assert plan.full.tolist() == [s in (0, 8) for s in range(16)]
    w = plan.weight.numpy()
    assert np.allclose(w[0, 0, :5], 1 / 5) and (w[0, 0, 5:] == 0).all() and (w[1, 0] == 0).all()
    # Padding points into the node's own rows, so gathered rows are always real images.
    assert ((plan.idx[:, 0] >= 0) & (plan.idx[:, 0] < 5)).all()


@pytest.mark.parametrize("model_name", ["2nn", "cnn"])
def test_a_zero_sample_node_last_in_a_chunk_keeps_the_main_model(model_name):
    """The empty node's offset is one past the last row: its padding must still index a real row."""
    counts = [37, 50, 0]
    ref, ref_mom = run_rounds(SequentialEngine, model_name, counts, config(chunk=3), rounds=2)
    got, got_mom = run_rounds(BatchedEngine, model_name, counts, config(chunk=3), rounds=2)
    assert rel_diff(got[-1], ref[-1]) <= TOL and rel_diff(got_mom, ref_mom) <= TOL
    assert torch.equal(got[1][2], got[0].mean(0)) and (got_mom[2] == 0).all()


def test_the_2nn_takes_the_hand_written_path_and_the_cnn_the_generic_one():
    assert mlp_layers(build_model("2nn", SHAPE, 10, 0)) is not None
    assert mlp_layers(build_model("cnn", SHAPE, 10, 0)) is None
    # A ReLU after the logits has no place in the hand-written backward: the generic path takes it.
    assert mlp_layers(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())) is None


def test_config_selects_the_engine_and_checks_chunk_nodes():
    x, y, offsets = shards(EQUAL)
    model = build_model("2nn", SHAPE, 10, 0)
    assert Config().engine == "batched"
    assert isinstance(make_engine(Config(engine="sequential"), model, x, y, offsets, 0), SequentialEngine)
    engine = make_engine(Config(chunk_nodes=3), model, x, y, offsets, 0)
    assert isinstance(engine, BatchedEngine) and engine.chunk == 3
    assert 1 <= make_engine(Config(), model, x, y, offsets, 0).chunk <= len(EQUAL)
    with pytest.raises(Exception, match="chunk_nodes"):
        Config(chunk_nodes=-1)


def train_subset(engine_cls, model_name, cfg, rows, rounds=2):
    """Rounds in which only the local nodes `rows` train (client sampling); returns params and momentum."""
    x, y, offsets = shards(UNEQUAL)
    model = build_model(model_name, SHAPE, 10, seed=1)
    engine = engine_cls(model, x, y, offsets, 0, cfg)
    main = flatten(list(model.parameters()))
    for rnd in range(1, rounds + 1):
        chunks = list(engine.train(main, rnd, rows))
        assert [n for c in chunks for n in c.nodes] == rows.tolist()
        params = torch.cat([c.params for c in chunks])
        main = params.mean(0)
    return params, engine.state()["momentum"].clone()


@pytest.mark.parametrize("model_name", ["2nn", "cnn"])
def test_fedprox_on_a_sampled_subset_is_the_same_in_both_engines(model_name):
    rows = np.array([0, 2, 3, 5])  # not contiguous: the batched engine gathers and writes back momentum
    ref, ref_mom = train_subset(SequentialEngine, model_name, config(chunk=3, prox_mu=0.5), rows)
    got, got_mom = train_subset(BatchedEngine, model_name, config(chunk=3, prox_mu=0.5), rows)
    assert rel_diff(got, ref) <= TOL and rel_diff(got_mom, ref_mom) <= TOL
    assert (got_mom[[1, 4]] == 0).all() and (got_mom[rows] != 0).any(1).all()  # unselected nodes untouched
    plain, _ = train_subset(BatchedEngine, model_name, config(chunk=3, prox_mu=0.0), rows)
    assert rel_diff(got, plain) > 1e-4  # the proximal term really acted


def test_split_rows_cuts_near_equal_parts_in_order_a_multiple_of_the_workers():
    rows = np.arange(100)
    for chunk, workers, count in ((17, 1, 6), (25, 1, 4), (25, 3, 6), (100, 2, 2), (7, 2, 16)):
        parts = split_rows(rows, chunk, workers)
        sizes = [len(p) for p in parts]
        assert len(parts) == count and max(sizes) <= chunk and max(sizes) - min(sizes) <= 1, (chunk, workers)
        assert np.concatenate(parts).tolist() == rows.tolist()
    assert [p.tolist() for p in split_rows(np.array([4]), 3, 2)] == [[4]]  # fewer rows than workers
    assert split_rows(np.array([], dtype=np.int64), 3, 2) == []


@pytest.mark.parametrize("model_name", ["2nn", "cnn"])
def test_worker_threads_give_exactly_the_single_thread_result(model_name):
    """Each chunk runs single-threaded on some worker: for the same chunks, the same bits. (The
    cnn's kernels give every worker thread its own module copy: functional_call swaps the
    module's parameters while it runs, so a shared one would mix the nodes of two chunks.)

    (6 nodes in chunks of 2 make 3 parts, a multiple of 3 workers; 4 sampled nodes in chunks of 1
    make 4 parts, a multiple of 2, so split_rows cuts them as for one worker.)"""
    one, one_mom = run_rounds(BatchedEngine, model_name, UNEQUAL, config(chunk=2), rounds=2)
    torch.set_num_threads(3)  # the engine takes its worker count from torch's threads
    three, three_mom = run_rounds(BatchedEngine, model_name, UNEQUAL, config(chunk=2), rounds=2)
    assert torch.get_num_threads() == 3  # restored after the parallel section
    assert torch.equal(three[-1], one[-1]) and torch.equal(three_mom, one_mom)
    rows = np.array([0, 2, 3, 5])
    torch.set_num_threads(1)
    one_sub, _ = train_subset(BatchedEngine, model_name, config(chunk=1), rows)
    torch.set_num_threads(2)
    assert torch.equal(train_subset(BatchedEngine, model_name, config(chunk=1), rows)[0], one_sub)


def test_parallel_in_order_yields_in_order_on_several_threads_and_raises_a_workers_error():
    """Items 0 and 1 of each three finish only after the next one has: with one thread that would
    never happen (the wait would time out), and the results must still come back in order."""
    threads, done = set(), [threading.Event() for _ in range(6)]

    def later_first(i):
        threads.add(threading.get_ident())
        if i % 3 != 2:
            assert done[i + 1].wait(timeout=120), f"item {i + 1} never ran beside item {i}"
        done[i].set()
        return i

    torch.set_num_threads(2)
    assert list(parallel_in_order(later_first, list(range(6)), 3)) == list(range(6))
    assert len(threads) == 3 and torch.get_num_threads() == 2

    def fails_on_three(i):
        if i == 3:
            raise ValueError("node 3 diverged")
        return i

    got = []
    with pytest.raises(ValueError, match="node 3"):
        for i in parallel_in_order(fails_on_three, list(range(6)), 2):
            got.append(i)
    assert got == [0, 1, 2] and torch.get_num_threads() == 2


@pytest.mark.parametrize("model_name", ["2nn", "cnn"])
def test_bf16_autocast_acts_in_both_engines_and_stays_near_float32(model_name):
    """bfloat16 matmuls move the result by a few % of the update (fp32's own noise is ~1e-7):
    far enough to show autocast acted, near enough to show the gradients are still right."""
    fp32, _ = run_rounds(BatchedEngine, model_name, UNEQUAL, config(chunk=4), rounds=2)
    step = (fp32[-1] - fp32[0].mean(0)).abs().max()
    for engine_cls in (SequentialEngine, BatchedEngine):
        cfg = config(chunk=4)
        cfg.autocast = "bf16"
        bf16, mom = run_rounds(engine_cls, model_name, UNEQUAL, cfg, rounds=2)
        assert bf16[-1].dtype == torch.float32 and mom.dtype == torch.float32  # master weights stay float32
        moved = float((bf16[-1] - fp32[-1]).abs().max() / step)
        assert 1e-3 < moved < 0.15, (engine_cls.__name__, moved)


def test_autocast_key_is_checked_and_its_values_survive_yaml(tmp_path):
    assert Config().autocast == "none" and Config(autocast="bf16").autocast == "bf16"
    with pytest.raises(Exception, match="autocast"):
        Config(autocast="fp8")
    # YAML 1.1 reads off/no as False: the values are none and bf16, which stay strings.
    for value in ("none", "bf16"):
        (tmp_path / "job.yaml").write_text(f"autocast: {value}\n")
        assert load_config(str(tmp_path / "job.yaml")).autocast == value
        assert load_config(None, parse_overrides([f"autocast={value}"])).autocast == value


def test_the_ranks_sharing_the_device_reach_the_chunk_budget(monkeypatch):
    import fedmpi.engine.batched as batched

    seen = []
    monkeypatch.setattr(batched, "auto_chunk", lambda *args: seen.append(args[4:]) or 2)
    x, y, offsets = shards(EQUAL)
    engine = make_engine(Config(), build_model("2nn", SHAPE, 10, 0), x, y, offsets, 0, 3)
    assert engine.chunk == 2 and seen == [(3,)]
