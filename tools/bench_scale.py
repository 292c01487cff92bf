"""Per-round cost against the federation's size: 10^3 to 10^6 nodes, 100 of them trained per round.

    python tools/bench_scale.py [--sizes 1000,10000,100000,1000000] [--ranks 4] [--rounds 6] [--out DIR]
    python tools/bench_scale.py --tutorial [--sizes 10000]

For each size: `fedmpi prepare` of a synthetic file (synthetic_shape 1x8x8, 12 training and 2 local
test samples a node, iid), then `mpirun -n RANKS fedmpi run` with local_state reset, fraction
100/nodes, one local epoch, evaluation (the test set and the main model on every local split) and
nodes.csv only in the last round (eval_every, node_metrics_every). Each rank writes its peak RSS
(VmHWM) when it exits.

Printed per size (a Markdown table): prepare seconds and file size; setup seconds before round 1
(inside `fedmpi run`); the median over rounds 2..R-1 of the round time, of rank 0's split into
selection, training (slowest rank), waiting in and transferring the Allreduce, evaluation (none in
these rounds), gathering the summaries and recording the row (metrics files: the gap between rows),
and of all that is not training or waiting; peak RSS of the largest rank; bytes on the wire per
round; the last round (evaluation of every local split, nodes.csv) apart. The data of a run sits
on each rank's device, so no round reads data. --tutorial: the tutorial-sized line instead,
10,000 nodes of 450 MNIST-shaped (1x28x28) training and 90 local test samples, 100 trained a round,
with data_resident_bytes 0 (every round reads its nodes from the file; "read ms" is the wait for
them). Nothing here is a test: on a shared machine absolute times say little, the ratios between
sizes say more.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PER_ROUND = 100
COMMON = ["dataset=synthetic", "synthetic_shape=1x8x8", "samples_per_node=12", "test_per_node=2", "partition=iid",
          "seed=0"]
TUTORIAL = ["dataset=synthetic", "synthetic_shape=1x28x28", "samples_per_node=450", "test_per_node=90",
            "partition=iid", "seed=0"]
# Each rank records its peak resident memory at exit (VmHWM: ru_maxrss carries over fork+exec).
RANK = """
import atexit, os, runpy
def peak():
    kib = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
    rank = os.environ.get("PMI_RANK") or os.environ.get("OMPI_COMM_WORLD_RANK") or "0"
    with open(os.path.join(os.environ["FEDMPI_BENCH_RSS"], f"rss-{rank}"), "w") as f:
        f.write(str(kib))
atexit.register(peak)
runpy.run_module("fedmpi", run_name="__main__", alter_sys=True)
"""


def mpirun() -> str:
    beside = Path(sys.executable).parent / "mpirun"
    return str(beside) if beside.exists() else "mpirun"


def prepare(nodes: int, path: Path, common: list) -> dict:
    """`fedmpi prepare` of the size's file; seconds and bytes."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fedmpi", "prepare", "--set", *common, f"nodes={nodes}",
                    f"data_file={path}"], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return dict(prepare_s=time.perf_counter() - t0, file_bytes=path.stat().st_size)


