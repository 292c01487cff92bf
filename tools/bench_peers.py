"""Benchmark: the tutorial round in fedmpi, pfl-research and Flower, interleaved on one machine.

    python tools/bench_peers.py [--rounds N] [--quick] [--peers pfl,flwr|none] [--models 2nn,cnn]
                                [--nodes N] [--device cpu|cuda] [--bf16] [--data-dir DIR] [--json OUT]

Workload: 100 nodes x 450 MNIST training images (45 per digit) from fedmpi's own shard file, so every
contender trains the same partition from the same initial weights; SGD lr 0.01 momentum 0.9, batch 32;
the main model the plain mean of the node models, scored on the 10,000 test images after each round.
The 2nn (784-200-200-10) runs 10 local epochs per round; McMahan et al.'s CNN (`model: cnn`) runs
--cnn-epochs (default 1) so that a round stays affordable on 2 CPU cores.

Contenders: fedmpi's CLI under mpirun (-n 2 x 1 thread, -n 1 x 2 threads, and -n 2 with `local_state:
reset` when fedmpi's Config has that key; with --bf16 also -n 2 with `autocast: bf16`), pfl-research
0.6.0 and Flower 1.42.0, each peer in its own virtual environment made on first use (tools/peers/venvs.py),
each in the layouts of --pfl-layouts and --flwr-layouts. All start at once; then the rounds run one
contender at a time, A B C D in odd rounds and D C B A in even ones (tools/peers/pacing.py), so a slow
spell of the shared machine hits all of them. s/round is the median over rounds 2+; ratios are medians
of per-round pairs with fedmpi -n 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import signal
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from peers import contenders, report, runner, venvs  # noqa: E402

import fedmpi  # noqa: E402
from fedmpi.config import Config, load_config  # noqa: E402
from fedmpi.data.prepare import prepare  # noqa: E402
from fedmpi.engine.models import build_model  # noqa: E402
from fedmpi.runtime.device import host_cores  # noqa: E402

DEFAULT_DATA = HERE.parents[1] / "shared" / "data" / "mnist"  # ../shared beside the checkout
REF = "fedmpi -n 2"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=None, help="rounds of the 2nn (default 5; --quick 2)")
    p.add_argument("--cnn-rounds", type=int, default=None, help="rounds of the cnn (default 3; --quick 2)")
    p.add_argument("--epochs", type=int, default=None, help="local epochs of the 2nn (default 10; --quick 2)")
    p.add_argument("--cnn-epochs", type=int, default=1, help="local epochs of the cnn (default 1)")
    p.add_argument("--quick", action="store_true",
                   help="2 rounds of 2 epochs, the 2nn only, peers in layout 2x1 only: a few minutes")
    p.add_argument("--peers", default="pfl,flwr", help="comma list of pfl, flwr; or none (fedmpi only)")
    p.add_argument("--models", default=None, help="comma list of 2nn, cnn (default both; --quick 2nn)")
    p.add_argument("--pfl-layouts", default=None, help="pfl PROCESSESxTHREADS list (default 1x1,1x2,2x1)")
    p.add_argument("--flwr-layouts", default=None, help="Flower WORKERSxCPUS list (default 2x1,1x2)")
    p.add_argument("--nodes", type=int, default=100, help="nodes of 450 images each (default 100, the tutorial's)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--bf16", action="store_true", help="add fedmpi -n 2 with autocast: bf16 (bfloat16 matmuls)")
    p.add_argument("--data-dir", type=Path, default=Path(os.environ.get("FEDMPI_DATA", DEFAULT_DATA)),
                   help="MNIST IDX files (default $FEDMPI_DATA, else ../shared/data/mnist beside the checkout)")
    p.add_argument("--work", type=Path, default=Path("/tmp/fedmpi-bench-peers"), help="shard file, runs, logs")
    p.add_argument("--venvs", type=Path, default=venvs.DEFAULT_ROOT, help="where the peers' environments live")
    p.add_argument("--round-timeout", type=float, default=3600, help="seconds one round may take before it is stopped")
    p.add_argument("--json", type=Path, default=None, help="write every record and the tables' inputs here")
    p.add_argument("--report", type=Path, default=None, metavar="JSON", help="print the tables of a saved --json file")
    args = p.parse_args(argv)
    q = args.quick
    pick = lambda given, quick, full: given if given is not None else (quick if q else full)  # noqa: E731
    args.rounds, args.cnn_rounds = pick(args.rounds, 2, 5), pick(args.cnn_rounds, 2, 3)
    args.epochs = pick(args.epochs, 2, 10)
    args.models = (args.models or ("2nn" if q else "2nn,cnn")).split(",")
    args.peers = [] if args.peers == "none" else args.peers.split(",")
    args.pfl_layouts = (args.pfl_layouts or ("2x1" if q else "1x1,1x2,2x1")).split(",")
    args.flwr_layouts = (args.flwr_layouts or ("2x1" if q else "2x1,1x2")).split(",")
    unknown = [m for m in args.models if m not in ("2nn", "cnn")] + [x for x in args.peers if x not in ("pfl", "flwr")]
    for bad in unknown:
        p.error(f"unknown model or peer {bad!r} (models: 2nn, cnn; peers: pfl, flwr, none)")
    for text in args.pfl_layouts + args.flwr_layouts:
        try:
            contenders.layout(text)
        except ValueError as err:
            p.error(str(err))
    if min(args.rounds, args.cnn_rounds, args.epochs, args.cnn_epochs, args.nodes) < 1:
        p.error("--rounds, --cnn-rounds, --epochs, --cnn-epochs and --nodes must be >= 1")
    return args


def machine() -> dict:
    """CPU model, cores, memory and versions, for the table's caption."""
    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return dict(cpu=model, cores=host_cores(), gpu=gpu, python=platform.python_version(), torch=torch.__version__,
                fedmpi=fedmpi.__version__, host=platform.node())


