"""Client sampling: count, determinism, spread, and the same draw under mpirun at any rank count."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, mpirun_path

from fedmpi.fl.sampling import local_selection, sample_count, select_nodes


@pytest.mark.parametrize("nodes,fraction,want", [
    (100, 0.1, 10), (100, 1.0, 100), (100, 0.001, 1), (10, 0.25, 3), (10, 0.35, 4), (10, 0.34, 3),
    (5, 0.3, 2), (5, 0.5, 3), (7, 2.5 / 7, 3), (1, 0.01, 1), (7, 0.999, 7),
])
def test_count_is_c_times_n_rounded_half_up_and_at_least_one(nodes, fraction, want):
    assert sample_count(nodes, fraction) == want
    assert len(select_nodes(nodes, fraction, seed=0, rnd=1)) == want


def test_selection_is_sorted_distinct_and_depends_on_seed_and_round_only():
    a = select_nodes(100, 0.1, seed=0, rnd=4)
    assert np.array_equal(a, np.unique(a)) and a.min() >= 0 and a.max() < 100
    assert np.array_equal(a, select_nodes(100, 0.1, seed=0, rnd=4))
    assert not np.array_equal(a, select_nodes(100, 0.1, seed=0, rnd=5))
    assert not np.array_equal(a, select_nodes(100, 0.1, seed=1, rnd=4))


def test_every_node_is_picked_about_c_of_the_rounds():
    picks = np.bincount(np.concatenate([select_nodes(50, 0.2, 0, r) for r in range(1, 1001)]), minlength=50)
    assert picks.sum() == 10_000 and 150 < picks.min() and picks.max() < 250  # mean 200, sd ~12.6


def test_full_participation_is_every_node_in_order():
    assert select_nodes(7, 1.0, seed=3, rnd=9).tolist() == list(range(7))


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="0 < fraction <= 1"):
        select_nodes(10, 0.0, 0, 1)


def test_local_selection_keeps_the_ranks_own_block():
    selected = np.array([1, 4, 5, 9])
    assert local_selection(selected, 4, 8).tolist() == [4, 5]
    assert local_selection(selected, 6, 9).tolist() == []


SCRIPT = """
import json, sys
from mpi4py import MPI
from fedmpi.data.partition import node_ranges
from fedmpi.fl.sampling import local_selection, select_nodes
comm = MPI.COMM_WORLD
mine = node_ranges(20, comm.size)[comm.rank]
rows = [local_selection(select_nodes(20, 0.3, 7, r), mine.start, mine.stop).tolist() for r in range(1, 6)]
every = comm.gather(rows, root=0)
if comm.rank == 0:
    print(json.dumps([sum((rank[r] for rank in every), []) for r in range(5)]))
"""


def test_the_union_of_local_selections_is_the_same_at_1_2_and_3_ranks():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = {}
    for n in (1, 2, 3):
        proc = subprocess.run([mpirun_path(), "-n", str(n), sys.executable, "-c", SCRIPT],
                              capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr
        out[n] = proc.stdout.strip()
    assert out[1] == out[2] == out[3]
    rounds = json.loads(out[1])
    assert [len(r) for r in rounds] == [6] * 5 and len({tuple(r) for r in rounds}) == 5
