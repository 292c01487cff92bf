"""All MPI in one place: the only module that imports mpi4py.

`world()` returns an `MPIComm` over COMM_WORLD, or a `LocalComm` (one process, no MPI) when
mpi4py is not installed. Both offer the same small API, so the rest of fedmpi never asks which.
Every collective tells the watchdog that this rank is waiting for the others.
"""
from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Protocol

import numpy as np

from ..errors import FedmpiError
from . import watchdog

# Handles from MPICH's mpi.h (not its ABI build): MPIX_C_FLOAT16, MPIX_BFLOAT16.
MPICH_FLOAT16, MPICH_BFLOAT16 = 0x4C000246, 0x4C00024C


@dataclass
class CollectiveTiming:
    """One rank's seconds inside the Allreduce: waiting for the last rank to arrive, then the transfer.

    No barrier separates the two (that would be a second collective every round): the rank that
    arrives last waits least, so the smallest time over the ranks is the transfer and each rank's
    excess over it is its wait (metrics.split_collective).
    """

    t_collective: float


class Comm(Protocol):
    """What the rest of fedmpi may ask of a communicator: MPIComm, or LocalComm without MPI."""

    rank: int
    size: int
    local_rank: int
    local_size: int

    def allreduce_sum(self, buf: np.ndarray, dtype: Optional[str] = None) -> CollectiveTiming: ...
    def reduction_name(self, dtype: str) -> str: ...
    def bcast(self, obj: Any) -> Any: ...
    def gather(self, obj: Any) -> Optional[list]: ...
    def allgather(self, obj: Any) -> list: ...
    def barrier(self) -> None: ...
    def barrier_within(self, seconds: float) -> bool: ...
    def abort(self, code: int) -> None: ...
    def finish(self, code: int) -> None: ...
    def library_version(self) -> str: ...


class LocalComm:
    """Single-process stand-in with the MPIComm API (used when mpi4py is absent)."""

    rank, size, local_rank, local_size = 0, 1, 0, 1

    def allreduce_sum(self, buf: np.ndarray, dtype: Optional[str] = None) -> CollectiveTiming:
        return CollectiveTiming(0.0)

    def reduction_name(self, dtype: str) -> str:
        return "none (single process)"

    def bcast(self, obj: Any) -> Any:
        return obj

    def gather(self, obj: Any) -> Optional[list]:
        return [obj]

    def allgather(self, obj: Any) -> list:
        return [obj]

    def barrier(self) -> None:
        pass

    def barrier_within(self, seconds: float) -> bool:
        return True

    def abort(self, code: int) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    def finish(self, code: int) -> None:
        self.abort(code)

    def library_version(self) -> str:
        return "none (single process, mpi4py not installed)"


# Time for the launcher to forward a failing rank's last output before MPI_Abort. Measured under MPICH
# hydra (-n 3, 2 cores, loaded): raise to end 0.20-0.23 s with 0.2; with no pause a line is lost now and then.
ABORT_GRACE_S = 0.2
ENDING_WAIT_S = 30.0  # how long ranks ending together on an agreed error wait for each other


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
        self._reductions: dict[str, tuple] = {}  # dtype -> (datatype, op, how), made at first use

    def allreduce_sum(self, buf: np.ndarray, dtype: Optional[str] = None) -> CollectiveTiming:
        """Sum `buf` over all ranks in place, timed (waiting for the last rank included).

        dtype None: `buf`'s own numpy type. 'fp16'/'bf16': a buffer from compress.encode, summed
        as half-precision values (bf16 bits are uint16, which a plain SUM would add as integers).
        """
        target, op = buf, self._MPI.SUM
        if dtype is not None:
            datatype, op, _ = self._reduction(dtype)
            target = [buf, datatype]
        t0 = self._MPI.Wtime()
        with watchdog.waiting("allreduce"):
            self._world.Allreduce(self._MPI.IN_PLACE, target, op=op)
        return CollectiveTiming(self._MPI.Wtime() - t0)

    def _reduction(self, dtype: str) -> tuple:
        if dtype not in self._reductions:
            self._reductions[dtype] = reduction_for(self._MPI, dtype)
        return self._reductions[dtype]

    def reduction_name(self, dtype: str) -> str:
        """Which MPI type or op sums a `dtype` buffer here (for run.json)."""
        return self._reduction(dtype)[2]

    def bcast(self, obj: Any) -> Any:
        with watchdog.waiting("bcast"):
            return self._world.bcast(obj, root=0)

    def gather(self, obj: Any) -> Optional[list]:
        with watchdog.waiting("gather"):
            return self._world.gather(obj, root=0)

    def allgather(self, obj: Any) -> list:
        with watchdog.waiting("allgather"):
            return self._world.allgather(obj)

    def barrier(self) -> None:
        with watchdog.waiting("barrier"):
            self._world.Barrier()

    def barrier_within(self, seconds: float) -> bool:
        """A barrier that gives up after `seconds` (False): for ending a job, where waiting forever is worse."""
        request = self._world.Ibarrier()
        deadline = time.monotonic() + seconds
        while not request.Test():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def abort(self, code: int) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        # Abort tears down the launcher's output forwarding; without a pause this rank's last
        # lines (its error) can be lost (seen under MPICH hydra on a loaded machine).
        time.sleep(ABORT_GRACE_S)
        self._world.Abort(code)

    def finish(self, code: int) -> None:
        """Every rank, together: MPI_Finalize, then end the process now with `code`. Skips the
        interpreter's teardown, which takes 2-3 s once torch is loaded (measured on 2 cores): a
        stopped job must be gone well inside a batch system's kill grace (SLURM's KillWait)."""
        sys.stdout.flush()
        sys.stderr.flush()
        self._MPI.Finalize()
        os._exit(code)

    def library_version(self) -> str:
        return self._MPI.Get_library_version().strip().splitlines()[0]


