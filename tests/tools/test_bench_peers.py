"""tools/bench_peers.py end to end (fedmpi's lines under real mpirun), and its runner with stand-in contenders."""
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import MNIST_DIR, ROOT, mpi_env

sys.path.insert(0, str(ROOT / "tools"))
from peers import pacing, report, runner  # noqa: E402
from peers.contenders import Contender  # noqa: E402

# A contender that follows the pacing protocol: logs when each of its rounds starts, prints its record.
PACED = textwrap.dedent("""
    import json, sys, time
    sys.path.insert(0, {peers!r})
    from pacing import Pacer
    name, rounds, die_after = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    pacer = Pacer.from_env(announce=True)
    for k in range(1, rounds + 1):
        pacer.wait(k)
        with open({order!r}, "a") as f:
            f.write(f"{{k}} {{name}}\\n")
        if k > die_after:
            sys.exit(3)
        print(json.dumps(dict(round=k, seconds=0.5 * k, test_acc=0.1 * k)), flush=True)
    pacer.wait(rounds + 1)
""")


def test_pacer_announces_and_waits_for_go(tmp_path):
    p = pacing.Pacer(tmp_path, announce=True, idle_limit_s=30)
    pacing.write_int(tmp_path / "go", 2)
    p.wait(2)   # go already says 2: returns
    assert pacing.read_int(tmp_path / "ready") == 2
    (tmp_path / "go").write_text("garbage")
    assert pacing.read_int(tmp_path / "go") == 0 and pacing.read_int(tmp_path / "missing") == 0
    with pytest.raises(SystemExit, match="no go for round 3"):
        pacing.Pacer(tmp_path, announce=False, idle_limit_s=0.1).wait(3)
    pacing.Pacer(None, announce=True).wait(99)   # no control folder: no pacing


def test_runner_runs_rounds_one_at_a_time_in_schedule_order_and_survives_a_dying_contender(tmp_path):
    order = tmp_path / "order.txt"
    script = tmp_path / "paced.py"
    script.write_text(PACED.format(peers=str(ROOT / "tools" / "peers"), order=str(order)))
    lines = [Contender(name, "fake", "s", [sys.executable, str(script), name, "3", str(die)])
             for name, die in (("A", 9), ("B", 1), ("C", 9))]
    results = runner.run_all(lines, tmp_path / "work", "2nn", 3, (120.0, 120.0), say=lambda s: None)
    started = [tuple(line.split()) for line in order.read_text().splitlines()]
    expected = [(str(r), n) for r, n in report.schedule(["A", "B", "C"], 3) if n != "B" or r <= 2]
    assert started == expected
    by_name = {r["name"]: r for r in results}
    assert by_name["A"]["rounds"] == {k: dict(seconds=0.5 * k, test_acc=pytest.approx(0.1 * k)) for k in (1, 2, 3)}
    assert by_name["B"]["status"].startswith("stopped: exited with code 3") and list(by_name["B"]["rounds"]) == [1]
    assert by_name["C"]["status"] == "ok" and by_name["C"]["rss_sum_mib"] > 0 and by_name["C"]["processes"] >= 1


def test_tree_rss_counts_this_process_and_its_children():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        rss = runner.tree_rss(os.getpid())
        assert rss["processes"] >= 2 and rss["rss_sum_mib"] > rss["rss_max_mib"] > 0
    finally:
        child.kill()
        child.wait()