def has_local_state() -> bool:
    """Whether this fedmpi has the `local_state` key (a fresh local optimizer each round with `reset`)."""
    return "local_state" in {f.name for f in dataclasses.fields(Config)}


def shard_file(args) -> Path:
    """The tutorial's shard file, written once by fedmpi's own prepare step (jobs/mnist_iid.yaml)."""
    cfg = load_config(str(HERE.parent / "jobs" / "mnist_iid.yaml"),
                      dict(data_dir=str(args.data_dir), nodes=args.nodes,
                           data_file=str(args.work / f"mnist-balanced-{args.nodes}x450-seed0.h5")))
    return prepare(cfg)


def workload(args, model: str, data_file: Path) -> contenders.Workload:
    """Settings of one model's block, and its initial weights (fedmpi's, from seed 0) written for the peers."""
    init = args.work / f"init-{model}.pt"
    torch.save(build_model(model, (1, 28, 28), 10, 0).state_dict(), init)
    rounds, epochs = (args.rounds, args.epochs) if model == "2nn" else (args.cnn_rounds, args.cnn_epochs)
    return contenders.Workload(model, rounds, epochs, data_file, init, args.data_dir, args.work, args.device,
                               args.nodes)


def lineup(args, w: contenders.Workload, pythons: dict, best: dict) -> list[contenders.Contender]:
    """fedmpi's lines, then each peer's layouts (the cnn: only each peer's fastest 2nn layout of this run)."""
    out = [contenders.fedmpi(w, 2, 1), contenders.fedmpi(w, 1, 2)]
    if has_local_state():
        out.append(contenders.fedmpi(w, 2, 1, reset=True))
    if args.bf16:
        out.append(contenders.fedmpi(w, 2, 1, bf16=True))
    for peer, layouts in (("pfl", args.pfl_layouts), ("flwr", args.flwr_layouts)):
        if peer not in pythons:
            continue
        for text in ([best[peer]] if w.model == "cnn" and peer in best else layouts):
            procs, threads = contenders.layout(text)
            if peer == "pfl":
                out.append(contenders.pfl(w, pythons[peer], procs, threads))
            else:
                try:
                    out.append(contenders.flwr(w, pythons[peer], procs, threads, host_cores()))
                except ValueError as err:
                    print(f"flwr: layout left out: {err}")
    return out


