"""All MPI in one place: the only module that imports mpi4py.

`world()` returns an `MPIComm` over COMM_WORLD, or a `LocalComm` (one process, no MPI) when
mpi4py is not installed. Both offer the same small API, so the rest of fedmpi never asks which.
"""
from __future__ import annotations

import os
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np


@dataclass
class CollectiveTiming:
    """Where one rank's time around the collective went."""

    t_wait: float       # waiting in a barrier for the slowest rank to finish training
    t_allreduce: float  # the Allreduce itself, once every rank has arrived


class LocalComm:
    """Single-process stand-in with the MPIComm API (used when mpi4py is absent)."""

    rank, size, local_rank, local_size = 0, 1, 0, 1

    def allreduce_sum(self, buf: np.ndarray) -> CollectiveTiming:
        return CollectiveTiming(0.0, 0.0)

    def bcast(self, obj: Any) -> Any:
        return obj

    def gather(self, obj: Any) -> Optional[list]:
        return [obj]

    def allgather(self, obj: Any) -> list:
        return [obj]

    def barrier(self) -> None:
        pass

    def abort(self, code: int) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    def library_version(self) -> str:
        return "none (single process, mpi4py not installed)"


ABORT_GRACE_S = 0.5  # time for the launcher to forward a failing rank's last output


class MPIComm:
    """COMM_WORLD plus the node-local communicator that decides which GPU a rank uses."""

    def __init__(self, MPI: Any) -> None:
        self._MPI = MPI
        self._world = MPI.COMM_WORLD
        # Split_type(SHARED) is right under every launcher; SLURM_LOCALID and friends are not.
        self._local = self._world.Split_type(MPI.COMM_TYPE_SHARED)
        self.rank = self._world.Get_rank()
        self.size = self._world.Get_size()
        self.local_rank = self._local.Get_rank()
        self.local_size = self._local.Get_size()

    def allreduce_sum(self, buf: np.ndarray) -> CollectiveTiming:
        """Sum `buf` over all ranks in place; a barrier first separates waiting from transfer."""
        t0 = self._MPI.Wtime()
        self._world.Barrier()
        t1 = self._MPI.Wtime()
        self._world.Allreduce(self._MPI.IN_PLACE, buf, op=self._MPI.SUM)
        t2 = self._MPI.Wtime()
        return CollectiveTiming(t1 - t0, t2 - t1)

    def bcast(self, obj: Any) -> Any:
        return self._world.bcast(obj, root=0)

    def gather(self, obj: Any) -> Optional[list]:
        return self._world.gather(obj, root=0)

    def allgather(self, obj: Any) -> list:
        return self._world.allgather(obj)

    def barrier(self) -> None:
        self._world.Barrier()

    def abort(self, code: int) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        # Abort tears down the launcher's output forwarding; without a pause this rank's last
        # lines (its error) can be lost (seen under MPICH hydra on a loaded machine).
        time.sleep(ABORT_GRACE_S)
        self._world.Abort(code)

    def library_version(self) -> str:
        return self._MPI.Get_library_version().strip().splitlines()[0]


_WORLD: Any = None


def world() -> Any:
    """The process's communicator, created once."""
    global _WORLD
    if _WORLD is None:
        try:
            from mpi4py import MPI
        except ImportError:
            _WORLD = LocalComm()
        else:
            _WORLD = MPIComm(MPI)
    return _WORLD


def hostname() -> str:
    return socket.gethostname()


def fail_job(message: str, code: int) -> None:
    """Print one error line and end every rank of the job with `code`.

    When all ranks hit the same error (a bad config), the others pause so rank 0's abort
    ends them before they print: one line, not one per rank. A rank that fails alone still
    prints and aborts the world, so nobody waits forever in a collective.
    """
    comm = world()
    if comm.size > 1 and comm.rank != 0:
        time.sleep(1.0)
    prefix = f"fedmpi: error (rank {comm.rank}/{comm.size}): " if comm.size > 1 else "fedmpi: error: "
    print(prefix + message, file=sys.stderr, flush=True)
    if comm.size > 1:
        comm.abort(code)
    sys.exit(code)


def install_excepthook() -> None:
    """Any uncaught exception on any rank aborts the whole job instead of hanging it."""
    previous = sys.excepthook

    def hook(kind, value, tb):  # noqa: ANN001 - signature fixed by sys.excepthook
        previous(kind, value, tb)
        comm = world()
        print(f"fedmpi: rank {comm.rank}/{comm.size} failed; aborting the job", file=sys.stderr, flush=True)
        comm.abort(1)

    sys.excepthook = hook