def usable(MPI: Any, datatype: Any) -> bool:
    """Whether the loaded MPI really has this predefined type (mpi4py names some that Open MPI lacks)."""
    if datatype == MPI.DATATYPE_NULL:
        return False
    try:
        datatype.Get_size()
        datatype.Get_name()
    except MPI.Exception:
        return False
    return True


def reduction_for(MPI: Any, dtype: str, builtin: bool = True) -> tuple[Any, Any, str]:
    """(datatype, op, how) to SUM a compress.encode buffer of `dtype` (fp32, fp16, bf16)."""
    if dtype == "fp32":
        return MPI.FLOAT, MPI.SUM, "MPI_FLOAT"
    if dtype == "bf16":
        return bf16_reduction(MPI, builtin)
    if dtype != "fp16":
        raise ValueError(f"no reduction for update dtype {dtype!r}")
    float16 = getattr(MPI, "FLOAT16_T", MPI.DATATYPE_NULL)
    if builtin and usable(MPI, float16):  # MPICH: MPIX_C_FLOAT16; Open MPI has none
        return float16, MPI.SUM, float16.Get_name()

    def add(inbuf: Any, inoutbuf: Any, datatype: Any) -> None:
        from ..fl.compress import fp16_add_into  # imported late: compress imports torch, slow to load
        fp16_add_into(np.frombuffer(inbuf, np.uint16), np.frombuffer(inoutbuf, np.uint16))

    return MPI.UINT16_T, MPI.Op.Create(add, commute=True), "user op"


def bf16_reduction(MPI: Any, builtin: bool = True) -> tuple[Any, Any, str]:
    """(datatype, op, how) to SUM bf16 bits: the library's own bf16 type, else a user-defined op on uint16."""
    if builtin:
        standard = getattr(MPI, "BFLOAT16_T", MPI.DATATYPE_NULL)
        if usable(MPI, standard):
            return standard, MPI.SUM, "MPI_BFLOAT16_T"
        # mpi4py names no bf16 type under MPICH, yet MPICH sums its MPIX_BFLOAT16 natively. Its handle
        # is a constant of MPICH's mpi.h: trust it only where MPIX_C_FLOAT16 has its mpi.h value too.
        float16 = getattr(MPI, "FLOAT16_T", MPI.DATATYPE_NULL)
        if (MPI.Get_library_version().startswith("MPICH") and hasattr(MPI.Datatype, "fromhandle")
                and float16 != MPI.DATATYPE_NULL and float16.handle == MPICH_FLOAT16):
            return MPI.Datatype.fromhandle(MPICH_BFLOAT16), MPI.SUM, "MPIX_BFLOAT16"

    def add(inbuf: Any, inoutbuf: Any, datatype: Any) -> None:
        from ..fl.compress import bf16_add_into  # imported late: compress imports torch, slow to load
        bf16_add_into(np.frombuffer(inbuf, np.uint16), np.frombuffer(inoutbuf, np.uint16))

    return MPI.UINT16_T, MPI.Op.Create(add, commute=True), "user op"


_WORLD: Any = None


def world() -> Any:
    """The process's communicator, created once."""
    global _WORLD
    if _WORLD is None:
        try:
            from mpi4py import MPI
        except ImportError as err:
            refuse_launch_without_mpi(err, os.environ)
            _WORLD = LocalComm()
        else:
            _WORLD = MPIComm(MPI)
    return _WORLD