def block(args, w: contenders.Workload, pythons: dict, best: dict) -> list[dict]:
    """One model: run every contender interleaved, print the table; returns the results."""
    lines = lineup(args, w, pythons, best)
    print(f"\n## {w.model}: {w.rounds} round(s) of {w.epochs} local epoch(s), {len(lines)} contenders, device "
          f"{w.device}; order per round: {', '.join(c.name for c in lines)} (reversed in even rounds)", flush=True)
    results = runner.run_all(lines, args.work, w.model, w.rounds, (1800.0, args.round_timeout),
                             say=lambda s: print(s, flush=True))
    print_tables(results)
    return results


def print_tables(results: list[dict]) -> None:
    """The table, the speed-ups and accuracy gaps, and what each line's semantics are."""
    print("\n" + report.table(results, REF) + "\n")
    reset = "fedmpi -n 2, local_state: reset"
    acc_ref = reset if any(c["name"] == reset for c in results) else REF
    for line in report.summary_lines(results, REF, acc_ref):
        print(line)
    shown = {"fedmpi"} | {c["peer"] for c in results} | ({"fedmpi reset"} if acc_ref == reset else set())
    legend = [f"- {text}" for key, (_, text) in contenders.SEMANTICS.items() if key in shown]
    print("\nSemantics:\n" + "\n".join(legend))


def reprint(path: Path) -> int:
    """--report: the tables of a saved run (its JSON keeps every per-round record)."""
    saved = json.loads(path.read_text())
    print(f"{path}: {saved['machine']['cpu']}, {saved['machine']['cores']} cores; load average "
          f"{saved['load_start']:.1f} at start, {saved['load_end']:.1f} at end")
    for model, block_ in saved["models"].items():
        print(f"\n## {model}: {block_['rounds']} round(s) of {block_['epochs']} local epoch(s)")
        for c in block_["contenders"]:
            c["rounds"] = {int(k): v for k, v in c["rounds"].items()}
        print_tables(block_["contenders"])
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report:
        return reprint(args.report)
    args.work.mkdir(parents=True, exist_ok=True)
    # A benchmark stopped by a signal still stops its contenders (run_all's finally): SIGTERM and SIGHUP
    # exit through Python, and SIGINT interrupts even where a background shell had it ignored.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    info = machine()
    load0 = os.getloadavg()[0]
    print(f"$ python tools/bench_peers.py {' '.join(sys.argv[1:] if argv is None else argv)}\n"
          f"{datetime.datetime.now().isoformat(timespec='minutes')}; {info['cpu']}, {info['cores']} cores; "
          f"fedmpi {info['fedmpi']}, torch {info['torch']}, python {info['python']}; load average at start "
          f"{load0:.1f}", flush=True)
    print("fedmpi's like-for-like line (`local_state: reset`, a fresh local optimizer each round) is "
          + ("included" if has_local_state() else "left out: this fedmpi's Config has no local_state key yet"))
    data_file = shard_file(args)
    pythons = {}
    for peer in args.peers:
        python = venvs.ensure(peer, venvs.peer_packages(torch.__version__)[peer], args.venvs)
        if python is not None:
            pythons[peer] = python
    out, best = dict(machine=info, argv=sys.argv[1:] if argv is None else argv, load_start=load0, models={}), {}
    for model in args.models:
        w = workload(args, model, data_file)
        results = block(args, w, pythons, best)
        for peer in pythons:
            name = report.fastest(results, peer)
            if name:
                best.setdefault(peer, name.split()[-1])
        out["models"][model] = dict(rounds=w.rounds, epochs=w.epochs, contenders=results)
        out["load_end"] = os.getloadavg()[0]
        if args.json:   # after each model: a long run stopped later keeps what it measured
            args.json.write_text(json.dumps(out, indent=1) + "\n")
    print(f"\nload average at end {out.get('load_end', load0):.1f} (other processes on the host skew absolute times)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
