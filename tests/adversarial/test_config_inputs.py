"""Hostile config values, config files, placeholders and flags against the real `fedmpi` under real mpirun.

Each case must end with exit code 2 and exactly one `fedmpi: error` line naming the key, file or flag;
no traceback, no MPI_Abort (MPICH's `Abort(` line), within the (generous, hang-only) timeout; and
nothing written: the working folder is the same file by file afterwards. The errors come before any
data is read, so each run costs about a second.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, SMALL, fedmpi, mpi_env, mpirun_path

from fedmpi import __version__

RANKS = [1, 3]
TIMEOUT = 60
SET_CASES = [  # --set VALUE, what the one line must say
    ("nodes=1e12", "config key 'nodes' must be in [1, 10000000], got 1000000000000"),
    ("samples_per_node=1e9", "config key 'samples_per_node' must be in [1, 10000000]"),
    ("batch_size=1e9", "config key 'batch_size' must be in [1, 1048576]"),
    ("threads=100000", "config key 'threads' must be in [0, 1024]"),
    ("seed=1e30", "config key 'seed' must be in [0, 9223372036854775807]"),
    ("seed=9223372036854775808", "config key 'seed' must be in [0, 9223372036854775807]"),
    ("seed=-1", "config key 'seed' must be in"),
    ("seed=" + "9" * 3000, "config key 'seed' must be in"),
    ("seed=1e99999999999", "config key 'seed' must be in"),
    ("alpha=.inf", "config key 'alpha' must be in [0.0001, 10000.0], got inf"),
    ("lr=1.0e+308", "config key 'lr' must be in (0.0, 100.0], got 1e+308"),
    ("lr=nan", "config key 'lr' must be in (0.0, 100.0], got nan"),
    ("lr=-inf", "config key 'lr' must be in"),
    ("lr=1e-99999", "config key 'lr' must be in (0.0, 100.0], got 0.0"),
    ("lr=", "config key 'lr' must be a number, got ''"),
    ("lr=fast", "config key 'lr' must be a number, got 'fast'"),
    ("quantity_sigma=1.0e+3", "config key 'quantity_sigma' must be in [0.0, 10.0]"),
    ("momentum=1", "config key 'momentum' must be in [0.0, 1.0)"),
    ("rounds=0", "config key 'rounds' must be in [1, 10000000]"),
    ("rounds=true", "config key 'rounds' must be a whole number, got 'true'"),
    ("nodes=1.5", "config key 'nodes' must be a whole number, got '1.5'"),
    ("eval_every=1e-3", "config key 'eval_every' must be a whole number"),
    ("local_epochs=1e5", "config key 'local_epochs' must be in [1, 10000]"),
    ("central_epochs=1e300", "config key 'central_epochs' must be in [0, 10000]"),
    ("fraction=0", "config key 'fraction' must be in (0.0, 1.0]"),
    ("server_tau=0", "config key 'server_tau' must be in"),
    ("server_lr=1e999", "config key 'server_lr' must be in (0.0, 100.0], got inf"),
    ("prox_mu=1e6", "config key 'prox_mu' must be in [0.0, 1000.0]"),
    ("shards_per_node=1e6", "config key 'shards_per_node' must be in [1, 1000]"),
    ("max_dropped_fraction=1.5", "config key 'max_dropped_fraction' must be in [0.0, 1.0]"),
    ("model=resnet", "config key 'model' must be 2nn, cnn or an import path"),
    ("algorithm=scafold", "config key 'algorithm' must be one of fedavg, scaffold, fednova; got 'scafold'"),
    ("algorithm=fednova", "config key 'algorithm': fednova takes plain local SGD with fp32 updates; 'momentum' is 0.9"),
    ("algorithm=" + "s" * 4000, "config key 'algorithm' must be one of"),
    ("personalize=dito", "config key 'personalize' must be one of none, ditto; got 'dito'"),
    ("ditto_lambda=-1", "config key 'ditto_lambda' must be in [0.0, 1000000.0]"),
    ("ditto_lambda=nan", "config key 'ditto_lambda'"),
    ("personal_layers=[" + "a," * 70 + "a]", "config key 'personal_layers' has 71 entries, at most 64"),
    ("personal_layers=" + "x" * 300, "config key 'personal_layers' must hold names of 1 to 255 characters"),
    ("buffers=global", "config key 'buffers' must be one of average, local; got 'global'"),
    ("buffers=", "config key 'buffers' must be one of average, local; got ''"),
    ("data_resident_bytes=-1", "config key 'data_resident_bytes' must be in [0, 1152921504606846976]"),
    ("data_resident_bytes=1e300", "config key 'data_resident_bytes' must be in [0, 1152921504606846976]"),
    ("data_resident_bytes=lots", "config key 'data_resident_bytes' must be a whole number"),
    ("local_state=forget", "config key 'local_state' must be one of keep, reset; got 'forget'"),
    ("local_state=", "config key 'local_state' must be one of keep, reset; got ''"),
    ("node_metrics_every=-1", "config key 'node_metrics_every' must be in [0, 10000000]"),
    ("node_metrics_every=2.5", "config key 'node_metrics_every' must be a whole number"),
    ("synthetic_shape=1x0x8", "config key 'synthetic_shape' must have dimensions >= 1"),
    ("synthetic_shape=4096x4096x2", "config key 'synthetic_shape' must have dimensions >= 1 and at most 16,777,216"),
    ("synthetic_shape=[1, 8, 8", "config key 'synthetic_shape' must be 1 to 3 whole numbers"),
    ("synthetic_shape=1x2x3x4", "config key 'synthetic_shape' must be 1 to 3 whole numbers"),
    ("dataset=imagenet", "config key 'dataset' must be one of"),
    ("data_dir=" + "x" * 5000, "--set 'data_dir': the value has 5,000 characters, at most 4096"),
    ("learning_rate=0.1", "unknown config key 'learning_rate' (from --set)"),
    ("lr", "--set expects key=value, got 'lr'"),
]
PLACEHOLDER_CASES = [  # data_file template, the placeholder the line must quote
    ("{seed.real.nope}.h5", "'{seed.real.nope}'"), ("{seed:>100000000000}.h5", "'{seed:>100000000000}'"),
    ("{seed[0]}.h5", "'{seed[0]}'"), ("{seed!r}.h5", "'{seed!r}'"), ("{nope}.h5", "'{nope}'"), ("{}.h5", "'{}'"),
    ("{seed.h5", "expected '}' before end of string"), ("x}.h5", "Single '}' encountered"),
    ("{data_file}.h5", "'{data_file}'"), ("x" * 300 + ".h5", "is longer than 255 bytes"),
]
BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8)) + "lr: *i\n"
FILE_CASES = {  # name: (file content as bytes, what the line must say besides the file's name)
    "billion_laughs": (BOMB.encode(), "YAML anchors and aliases (&name, *name) are not allowed"),
    "anchor": (b"lr: &x 0.1\n", "line 1: YAML anchors and aliases"),
    "deep_flow": (("lr: " + "[" * 20000 + "]" * 20000).encode(), "nested deeper than|while increasing flow level"),
    "deep_block": (("- " * 20000 + "x\n").encode(), "nested deeper than 3 levels"),
    "latin1": ("lr: 0.1\ndata_dir: /home/j\u00f6rg\n".encode("latin-1"), "is not UTF-8 text: byte 0xf6 on line 2"),
    "code_tag": (b"lr: !!python/object/apply:os.system ['touch PWNED']\n", "YAML tag 'tag:yaml.org,2002:python/"),
    "duplicate": (b"lr: 0.1\nnodes: 4\nlr: 0.2\n", "line 3: key 'lr' is given twice (first on line 1)"),
    "two_documents": (b"lr: 0.1\n---\nlr: 0.2\n", "a second YAML document"),
    "a_list": (b"- lr\n- 0.1\n", "must hold a mapping of keys to values"),
    "bad_syntax": (b"lr: [0.1,\n", "is not valid YAML"),
    "nul_byte": (b"lr: 0.1\x00\n", "is not valid YAML"),
    "nul_in_value": (b'data_dir: "a\\0b"\n', "config key 'data_dir' must be text without NUL bytes"),
    "unknown_key": (b"learning_rate: 0.1\n", "unknown config key 'learning_rate' (from config file"),
    "nested_value": (b"lr: {a: 1}\n", "config key 'lr' must be a number, got {'a': '1'}"),
    "long_int_tag": (b"seed: !!int " + b"9" * 5000 + b"\n", "a value cannot be read"),
    "inf_value": (b"lr: .inf\n", "config key 'lr' must be in (0.0, 100.0], got inf"),
}
FLAG_CASES = [  # command line, what the line must say
    (["run", "--bogus"], "unrecognized arguments: --bogus (see fedmpi --help)"),
    (["run", "--config"], "argument --config: expected one argument (see fedmpi run --help)"),
    (["train"], "argument command: invalid choice: 'train'"),
    ([], "the following arguments are required: command"),
    (["run", "--set"], "argument --set: expected at least one argument"),
    (["prepare", "--out", "x"], "unrecognized arguments: --out x"),
    (["report"], "the following arguments are required: RUN_DIR"),
]


def snapshot(folder: Path) -> set:
    return {(str(p.relative_to(folder)), p.is_dir()) for p in folder.rglob("*")}


def refused(args: list[str], ranks: int, where: Path, expect: str, written: frozenset = frozenset()) -> str:
    """Run `fedmpi ARGS` in `where` and check the promise; `written`: paths run() may have made there."""
    before = snapshot(where)
    result = fedmpi(args, ranks=ranks, timeout=TIMEOUT, cwd=where, env={"PYTHONPATH": str(ROOT)})
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("fedmpi: error")]
    assert len(errors) == 1, result.stderr
    assert any(part in errors[0] for part in expect.split("|")), errors[0]
    assert "Traceback" not in result.stderr and "fedmpi: error: fedmpi" not in result.stderr, result.stderr
    assert "Abort(" not in result.stderr + result.stdout, result.stderr
    assert len(errors[0]) < 1200  # a 5000-character value is not quoted whole
    assert snapshot(where) - before <= written, sorted(snapshot(where) - before)
    return errors[0]


def base(tmp_path: Path) -> list[str]:
    return ["run", "--set", *SMALL, f"data_file={tmp_path}/data/s-{{seed}}.h5"]


@pytest.mark.parametrize("ranks", RANKS)
@pytest.mark.parametrize("value,expect", SET_CASES, ids=[v[:30] for v, _ in SET_CASES])
def test_a_hostile_set_value_is_one_line_naming_the_key(tmp_path, ranks, value, expect):
    refused(base(tmp_path) + [value, "--out", "out"], ranks, tmp_path, expect)


@pytest.mark.parametrize("ranks", RANKS)
def test_scaffold_with_compressed_updates_is_refused_naming_both_keys(tmp_path, ranks):
    refused(base(tmp_path) + ["algorithm=scaffold", "update_dtype=bf16", "--out", "out"], ranks, tmp_path,
            "config key 'algorithm': scaffold sends its control variates in fp32 only; set update_dtype: fp32")


@pytest.mark.parametrize("ranks", RANKS)
@pytest.mark.parametrize("extra,expect", [
    (["algorithm=scaffold"], "config key 'personalize': ditto runs with algorithm fedavg, got 'scaffold'"),
    (["algorithm=fednova", "momentum=0"], "config key 'personalize': ditto runs with algorithm fedavg, got 'fednova'"),
    (["local_state=reset"], "config key 'personalize': ditto keeps each node's personal model across rounds"),
])
def test_ditto_with_what_it_cannot_take_is_refused_naming_the_key(tmp_path, ranks, extra, expect):
    refused(base(tmp_path) + ["personalize=ditto", *extra, "--out", "out"], ranks, tmp_path, expect)


@pytest.mark.parametrize("ranks", RANKS)
@pytest.mark.parametrize("template,expect", PLACEHOLDER_CASES, ids=[t[:24] for t, _ in PLACEHOLDER_CASES])
def test_a_data_file_placeholder_other_than_a_plain_key_is_refused(tmp_path, ranks, template, expect):
    line = refused(["run", "--set", *SMALL, f"data_file=data/{template}", "--out", "out"], ranks, tmp_path,
                   expect)
    assert "config key 'data_file'" in line


@pytest.mark.parametrize("ranks", RANKS)
@pytest.mark.parametrize("name", sorted(FILE_CASES))
def test_a_hostile_config_file_is_one_line_naming_it(tmp_path, ranks, name):
    content, expect = FILE_CASES[name]
    job = tmp_path / f"{name}.yaml"
    job.write_bytes(content)
    line = refused(["run", "--config", str(job), "--out", "out"], ranks, tmp_path, expect)
    assert str(job) in line or "config key" in line


@pytest.mark.parametrize("ranks", RANKS)
@pytest.mark.parametrize("kind", ["directory", "fifo", "device", "missing", "huge"])
def test_a_config_path_that_is_not_a_readable_regular_file_is_refused_without_blocking(tmp_path, ranks, kind):
    path = {"device": Path("/dev/zero")}.get(kind, tmp_path / f"{kind}.yaml")
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "huge":
        with open(path, "wb") as f:
            f.truncate(1 << 40)
    expect = {"directory": "is a directory, not a regular file", "fifo": "is a FIFO (named pipe), not a regular file",
              "device": "is a character device", "missing": "No such file or directory",
              "huge": "is 1,099,511,627,776 bytes, more than the 64 KiB"}[kind]
    assert str(path) in refused(["run", "--config", str(path), "--out", "out"], ranks, tmp_path, expect)


@pytest.mark.parametrize("ranks", RANKS)
@pytest.mark.parametrize("args,expect", FLAG_CASES, ids=[" ".join(a) or "none" for a, _ in FLAG_CASES])
def test_a_bad_flag_is_one_line_naming_it(tmp_path, ranks, args, expect):
    refused(args, ranks, tmp_path, expect)


@pytest.mark.parametrize("ranks", RANKS)
def test_a_shard_file_too_big_for_memory_is_refused_with_the_estimate_before_anything_is_written(tmp_path, ranks):
    line = refused(base(tmp_path) + ["nodes=100000", "samples_per_node=10000", "--out", "out"], ranks, tmp_path,
                   "config needs about 752.6 GiB to prepare the shard file (nodes x samples_per_node = "
                   "1,000,000,000 synthetic images")
    assert "available; lower nodes or samples_per_node" in line


@pytest.mark.parametrize("ranks", RANKS)
def test_a_data_file_that_cannot_be_created_is_refused_before_anything_is_written(tmp_path, ranks):
    (tmp_path / "afile").write_text("")
    refused(["run", "--set", *SMALL, f"data_file={tmp_path}/afile/x.h5", "--out", "out"], ranks, tmp_path,
            f"shard file {tmp_path}/afile/x.h5: cannot create its directory, {tmp_path}/afile is not a directory")


# Found by each rank during setup, after rank 0 has locked the run directory: its lock is all it holds
# (config.yaml and the rest are written only once every rank has set up).
SETUP_WRITES = frozenset({("out", True), ("out/.lock", False)})


@pytest.mark.parametrize("ranks", RANKS)
def test_more_threads_than_the_host_can_run_is_refused_on_every_rank_alike(tmp_path, small_data, ranks):
    threads = 4 * (os.cpu_count() or 1) + 1
    if threads > 1024:
        pytest.skip("this host takes every thread count the config allows")
    refused(["run", "--set", *SMALL, small_data, f"threads={threads}", "--out", "out"], ranks, tmp_path,
            f"config key 'threads' is {threads}, more than 4 per logical CPU", SETUP_WRITES)


@pytest.mark.parametrize("ranks", RANKS)
@pytest.mark.parametrize("layers,expect", [
    ("[5, 7]", "config key 'personal_layers': no parameter of the model is '7' or starts with '7.'"),
    ("[1, 3, 5]", "config key 'personal_layers' names every parameter of the model"),
])
def test_personal_layers_the_model_lacks_are_refused_before_shards_are_read(tmp_path, small_data, ranks, layers,
                                                                             expect):
    refused(["run", "--set", *SMALL, small_data, f"personal_layers={layers}", "--out", "out"], ranks, tmp_path,
            expect, SETUP_WRITES)


@pytest.mark.parametrize("ranks", RANKS)
@pytest.mark.parametrize("extra,expect", [
    (["algorithm=scaffold"], "'algorithm' is 'scaffold'"), (["update_dtype=bf16"], "'update_dtype' is 'bf16'"),
    (["dp=gaussian", "dp_noise_multiplier=1"], "'dp' is 'gaussian'"), (["prox_mu=0.1"], "'prox_mu' is 0.1"),
    (["personalize=ditto"], "config key 'personal_layers': choose one personalization"),
])
def test_personal_layers_with_what_they_cannot_take_are_refused_naming_the_key(tmp_path, ranks, extra, expect):
    refused(base(tmp_path) + ["personal_layers=5", *extra, "--out", "out"], ranks, tmp_path, expect)


@pytest.mark.parametrize("ranks", RANKS)
def test_a_run_too_big_for_memory_is_refused_with_the_estimate_before_shards_are_read(tmp_path, small_data, ranks):
    line = refused(["run", "--set", *SMALL, small_data, "chunk_nodes=8", "batch_size=1048576",
                    "local_epochs=10000", "--out", "out"], ranks, tmp_path, "config needs about ", SETUP_WRITES)
    assert f"({ranks} rank{'s' if ranks > 1 else ''}; rank 0: chunk working set " in line
    assert "available; lower chunk_nodes, batch_size or threads" in line


def test_a_rank_alone_with_a_bad_config_ends_the_job_cleanly_naming_it(tmp_path):
    """MPMD: ranks 0-1 get a good command line, rank 2 a bad one; the agreement ends all three, no hang."""
    good = ["run", "--set", *SMALL, f"data_file={tmp_path}/data/s.h5", "--out", "out"]
    fedmpi_cmd = [sys.executable, "-m", "fedmpi"]
    cmd = [mpirun_path(), "-n", "2", *fedmpi_cmd, *good, ":", "-n", "1", *fedmpi_cmd, *good, "--set", "lr=nan"]
    env = dict(os.environ, **mpi_env(), PYTHONPATH=str(ROOT))
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=tmp_path)
    errors = [line for line in result.stderr.splitlines() if line.startswith("fedmpi: error")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr
    assert errors[0] == "fedmpi: error (rank 2/3): config key 'lr' must be in (0.0, 100.0], got nan"
    assert "Abort(" not in result.stderr and not (tmp_path / "out").exists() and not (tmp_path / "data").exists()


def test_a_rank_alone_with_a_bad_config_beside_ranks_asking_for_the_version_still_fails(tmp_path):
    fedmpi_cmd = [sys.executable, "-m", "fedmpi"]
    bad = ["run", "--set", *SMALL, "lr=nan", "--out", "out"]
    cmd = [mpirun_path(), "-n", "2", *fedmpi_cmd, "--version", ":", "-n", "1", *fedmpi_cmd, *bad]
    env = dict(os.environ, **mpi_env(), PYTHONPATH=str(ROOT))
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=tmp_path)
    errors = [line for line in result.stderr.splitlines() if line.startswith("fedmpi: error")]
    assert result.returncode == 2 and errors == ["fedmpi: error (rank 2/3): config key 'lr' must be in (0.0, "
                                                 "100.0], got nan"], result.stderr
    assert result.stdout == f"fedmpi {__version__}\n"


@pytest.mark.parametrize("ranks", RANKS)
@pytest.mark.parametrize("flag", ["--version", "--help"])
def test_version_and_help_print_once_and_exit_0(tmp_path, ranks, flag):
    result = fedmpi([flag], ranks=ranks, timeout=TIMEOUT, cwd=tmp_path, env={"PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    if flag == "--version":
        assert result.stdout == f"fedmpi {__version__}\n"
    else:
        assert result.stdout.count("usage: fedmpi") == 1 and "--version" in result.stdout