def run(nodes: int, path: Path, out: Path, ranks: int, rounds: int, common: list, extra: list) -> dict:
    """One job; its metrics rows and every rank's peak RSS in MiB."""
    rss = out / "rss"
    rss.mkdir(parents=True, exist_ok=True)
    args = ["run", "--set", *common, *extra, f"nodes={nodes}", f"data_file={path}", f"fraction={PER_ROUND / nodes}",
            f"rounds={rounds}", "local_state=reset", "local_epochs=1", "batch_size=10", "central_epochs=0",
            f"eval_every={rounds}", f"node_metrics_every={rounds}", "threads=1", "--out", str(out / "run"),
            "--overwrite"]
    env = dict(os.environ, FEDMPI_BENCH_RSS=str(rss), PYTHONPATH=str(ROOT))
    t0 = time.perf_counter()
    subprocess.run([mpirun(), "-n", str(ranks), sys.executable, "-c", RANK, *args], check=True, cwd=ROOT, env=env,
                   stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return dict(rows=rows, wall_s=time.perf_counter() - t0,
                rss_mib=[int((rss / f"rss-{r}").read_text()) / 1024 for r in range(ranks)])


def split(rows: list[dict]) -> dict:
    """Medians over the middle rounds (not the first, which warms up, nor the last, which scores every node)."""
    middle = range(1, len(rows) - 1)
    record = [rows[i + 1]["t_elapsed"] - rows[i + 1]["t_round"] - rows[i]["t_elapsed"] for i in middle]
    med = {k: statistics.median(rows[i][k] for i in middle)
           for k in ("t_round", "t_select", "t_train_max", "t_wait", "t_allreduce", "t_eval", "t_gather")}
    med["t_read"] = statistics.median(rows[i].get("t_read", 0.0) for i in middle)
    med["t_record"] = statistics.median(record)
    med["outside"] = statistics.median(rows[i]["t_select"] + rows[i].get("t_read", 0.0) + rows[i]["t_allreduce"]
                                       + rows[i]["t_eval"]
                                       + rows[i]["t_gather"] + r for i, r in zip(middle, record))
    return med


def table(results: list[dict], ranks: int) -> str:
    lines = [f"| nodes | prepare s | file MiB | setup s | round s | select ms | read ms | train s | wait s | "
             f"allreduce ms | eval ms | gather ms | record ms | outside training ms | last round s | "
             f"peak RSS MiB (max of {ranks}) | wire B/round |", "|" + "---|" * 17]
    for r in results:
        m, first, last = r["split"], r["rows"][0], r["rows"][-1]
        lines.append(f"| {r['nodes']:,} | {r['prepare_s']:.1f} | {r['file_bytes'] / 2**20:.0f} | "
                     f"{first['t_elapsed'] - first['t_round']:.1f} | {m['t_round']:.3f} | {m['t_select'] * 1e3:.2f} | "
                     f"{m['t_read'] * 1e3:.1f} | "
                     f"{m['t_train_max']:.3f} | {m['t_wait']:.3f} | {m['t_allreduce'] * 1e3:.1f} | "
                     f"{m['t_eval'] * 1e3:.1f} | {m['t_gather'] * 1e3:.2f} | {m['t_record'] * 1e3:.1f} | "
                     f"{m['outside'] * 1e3:.1f} | {last['t_round']:.2f} | {max(r['rss_mib']):.0f} | "
                     f"{first['wire_bytes_est']:,} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1000,10000,100000,1000000")
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--rounds", type=int, default=6, help="at least 3: the middle rounds are timed")
    p.add_argument("--out", type=Path, default=Path("runs/bench_scale"))
    p.add_argument("--tutorial", action="store_true", help="10,000 nodes x 450 MNIST-shaped samples, read per round")
    args = p.parse_args()
    if args.tutorial and args.sizes == p.get_default("sizes"):
        args.sizes = "10000"
    common, extra = (TUTORIAL, ["data_resident_bytes=0"]) if args.tutorial else (COMMON, [])
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for nodes in (int(v) for v in args.sizes.split(",")):
        path = args.out / f"scale-{nodes}.h5"
        path.unlink(missing_ok=True)
        made = prepare(nodes, path, common)
        result = dict(nodes=nodes, **made, **run(nodes, path, args.out / f"n{nodes}", args.ranks, args.rounds,
                                                 common, extra))
        result["split"] = split(result["rows"])
        results.append(result)
        path.unlink()  # a million nodes' file is about a GiB
        print(json.dumps({k: v for k, v in result.items() if k != "rows"}), flush=True)
    print(f"\n$ python tools/bench_scale.py {'--tutorial ' if args.tutorial else ''}--sizes {args.sizes} "
          f"--ranks {args.ranks} --rounds {args.rounds}; "
          f"load average at the end {os.getloadavg()[0]:.1f}\n")
    print(table(results, args.ranks))


if __name__ == "__main__":
    main()