# What launchers set in each process they start: MPICH hydra and srun --mpi=pmi2 (PMI_*, MPI_LOCAL*),
# Open MPI (OMPI_COMM_WORLD_*), PMIx (Open MPI, srun --mpi=pmix), MVAPICH (MV2_*), and srun itself
# inside a job step (not in the batch script, where SLURM_NTASKS is the allocation's task count).
LAUNCH_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS", "MV2_COMM_WORLD_SIZE",
                    "SLURM_STEP_NUM_TASKS")
LAUNCH_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK", "SLURM_PROCID")


def _int_var(env, name: str) -> Optional[int]:
    value = env.get(name, "").strip()
    return int(value) if value.isdigit() and len(value) < 10 else None


def launch_evidence(env) -> Optional[str]:
    """'NAME=VALUE' of a variable showing that a launcher started several processes, else None."""
    for names, least in ((LAUNCH_SIZE_VARS, 2), (LAUNCH_RANK_VARS, 1)):
        for name in names:
            value = _int_var(env, name)
            if value is not None and value >= least:
                return f"{name}={value}"
    return None


def refuse_launch_without_mpi(err: ImportError, env) -> None:
    """Without mpi4py every copy a launcher starts would run alone as rank 0 on one run directory:
    exit 2 when the environment shows such a launch, one line from the copy the launcher calls rank 0."""
    evidence = launch_evidence(env)
    if evidence is None:
        return
    rank = next((r for r in (_int_var(env, n) for n in LAUNCH_RANK_VARS) if r is not None), 0)
    if rank == 0:
        reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        print(f"fedmpi: error: mpi4py cannot be imported ({reason}), yet a launcher started several processes "
              f"({evidence}): each would run alone as rank 0 on the same run directory; install mpi4py for this "
              f"MPI (pip install mpi4py), or start one process without a launcher", file=sys.stderr, flush=True)
    sys.exit(2)


MESSAGE_LIMIT = 1000  # characters of an error line; a hostile value must not print megabytes


def one_line(message: str, limit: int = MESSAGE_LIMIT) -> str:
    """`message` as one printable line: line breaks escaped, cut to `limit` characters."""
    flat = message.replace("\r", "\\r").replace("\n", "\\n")
    return flat if len(flat) <= limit else flat[:limit - 3] + "..."


@contextmanager
def agreed(comm: Comm) -> Iterator[None]:
    """Run a block on every rank, then agree on its outcome: a FedmpiError on any rank is raised on every rank.

    The block ends in one allgather of each rank's outcome, so every rank must enter it and the
    block must hold no collective of its own (a rank that failed early would wait in another one).
    The error raised afterwards has `everywhere` set, so the job ends cleanly: rank 0 prints it,
    every rank exits with its code, no MPI_Abort (see errors.FedmpiError). It is the first failing
    rank's error; `origin` names that rank unless every rank failed alike. Other exceptions pass
    through untouched: the excepthook aborts the world, which ends the ranks waiting here too.
    """
    mine: Optional[FedmpiError] = None
    try:
        yield
    except FedmpiError as err:
        mine = err
    outcomes = comm.allgather(None if mine is None else (str(mine), int(mine.exit_code)))
    failed = [(rank, outcome) for rank, outcome in enumerate(outcomes) if outcome is not None]
    if not failed:
        return
    failed.sort(key=lambda item: item[1][1] == 0)  # an error before a clean end (--help), else by rank
    origin, (message, code) = failed[0]
    err = mine if mine is not None and comm.rank == origin else FedmpiError(message)
    err.exit_code, err.everywhere = code, True
    err.origin = None if all(outcome == (message, code) for outcome in outcomes) else origin
    raise err


def fail_job(message: str, code: int, everywhere: bool = False, origin: Optional[int] = None) -> None:
    """Print one error line and end every rank of the job with `code`.

    everywhere (the error came out of `agreed`, every rank holds it): rank 0 prints the line and
    every rank exits with `code`; MPI is finalized normally, so MPICH prints no `Abort(...)` line and
    the launcher returns `code`. Otherwise this rank may have failed alone while the others wait for
    it in a collective: it prints the line naming itself and aborts the world. The other ranks pause
    first, so when all of them do hit the same error outside an agreement point, rank 0's abort ends
    them before they print: one line, not one per rank.
    """
    comm = world()
    message = one_line(message)
    if everywhere:
        if comm.rank == 0 and message:  # no message: --help or --version, already printed
            where = f" (rank {origin}/{comm.size})" if origin is not None and comm.size > 1 else ""
            print(f"fedmpi: error{where}: {message}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # Nobody exits before rank 0 has printed: Open MPI's mpirun kills the other ranks as soon as one
        # exits non-zero. Should a rank be missing (a bug: everywhere without agreement), abort after all.
        if not comm.barrier_within(ENDING_WAIT_S):
            comm.abort(code)
        sys.exit(code)
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
