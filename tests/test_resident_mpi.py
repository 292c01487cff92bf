"""Training rows on the device or read per round (data_resident_bytes), under real mpirun: the same rows."""
import pytest
from conftest import SMALL, assert_world, fedmpi, read_metrics
from rundirs import assert_refused

SAMPLED = [*SMALL, "fraction=0.5", "central_epochs=0"]


def results(run_dir):
    """Every metrics value that does not measure time."""
    return [{k: v for k, v in row.items() if not k.startswith("t_")} for row in read_metrics(run_dir)]


@pytest.mark.parametrize("state, engine", [("keep", "batched"), ("reset", "batched"), ("keep", "sequential")])
def test_reading_each_rounds_nodes_gives_the_rows_of_the_resident_block_at_1_2_and_4_ranks(small_data, tmp_path,
                                                                                           state, engine):
    got = {}
    for ranks in (1, 2, 4):
        for budget in ("0", str(4 << 30)):  # 0: every round reads its nodes from the file
            run_dir = tmp_path / f"n{ranks}-{budget}"
            result = fedmpi(["run", "--set", *SAMPLED, small_data, f"local_state={state}", f"engine={engine}",
                             f"data_resident_bytes={budget}", "--out", str(run_dir)], ranks=ranks)
            assert result.returncode == 0, result.stderr
            assert_world(run_dir, ranks)
            got[ranks, budget] = results(run_dir)
    resident = got[1, str(4 << 30)]
    assert len(resident) == 3 and len({row["test_acc"] for row in resident}) > 1
    assert got[1, "0"] == resident and all(got[n, "0"] == got[n, str(4 << 30)] for n in (2, 4))
    assert all(row["t_read"] > 0 for row in read_metrics(tmp_path / "n2-0"))  # rows came from the file
    assert all(row["t_read"] == 0 for row in read_metrics(tmp_path / f"n2-{4 << 30}"))  # resident: no read


def test_a_bad_budget_is_one_line_and_exit_2(small_data, tmp_path):
    result = fedmpi(["run", "--set", *SAMPLED, small_data, "data_resident_bytes=-5", "--out", str(tmp_path / "r")],
                    ranks=2)
    assert_refused(result, "config key 'data_resident_bytes' must be in")
