"""BatchNorm end to end under real `mpirun`: running statistics averaged or kept per node (`buffers:`), the
batched engine against the sequential one, model.pt and a resumed checkpoint."""
from __future__ import annotations

import pytest
import torch
from conftest import ROOT, SMALL, assert_world, fedmpi, read_metrics
from usercode import write_user_code

BN = ["model=usercode:batchnorm", "central_epochs=0", "rounds=3", "threads=1"]


def run(folder, name, small_data, ranks, *values, env=None):
    out = folder / name
    result = fedmpi(["run", "--set", *SMALL, small_data, *BN, *values, "--out", str(out)], ranks=ranks, cwd=folder,
                    env={"PYTHONPATH": str(ROOT), **(env or {})}, timeout=300)
    return out, result


def relative_difference(a, b) -> float:
    wa, wb = (torch.load(d / "model.pt", weights_only=True) for d in (a, b))
    keys = [k for k in wb if wb[k].is_floating_point()]
    num = sum(float((wa[k] - wb[k]).pow(2).sum()) for k in keys)
    return (num / sum(float(wb[k].pow(2).sum()) for k in keys)) ** 0.5


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_data):
    folder = write_user_code(tmp_path_factory.mktemp("bn"))
    done = {}
    for buffers, engine, ranks in (("average", "sequential", 1), ("average", "batched", 2),
                                   ("local", "sequential", 1), ("local", "batched", 2)):
        out, result = run(folder, f"{buffers}-{engine}-{ranks}", small_data, ranks, f"engine={engine}",
                          f"buffers={buffers}", "checkpoint_every=1")
        assert result.returncode == 0, result.stderr
        assert_world(out, ranks)
        done[buffers, engine] = out
    return folder, done


@pytest.mark.parametrize("buffers", ["average", "local"])
def test_batched_equals_sequential_with_batchnorm_under_mpirun(runs, buffers):
    _, done = runs
    assert relative_difference(done[buffers, "batched"], done[buffers, "sequential"]) <= 1e-5
    seq, bat = (read_metrics(done[buffers, e]) for e in ("sequential", "batched"))
    assert len(seq) == 3 and all(abs(a["test_acc"] - b["test_acc"]) <= 0.01 for a, b in zip(seq, bat))


def test_model_pt_holds_the_averaged_running_statistics(runs):
    _, done = runs
    state = torch.load(done["average", "batched"] / "model.pt", weights_only=True)
    assert state["2.running_mean"].shape == (8,) and state["2.running_var"].shape == (8,)
    assert state["2.running_mean"].abs().max() > 1e-3  # trained, not the initial zeros
    assert not torch.allclose(state["2.running_var"], torch.ones(8))
    # the Allreduce carried them: the payload is every float value of model.pt plus a short trailer (counts, votes)
    values = sum(v.numel() for v in state.values() if v.is_floating_point())
    trailer = read_metrics(done["average", "batched"])[-1]["payload_bytes"] - 4 * values
    assert 0 < trailer <= 64
    for engine in ("sequential", "batched"):  # an integer counter, kept by no node: 0 whatever the engine
        counted = torch.load(done["average", engine] / "model.pt", weights_only=True)["2.num_batches_tracked"]
        assert counted.dtype == torch.int64 and int(counted) == 0


def node_buffers(run_dir):
    """Every node's kept buffers from the last checkpoint: [nodes, running_mean 8 | running_var 8]."""
    blocks = [torch.load(run_dir / "checkpoint" / name, weights_only=True) for name in ("nodes-0-4.pt", "nodes-4-8.pt")]
    return torch.cat([b["buffers"] for b in blocks])


def test_local_buffers_stay_per_node_and_the_main_model_reports_their_mean(runs, small_data):
    folder, done = runs
    # FedAvgM moves the parameters by its velocity; the running statistics are still the plain mean
    fedavgm, result = run(folder, "local-fedavgm", small_data, 2, "engine=batched", "buffers=local",
                          "checkpoint_every=1", "server_opt=fedavgm")
    assert result.returncode == 0, result.stderr
    for out in (done["local", "batched"], fedavgm):
        buffers = node_buffers(out)
        assert buffers.shape == (8, 16) and (buffers - buffers.mean(0)).abs().max() > 1e-3  # each node its own
        state = torch.load(out / "model.pt", weights_only=True)
        main = torch.cat([state["2.running_mean"], state["2.running_var"]])
        assert torch.allclose(buffers.mean(0), main, atol=1e-6)


def test_a_resumed_run_with_local_buffers_gives_identical_results(runs, small_data):
    folder, done = runs
    crashed, result = run(folder, "crashed", small_data, 2, "engine=batched", "buffers=local", "checkpoint_every=1",
                          env={"FEDMPI_FAULT": "raise:rank=1:round=3"})
    assert result.returncode != 0 and (crashed / "checkpoint").is_dir()
    assert any(p.name.startswith("nodes-") for p in (crashed / "checkpoint").iterdir())  # the nodes' buffers
    resumed = fedmpi(["run", "--resume", str(crashed)], ranks=2, cwd=folder, timeout=300,
                     env={"PYTHONPATH": str(ROOT)})
    assert resumed.returncode == 0, resumed.stderr
    reference = done["local", "batched"]
    assert [r["test_acc"] for r in read_metrics(crashed)] == [r["test_acc"] for r in read_metrics(reference)]
    assert relative_difference(crashed, reference) == 0.0