@pytest.mark.skipif(not (MNIST_DIR / "train-images-idx3-ubyte.gz").exists(), reason=f"no MNIST in {MNIST_DIR}")
def test_fedmpi_lines_end_to_end_without_peers(tmp_path):
    """`--quick --peers none`: fedmpi -n 2 and -n 1 on the tutorial's shard file, one round of one epoch."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "tools" / "bench_peers.py"), "--quick", "--peers", "none", "--rounds", "1",
           "--epochs", "1", "--data-dir", str(MNIST_DIR), "--work", str(tmp_path / "work"), "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=dict(os.environ, **mpi_env()))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = {line.split(" | ")[0][2:]: line for line in proc.stdout.splitlines() if line.startswith("| fedmpi")}
    assert {"fedmpi -n 2", "fedmpi -n 1"} <= set(rows)
    assert "| 1.00 |" in rows["fedmpi -n 2"]
    got = json.loads(out.read_text())
    lines = {c["name"]: c for c in got["models"]["2nn"]["contenders"]}
    n2, n1 = lines["fedmpi -n 2"], lines["fedmpi -n 1"]
    assert n2["status"] == n1["status"] == "ok"
    assert list(n2["rounds"]) == list(n1["rounds"]) == ["1"]
    # fedmpi's promise: the same accuracy at any rank count; one epoch from seed 0 lands well above chance.
    assert n2["rounds"]["1"]["test_acc"] == n1["rounds"]["1"]["test_acc"] > 0.12
    assert n2["rounds"]["1"]["seconds"] > 0 and n2["processes"] == n1["processes"] + 1   # one rank more
    assert Path(n2["log"]).exists() and "threads=1" in n2["command"] and "threads=2" in n1["command"]


def bench(*args, timeout=120):
    cmd = [sys.executable, str(ROOT / "tools" / "bench_peers.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def test_saved_run_prints_its_tables_again(tmp_path):
    con = [dict(name="fedmpi -n 2", peer="fedmpi", semantics="momentum kept; reshuffled",
                rounds={"1": dict(seconds=9.0, test_acc=0.86), "2": dict(seconds=4.0, test_acc=0.9)}, status="ok"),
           dict(name="pfl 2x1", peer="pfl", semantics="fresh optimizer; fixed order",
                rounds={"1": dict(seconds=9.0, test_acc=0.85), "2": dict(seconds=6.0, test_acc=0.9)}, status="ok")]
    saved = dict(machine=dict(cpu="Some CPU", cores=2), load_start=1.0, load_end=2.0,
                 models={"2nn": dict(rounds=2, epochs=10, contenders=con)})
    (tmp_path / "run.json").write_text(json.dumps(saved))
    proc = bench("--report", str(tmp_path / "run.json"))
    assert proc.returncode == 0, proc.stderr
    assert "| pfl 2x1 | fresh optimizer; fixed order | 6.00 (6.00-6.00, 1) | 0.67 |" in proc.stdout
    assert "fedmpi -n 2 is 1.50x as fast as pfl 2x1" in proc.stdout


@pytest.mark.parametrize("args, named", [(["--models", "3nn"], "'3nn'"), (["--peers", "tff"], "'tff'"),
                                         (["--pfl-layouts", "2by1"], "'2by1'"), (["--rounds", "0"], "--rounds"),
                                         (["--nodes", "0"], "--nodes")])
def test_bad_options_end_with_one_line_naming_them(args, named):
    proc = bench(*args)
    assert proc.returncode == 2 and named in proc.stderr.strip().splitlines()[-1]


def test_stopping_a_contender_also_ends_children_in_groups_of_their_own(tmp_path):
    """mpirun's ranks and torchrun's workers sit in process groups of their own: stop() must reach them."""
    script = tmp_path / "launcher.py"
    script.write_text(textwrap.dedent(f"""
        import signal, subprocess, sys
        sys.path.insert(0, {str(ROOT / "tools" / "peers")!r})
        from pacing import Pacer
        child = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                                  "signal.SIG_IGN); time.sleep(600)"], start_new_session=True)
        open({str(tmp_path / "child.pid")!r}, "w").write(str(child.pid))
        Pacer.from_env(announce=True).wait(1)
    """))
    r = runner.Running(Contender("L", "fake", "s", [sys.executable, str(script)]), tmp_path / "work", "2nn")
    assert r.wait_ready(1, 120)
    child = int((tmp_path / "child.pid").read_text())
    assert runner.descendants(r.proc.pid) == [child]
    r.stop(grace_s=2)
    assert r.proc.poll() is not None
    for _ in range(50):
        state = Path(f"/proc/{child}/stat").read_text().split()[2] if Path(f"/proc/{child}/stat").exists() else "gone"
        if state in ("gone", "Z"):
            break
        time.sleep(0.1)
    assert state in ("gone", "Z")


def test_bf16_line_sets_autocast_and_runs_apart_from_the_float32_line(tmp_path):
    """--bf16's fedmpi line: its own name and run directory, `autocast=bf16` among its --set values."""
    from peers.contenders import Workload, fedmpi
    w = Workload("2nn", 2, 1, tmp_path / "d.h5", tmp_path / "i.pt", tmp_path, tmp_path, "cpu")
    plain, bf16 = fedmpi(w, 2, 1), fedmpi(w, 2, 1, bf16=True)
    assert bf16.name == "fedmpi -n 2, autocast: bf16" and plain.name == "fedmpi -n 2"
    assert "autocast=bf16" in bf16.cmd and "autocast=bf16" not in plain.cmd
    assert bf16.run_dir != plain.run_dir and bf16.semantics == plain.semantics


def test_fedmpi_line_trains_the_workloads_node_count_and_leaves_paced_waits_to_the_runner(tmp_path):
    """--nodes reaches fedmpi's config; waiting for other contenders' rounds must not trip fedmpi's watchdog."""
    from peers.contenders import Workload, fedmpi
    w = Workload("cnn", 2, 1, tmp_path / "d.h5", tmp_path / "i.pt", tmp_path, tmp_path, "cpu", nodes=20)
    cmd = fedmpi(w, 2, 1).cmd
    assert "nodes=20" in cmd and "stall_timeout_s=0" in cmd
