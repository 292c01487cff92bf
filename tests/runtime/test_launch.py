"""Without mpi4py a multi-process launch is refused; which environments count as one (pure functions).

What MPICH hydra, Open MPI and srun really set is checked under real launchers in
tests/adversarial/test_faults_signals.py.
"""
import pytest

from fedmpi.runtime.comm import launch_evidence, refuse_launch_without_mpi

# Variables as measured: MPICH hydra (mpirun -n 2), Open MPI 4 (mpirun -n 2), srun --mpi=pmix -n 2.
HYDRA = {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALNRANKS": "2", "MPI_LOCALRANKID": "1", "PMI_FD": "11"}
OPENMPI = {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0", "PMIX_RANK": "0",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
SRUN = {"SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "PMIX_RANK": "1"}


@pytest.mark.parametrize("env,evidence", [
    (HYDRA, "PMI_SIZE=2"), (OPENMPI, "OMPI_COMM_WORLD_SIZE=2"), (SRUN, "SLURM_STEP_NUM_TASKS=2"),
    ({"MPI_LOCALNRANKS": "4"}, "MPI_LOCALNRANKS=4"), ({"PMIX_RANK": "3"}, "PMIX_RANK=3"),
    ({"MV2_COMM_WORLD_SIZE": "8"}, "MV2_COMM_WORLD_SIZE=8"),
])
def test_a_multi_process_launch_is_seen(env, evidence):
    assert launch_evidence(env) == evidence


@pytest.mark.parametrize("env", [
    {},
    {"PMI_SIZE": "1", "PMI_RANK": "0", "MPI_LOCALNRANKS": "1"},         # mpirun -n 1
    {"SLURM_NTASKS": "16", "SLURM_PROCID": "0", "SLURM_JOB_ID": "7"},   # the batch script itself, not a step
    {"PMI_SIZE": "two", "OMPI_COMM_WORLD_SIZE": "-3", "PMIX_RANK": " ", "SLURM_STEP_NUM_TASKS": "9" * 40},
])
def test_one_process_or_garbage_is_not_a_launch(env):
    assert launch_evidence(env) is None


def test_the_copy_called_rank_0_prints_one_line_and_every_copy_exits_2(capsys):
    for rank in ("0", "1", "2"):
        with pytest.raises(SystemExit) as info:
            refuse_launch_without_mpi(ImportError("No module named 'mpi4py'"), dict(HYDRA, PMI_RANK=rank, PMI_SIZE="3"))
        assert info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedmpi: error: mpi4py cannot be imported (No module named")
    assert "(PMI_SIZE=3)" in lines[0]


def test_without_a_launch_nothing_happens(capsys):
    refuse_launch_without_mpi(ImportError("x" * 10_000), {})
    assert capsys.readouterr().err == ""


def test_the_import_error_is_quoted_short(capsys):
    with pytest.raises(SystemExit):
        refuse_launch_without_mpi(ImportError("y" * 10_000 + "\nsecond line"), {"PMI_SIZE": "2"})
    line = capsys.readouterr().err
    assert len(line) < 600 and "second line" not in line
