"""TensorBoard logging: event files read back with TensorBoard's own reader, after real `mpirun` runs."""
import json
import math
import os

import pytest
from conftest import SMALL, fedmpi, read_metrics
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # the tensorboard extra

from fedmpi.config import load_config, parse_overrides
from fedmpi.errors import ConfigError
from fedmpi.output.tensorboard import EVENT_PREFIX, FOLDER, scalars, tag

RUN = [*SMALL, "central_epochs=0", "tensorboard=true"]


def read_events(run_dir):
    """{tag: [(step, value), ...]} as TensorBoard shows the run directory's event files."""
    acc = EventAccumulator(str(run_dir / FOLDER))
    acc.Reload()
    return {name: [(e.step, e.value) for e in acc.Scalars(name)] for name in acc.Tags()["scalars"]}


def assert_events_match_the_rows(run_dir):
    rows, events = read_metrics(run_dir), read_events(run_dir)
    want = {}
    for row in rows:
        for name, value in scalars(row).items():
            want.setdefault(name, []).append((row["round"], value))
    assert set(events) == set(want)
    for name, points in want.items():
        assert [s for s, _ in events[name]] == [s for s, _ in points], name  # every round once, in order
        # TensorBoard keeps scalars as float32.
        assert all(math.isclose(v, w, rel_tol=1e-6, abs_tol=1e-30) for (_, v), (_, w) in zip(events[name], points))
    return rows, events


def test_tags_group_the_row_fields_and_leave_out_what_is_no_number():
    assert [tag(k) for k in ("test_acc", "local_acc_mean", "test_loss", "t_round", "payload_bytes", "bytes_saved",
                             "nodes_dropped", "ranks")] == [
        "accuracy/test_acc", "accuracy/local_acc_mean", "loss/test_loss", "time/t_round", "bytes/payload_bytes",
        "bytes/bytes_saved", "nodes/nodes_dropped", "nodes/ranks"]
    row = dict(round=2, test_acc=0.5, central_acc=None, update_dtype="fp16", t_round=1.25, local_acc_min=float("nan"))
    assert scalars(row) == {"accuracy/test_acc": 0.5, "time/t_round": 1.25}


def test_every_rounds_scalars_are_in_the_event_file(small_data, tmp_path):
    result = fedmpi(["run", "--set", *RUN, small_data, "--out", str(tmp_path)], ranks=2)
    assert result.returncode == 0, result.stderr
    rows, events = assert_events_match_the_rows(tmp_path)
    assert len(rows) == 3
    for name in ("accuracy/test_acc", "loss/test_loss", "accuracy/local_acc_mean", "time/t_round", "time/t_wait",
                 "bytes/payload_bytes", "nodes/nodes_dropped"):
        assert len(events[name]) == 3, name


def test_a_resumed_run_shows_each_round_once(small_data, tmp_path):
    """Rounds 1-3 logged, a crash in round 4, the checkpoint after round 2: the resumed run repeats
    round 3. Its event file replaces the old one and holds rounds 1-4 once each, as metrics.jsonl does."""
    crashed = fedmpi(["run", "--set", *RUN, small_data, "rounds=4", "checkpoint_every=2", "--out", str(tmp_path)],
                     ranks=2, env={"FEDMPI_FAULT": "raise:rank=0:round=4"})
    assert crashed.returncode != 0
    assert [s for s, _ in read_events(tmp_path)["accuracy/test_acc"]] == [1, 2, 3]
    # Say the first process ran 1000 s longer: the resumed rows must count on from the checkpoint's last row.
    meta_path = tmp_path / "checkpoint" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["metrics"][-1]["t_elapsed"] += 1000.0
    meta_path.write_text(json.dumps(meta))
    resumed = fedmpi(["run", "--resume", str(tmp_path)], ranks=2)
    assert resumed.returncode == 0, resumed.stderr
    rows, _ = assert_events_match_the_rows(tmp_path)
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    assert len([p for p in (tmp_path / FOLDER).iterdir() if p.name.startswith(EVENT_PREFIX)]) == 1
    # t_elapsed counts on across the restart, so every round's own time lies within it.
    assert rows[1]["t_elapsed"] > 1000.0 and rows[2]["t_elapsed"] >= rows[1]["t_elapsed"] + rows[2]["t_round"]
    assert sum(r["t_round"] for r in rows[:2]) <= rows[1]["t_elapsed"] - 1000.0


def test_without_the_package_the_key_is_one_line_and_exit_code_2(small_data, tmp_path):
    stub = tmp_path / "stub" / "tensorboard"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('No module named tensorboard')\n")
    path = os.pathsep.join([str(stub.parent), os.environ.get("PYTHONPATH", "")])
    result = fedmpi(["run", "--set", *RUN, small_data, "--out", str(tmp_path / "run")], ranks=2,
                    env={"PYTHONPATH": path})
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("fedmpi: error")]
    assert len(errors) == 1 and "config key 'tensorboard'" in errors[0] and "fedmpi[tensorboard]" in errors[0]
    assert "Traceback" not in result.stderr and not (tmp_path / "run" / "config.yaml").exists()


@pytest.mark.parametrize("value,expected", [("true", True), ("false", False)])
def test_the_key_is_a_boolean(value, expected):
    assert load_config(None, parse_overrides([f"tensorboard={value}"])).tensorboard is expected
    with pytest.raises(ConfigError, match="'tensorboard' must be true or false, got '1'"):
        load_config(None, parse_overrides(["tensorboard=1"]))
