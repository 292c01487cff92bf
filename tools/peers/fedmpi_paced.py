"""The `fedmpi` command with each round started by tools/bench_peers.py: same CLI, same round code.

    mpirun -n 2 python tools/peers/fedmpi_paced.py run --config jobs/mnist_iid.yaml ... --set threads=1

Every rank waits (tools/peers/pacing.py) before each call of fedmpi.rounds.run_round, where that round's
clock (t_round in metrics.jsonl) has not started yet, and once more after the last round, so the
benchmark can read the job's peak memory while it idles. Waiting ranks sleep between polls instead of
spinning in an MPI collective. Without $FEDMPI_BENCH_CTL this is plain `fedmpi`.
"""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))  # this checkout's fedmpi
from pacing import Pacer  # noqa: E402

import fedmpi.rounds as fedmpi_rounds  # noqa: E402
from fedmpi.cli import main  # noqa: E402


def paced(round_fn, run_fn):
    """run_round and run wrapped so that each round, and the exit, waits for the benchmark."""
    pacers = {}

    def pacer(comm) -> Pacer:
        if "p" not in pacers:
            pacers["p"] = Pacer.from_env(announce=comm.rank == 0)
        return pacers["p"]

    def run_round(st, rnd, stop):
        pacer(st.comm).wait(rnd)
        return round_fn(st, rnd, stop)

    def run(cfg, run_dir, comm, *args, **kwargs):  # whatever else fedmpi.rounds.run takes, passed through
        code = run_fn(cfg, run_dir, comm, *args, **kwargs)
        pacer(comm).wait(cfg.rounds + 1)
        return code

    return run_round, run


if __name__ == "__main__":
    if not (callable(getattr(fedmpi_rounds, "run_round", None)) and callable(getattr(fedmpi_rounds, "run", None))):
        raise SystemExit("fedmpi_paced: fedmpi.rounds has no run_round/run to pace; update tools/peers/fedmpi_paced.py")
    fedmpi_rounds.run_round, fedmpi_rounds.run = paced(fedmpi_rounds.run_round, fedmpi_rounds.run)
    main()
