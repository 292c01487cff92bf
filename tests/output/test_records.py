"""Reading run directories for the report: each malformed file is one DataError line naming file and line or key."""
import json
import os

import pytest
from shardfiles import in_child

from fedmpi.errors import DataError
from fedmpi.output import records
from fedmpi.output.records import Run, load_run, shard_path

ROW = {"round": 1, "test_acc": 0.5, "central_acc": None, "t_round": 1.0, "t_train_mean": 0.5, "t_wait": 0.1,
       "t_allreduce": 0.1, "wire_bytes_est": 100, "ranks": 1, "payload_bytes": 100, "update_dtype": "fp32"}
CONFIG = "dataset: synthetic\nnodes: 4\nseed: 3\npartition: iid\ndata_file: data/{dataset}-seed{seed}.h5\n"


@pytest.fixture
def run_dir(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps(ROW) + "\n" + json.dumps(dict(ROW, round=2)) + "\n")
    (tmp_path / "run.json").write_text(json.dumps({"world_size": 1, "mpi_library": "MPICH 4", "hosts": ["h"]}))
    (tmp_path / "config.yaml").write_text(CONFIG)
    return tmp_path


def test_a_well_formed_run_directory_is_read(run_dir):
    run = load_run(run_dir)
    assert [r["round"] for r in run.rows] == [1, 2] and run.ranks == 1 and run.config["nodes"] == 4
    assert shard_path(run) == records.Path("data/synthetic-seed3.h5")


@pytest.mark.parametrize("line,fragment", [
    ("[1, 2]", "line 2 is not a JSON object (got list [1, 2])"),
    ('"text"', "line 2 is not a JSON object (got str 'text')"),
    (json.dumps(dict(ROW, round="2")), "line 2: 'round' must be a non-negative integer, got '2'"),
    (json.dumps(dict(ROW, round=True)), "line 2: 'round' must be a non-negative integer, got True"),
    (json.dumps(dict(ROW, t_round="fast")), "line 2: 't_round' must be a finite number or null, got 'fast'"),
    (json.dumps(dict(ROW, ranks=[1])), "line 2: 'ranks' must be a finite number or null, got [1]"),
    (json.dumps(dict(ROW, t_wait=float("inf"))), "line 2: 't_wait' must be a finite number or null, got inf"),
    ('{"round": 2, "payload_bytes": 1' + "0" * 400 + "}", "'payload_bytes' must be a finite number or null"),
    ('{"round": 1' + "0" * 5000 + "}", "line 2 is not JSON"),
    ("[" * 100_000, "line 2 is not JSON"),
    (json.dumps(dict(ROW, update_dtype=16)), "line 2: 'update_dtype' must be a string, got 16"),
])
def test_a_malformed_metrics_row_names_the_line_and_key(run_dir, line, fragment):
    (run_dir / "metrics.jsonl").write_text(json.dumps(ROW) + "\n" + line + "\n")
    with pytest.raises(DataError) as info:
        load_run(run_dir)
    message = str(info.value)
    assert message.startswith(f"report: {run_dir}/metrics.jsonl") and fragment in message and len(message) < 400


@pytest.mark.parametrize("content,fragment", [
    ('{"world_size": 2, "mpi_li', "run.json is not JSON (truncated?)"),
    ("[1]", "run.json must hold a JSON object, got list"),
    ('{"world_size": "two"}', "'world_size' has the wrong type or value: 'two'"),
    ('{"hosts": "node1"}', "'hosts' has the wrong type or value: 'node1'"),
    ('{"mpi_library": 4}', "'mpi_library' has the wrong type or value: 4"),
])
def test_a_malformed_run_json_names_the_file(run_dir, content, fragment):
    (run_dir / "run.json").write_text(content)
    with pytest.raises(DataError, match=f"report: {run_dir}/"):
        load_run(run_dir)
    with pytest.raises(DataError) as info:
        load_run(run_dir)
    assert fragment in str(info.value)


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi"))


@pytest.mark.parametrize("content,fragment", [
    ("nodes: [4\n", "config.yaml is not valid YAML"),
    (BOMB, "config.yaml is not valid YAML (aliases (*name) are not allowed here)"),
    ("a: " + "[" * 20_000, "config.yaml is not valid YAML"),
    ("- 1\n- 2\n", "config.yaml must hold a mapping of config keys, got [1, 2]"),
    ("1: one\n", "config.yaml must hold a mapping of config keys"),
])
def test_a_malformed_config_yaml_names_the_file(run_dir, content, fragment):
    (run_dir / "config.yaml").write_text(content)
    with pytest.raises(DataError) as info:
        load_run(run_dir)
    assert str(info.value).startswith(f"report: {run_dir}/config.yaml") and fragment in str(info.value), info.value
    assert len(str(info.value)) < 400


def test_config_yaml_that_is_not_utf8_is_one_line(run_dir):
    (run_dir / "config.yaml").write_bytes(b"dataset: caf\xe9\n")
    with pytest.raises(DataError, match=r"config.yaml is not UTF-8 text \(byte 12\)"):
        load_run(run_dir)


@pytest.mark.parametrize("template,expected", [
    ("d/{dataset}-{nodes}.h5", "d/synthetic-4.h5"), ("d/{{literal}}-{seed}.h5", "d/{literal}-3.h5"),
    ("d/plain.h5", "d/plain.h5"),
])
def test_plain_placeholders_are_filled_like_the_config_does(template, expected):
    run = Run(records.Path("r"), [ROW], {}, {"dataset": "synthetic", "nodes": 4, "seed": 3, "data_file": template})
    assert str(shard_path(run)) == expected


@pytest.mark.parametrize("template,fragment", [
    ("{seed.real.nope}", "has a bad placeholder: only {key}"), ("{seed:>100000000000}", "has a bad placeholder"),
    ("{seed[0]}", "has a bad placeholder"), ("{}", "has a bad placeholder"), ("d/{", "has a bad placeholder"),
    ("{nope}", "{nope} is not a plain config value"), ("{extra}", "{extra} is not a plain config value"),
    (7, "data_file 7 must be a string"),
])
def test_a_bad_placeholder_is_one_line(template, fragment):
    run = Run(records.Path("r"), [ROW], {}, {"seed": 3, "extra": [1, 2], "data_file": template})
    with pytest.raises(DataError) as info:
        shard_path(run)
    assert str(info.value).startswith("report: r/config.yaml: data_file") and fragment in str(info.value)


@pytest.mark.parametrize("name", ["metrics.jsonl", "run.json", "config.yaml"])
def test_a_fifo_in_the_run_directory_is_refused_without_blocking(run_dir, name):
    (run_dir / name).unlink()
    os.mkfifo(run_dir / name)
    kind, message = in_child(load_run, run_dir)
    assert kind == "DataError" and message == f"report: {run_dir / name} is a FIFO (named pipe), not a regular file"


def test_metrics_beyond_the_size_cap_are_refused(run_dir, monkeypatch):
    monkeypatch.setattr(records, "MAX_METRICS_BYTES", 100)
    with pytest.raises(DataError, match="metrics.jsonl is larger than 100 bytes"):
        load_run(run_dir)
