import math
from dataclasses import fields
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from fedmpi.config import BOUNDS, Config, fill_placeholders, load_config, parse_overrides, placeholders
from fedmpi.errors import ConfigError

NUMERIC = [f.name for f in fields(Config) if f.type in ("int", "float", "Optional[float]")]


def test_tutorial_job_file_loads_with_the_tutorial_values(tmp_path):
    cfg = load_config("jobs/mnist_iid.yaml")
    assert (cfg.nodes, cfg.samples_per_node, cfg.partition, cfg.model) == (100, 450, "balanced", "2nn")
    assert (cfg.rounds, cfg.local_epochs, cfg.batch_size, cfg.lr, cfg.momentum) == (11, 10, 32, 0.01, 0.9)
    assert (cfg.aggregation, cfg.central_epochs) == ("mean", 10)
    assert str(cfg.data_path) == "data/mnist-balanced-100x450-seed0.h5"  # the name the README gives


def test_overrides_are_read_by_each_keys_type_and_win_over_the_file():
    overrides = parse_overrides(["rounds=3", "lr=0.5", "model=cnn", "data_dir=null", "server_lr=~"])
    assert overrides == {"rounds": 3, "lr": 0.5, "model": "cnn", "data_dir": None, "server_lr": None}
    cfg = load_config("jobs/mnist_iid.yaml", overrides)
    assert (cfg.rounds, cfg.lr, cfg.model, cfg.nodes) == (3, 0.5, "cnn", 100)


@pytest.mark.parametrize("text,key,value", [
    ("lr=1e-3", "lr", 0.001), ("lr=1E-3", "lr", 0.001), ("lr=.5", "lr", 0.5), ("lr=+2.5e-1", "lr", 0.25),
    ("momentum=0", "momentum", 0.0), ("nodes=1e3", "nodes", 1000), ("nodes=2.5e3", "nodes", 2500),
    ("nodes=1_000", "nodes", 1000), ("seed=010", "seed", 10), ("nodes=100.0", "nodes", 100),
    ("seed=9223372036854775807", "seed", 2**63 - 1), ("data_dir=2024", "data_dir", "2024"),
    ("data_dir= spaced ", "data_dir", " spaced "),
])
def test_numbers_read_as_a_user_means_them(text, key, value):
    got = parse_overrides([text])[key]
    assert got == value and type(got) is type(value)
    assert getattr(Config(**{key: got}), key) == value


def test_a_config_file_reads_values_the_way_set_does(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("lr: 1e-3\nseed: 010\nnodes: 1e2\ndata_dir:\nserver_lr: ~\nmodel: 2nn\n"
                   "data_file: 'd/{seed}.h5'\nrounds: !!int 4\n")
    cfg = load_config(str(job))
    assert (cfg.lr, cfg.seed, cfg.nodes, cfg.data_dir, cfg.server_lr, cfg.rounds) == (0.001, 10, 100, None, 1.0, 4)
    assert cfg.data_path == Path("d/10.h5")


def test_unknown_key_is_named_with_its_source(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("nodes: 4\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'learning_rate' \(from config file .*job.yaml\)"):
        load_config(str(job))
    with pytest.raises(ConfigError, match="unknown config key 'round' .from --set"):
        load_config(None, {"round": 2})


@pytest.mark.parametrize("key,value,message", [
    ("nodes", "many", "'nodes' must be a whole number, got 'many'"),
    ("nodes", 0, r"'nodes' must be in \[1, 10000000\], got 0"),
    ("lr", -1, r"'lr' must be in \(0.0, 100.0\], got -1.0"),
    ("momentum", 1.0, r"'momentum' must be in \[0.0, 1.0\)"),
    ("model", "resnet", "'model' must be 2nn, cnn or an import path"),
    ("rounds", True, "'rounds' must be a whole number, got True"),
    ("rounds", "true", "'rounds' must be a whole number, got 'true'"),
    ("lr", False, "'lr' must be a number, got False"),
    ("lr", "yes", "'lr' must be a number, got 'yes'"),
    ("nodes", 1.5, "'nodes' must be a whole number"),
    ("nodes", "1e-3", "'nodes' must be a whole number, got '1e-3'"),
    ("nodes", 2.0**60, "'nodes' must be a whole number"),  # a float beyond 2^53 is not an exact integer
    ("data_dir", 5, "'data_dir' must be a string or null"),
    ("data_dir", "a\x00b", "'data_dir' must be text without NUL bytes"),
    ("dataset", None, "'dataset' must be a string, got None"),
    ("model", "x" * 5000, "'model' must be at most 4096 characters, got 5,000"),
])
def test_bad_values_name_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message):
        Config(**{key: value})


@pytest.mark.parametrize("text,key", [
    ("nodes=1e12", "nodes"), ("samples_per_node=1e9", "samples_per_node"), ("batch_size=1e9", "batch_size"),
    ("threads=100000", "threads"), ("seed=1e30", "seed"), ("alpha=.inf", "alpha"), ("lr=1.0e+308", "lr"),
    ("quantity_sigma=1.0e+3", "quantity_sigma"), ("lr=nan", "lr"), ("lr=NaN", "lr"), ("lr=inf", "lr"),
    ("lr=-Infinity", "lr"), ("lr=.NaN", "lr"), ("server_lr=1e999", "server_lr"), ("lr=1e-99999", "lr"),
    ("seed=-1", "seed"), ("seed=9223372036854775808", "seed"), ("seed=1e99999999999", "seed"),
    ("seed=" + "9" * 4000, "seed"), ("chunk_nodes=1e300", "chunk_nodes"), ("local_epochs=100001", "local_epochs"),
    ("server_tau=0", "server_tau"), ("prox_mu=1e6", "prox_mu"), ("fraction=1.0000001", "fraction"),
])
def test_values_that_cannot_work_are_refused_with_the_key_named(text, key):
    with pytest.raises(ConfigError, match=f"config key '{key}' must be in ") as caught:
        Config(**parse_overrides([text]))
    assert len(str(caught.value)) < 200  # a 4000-digit value is not quoted whole


def test_every_numeric_key_has_bounds():
    assert sorted(NUMERIC) == sorted(BOUNDS), "a new numeric key needs its bounds in config.BOUNDS (and the README)"
    for name, (low, high, _, _) in BOUNDS.items():
        assert math.isfinite(low) and math.isfinite(high) and low < high, name


# Keys that only mean something beside others: the bounds are checked in a config where they do.
CONTEXT = {"dp_noise_multiplier": dict(dp="gaussian"), "dp_target_epsilon": dict(dp="gaussian"),
           "dp_delta": dict(dp="gaussian", dp_noise_multiplier=1.0),
           "dp_clip_quantile": dict(dp="gaussian", dp_noise_multiplier=1.0),
           "dp_clip_count_stddev": dict(dp="gaussian", dp_noise_multiplier=1.0, dp_clip_quantile=0.5)}


@pytest.mark.parametrize("name", sorted(BOUNDS))
def test_bounds_accept_their_closed_ends_and_refuse_just_beyond(name):
    low, high, low_open, high_open = BOUNDS[name]
    context = CONTEXT.get(name, {})
    is_int = isinstance(low, int) and isinstance(high, int)
    step_low = 1 if is_int else max(abs(low), 1.0) * 1e-9
    step_high = 1 if is_int else max(abs(high), 1.0) * 1e-9
    for value, ok in ((low, not low_open), (high, not high_open), (low - step_low, False), (high + step_high, False)):
        if ok:
            assert getattr(Config(**context, **{name: value}), name) == value
        else:
            with pytest.raises(ConfigError, match=f"config key '{name}' must be in"):
                Config(**context, **{name: value})


def test_the_largest_seed_is_one_numpy_torch_and_hdf5_take(tmp_path):
    seed = BOUNDS["seed"][1]
    np.random.SeedSequence([seed, 0, 7, 3]).generate_state(2)
    np.random.default_rng([seed, 1]).permutation(3)
    torch.manual_seed(seed)
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f.attrs["seed"] = seed
    with h5py.File(tmp_path / "a.h5", "r") as f:
        assert int(f.attrs["seed"]) == seed
    with pytest.raises(OverflowError):  # one more and the shard file's int64 attribute could not hold it
        np.array(seed + 1, dtype=np.int64)


def test_set_without_equals_is_rejected_and_long_values_are_refused():
    with pytest.raises(ConfigError, match="--set expects key=value"):
        parse_overrides(["rounds"])
    with pytest.raises(ConfigError, match="--set 'data_dir': the value has 5,000 characters"):
        parse_overrides(["data_dir=" + "x" * 5000])


def test_data_file_placeholders_are_filled_from_the_config():
    cfg = Config(data_file="d/{dataset}-{nodes}-{seed}-{{x}}.h5", dataset="synthetic", nodes=7, seed=3)
    assert str(cfg.data_path) == "d/synthetic-7-3-{x}.h5"
    assert placeholders("a{seed}b{nodes}{seed}") == ["seed", "nodes", "seed"]
    assert fill_placeholders("{lr}/{data_dir}", {"lr": 0.5, "data_dir": None}) == "0.5/None"


@pytest.mark.parametrize("template,shown", [
    ("{seed.real.nope}.h5", "{seed.real.nope}"), ("{seed:>100000000000}.h5", "{seed:>100000000000}"),
    ("{seed[0]}.h5", "{seed[0]}"), ("{seed!r}.h5", "{seed!r}"), ("{nope}.h5", "{nope}"), ("{}.h5", "{}"),
    ("{0}.h5", "{0}"), ("{data_file}.h5", "{data_file}"), ("{seed:{nodes}}.h5", "{seed:{nodes}}"),
])
def test_data_file_allows_only_plain_key_placeholders(template, shown):
    with pytest.raises(ConfigError, match="config key 'data_file' has the placeholder") as caught:
        Config(data_file=template)
    assert shown in str(caught.value)


@pytest.mark.parametrize("template", ["{seed", "seed}", "a{b", "x}}}", "{seed!}"])
def test_data_file_with_unbalanced_braces_is_refused(template):
    with pytest.raises(ConfigError, match="config key 'data_file'"):
        Config(data_file=template)


def test_data_file_must_give_a_usable_path():
    with pytest.raises(ConfigError, match="'data_file' must not be empty"):
        Config(data_file="")
    with pytest.raises(ConfigError, match="longer than 255 bytes"):
        Config(data_file="d/" + "x" * 300 + ".h5")
    with pytest.raises(ConfigError, match="'data_file' gives a path of 6,004 characters, more than 4096"):
        Config(data_dir="x" * 3000, data_file="{data_dir}/{data_dir}.h5")


def test_config_file_that_is_not_a_mapping(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(str(job))
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize("key,value,message", [
    ("alpha", 0, r"'alpha' must be in \[0.0001, 10000.0\]"),
    ("shards_per_node", 0, r"'shards_per_node' must be in \[1, 1000\]"),
    ("quantity_sigma", -0.5, "'quantity_sigma' must be in"),
    ("fraction", 0.0, r"'fraction' must be in \(0.0, 1.0\]"),
    ("fraction", 1.01, "'fraction' must be in"),
    ("fraction", float("nan"), "'fraction' must be in"),
    ("server_opt", "adam", "'server_opt' must be none, fedavgm, fedadam, fedyogi or an import path"),
    ("server_lr", 0, "'server_lr' must be in"),
    ("server_lr", "fast", "'server_lr' must be a number, got 'fast'"),
    ("server_momentum", 1.0, r"'server_momentum' must be in \[0.0, 1.0\)"),
    ("server_beta1", -0.1, "'server_beta1' must be in"),
    ("server_beta2", 1, "'server_beta2' must be in"),
    ("server_tau", 0, "'server_tau' must be in"),
    ("prox_mu", -1e-3, "'prox_mu' must be in"),
    ("update_dtype", "int8", "'update_dtype' must be one of fp32, fp16, bf16"),
    ("partition", "pathological", "'partition' must be one of balanced, iid, shards, dirichlet, quantity"),
])
def test_federated_keys_are_checked_by_name(key, value, message):
    with pytest.raises(ConfigError, match=message):
        Config(**{key: value})


def test_server_lr_defaults_to_the_optimizers_own_value_and_an_explicit_one_wins():
    assert (Config().server_lr, Config(server_opt="fedavgm").server_lr) == (1.0, 1.0)
    assert Config(server_opt="fedadam").server_lr == Config(server_opt="fedyogi").server_lr == 0.01
    assert Config(server_opt="fedadam", server_lr=0.1).server_lr == 0.1
    assert load_config(None, {"server_lr": None}).server_lr == 1.0


@pytest.mark.parametrize("name,partition,model,epochs", [
    ("mcmahan_2nn_iid", "iid", "2nn", 1), ("mcmahan_2nn_noniid", "shards", "2nn", 1),
    ("mcmahan_cnn_iid", "iid", "cnn", 5), ("mcmahan_cnn_noniid", "shards", "cnn", 5),
])
def test_mcmahan_job_files_load_with_the_papers_setup(name, partition, model, epochs):
    cfg = load_config(f"jobs/{name}.yaml")
    assert (cfg.nodes, cfg.samples_per_node, cfg.partition, cfg.model) == (100, 600, partition, model)
    assert (cfg.local_epochs, cfg.batch_size, cfg.fraction, cfg.aggregation) == (epochs, 10, 0.1, "weighted")
    assert partition != "shards" or cfg.shards_per_node == 2


JOBS = sorted(str(p) for p in Path("jobs").glob("*.yaml"))
OTHER_VALUE = {"dataset": "fashion-mnist", "partition": "dirichlet", "nodes": 50, "samples_per_node": 300,
               "seed": 1}
SECOND_VALUE = {"dataset": "cifar10", "partition": "quantity", "nodes": 60, "samples_per_node": 200, "seed": 2}


@pytest.mark.parametrize("job", JOBS)
@pytest.mark.parametrize("key", sorted(OTHER_VALUE))
def test_every_job_names_its_shard_file_after_the_keys_that_make_it(job, key):
    base = load_config(job)
    other = OTHER_VALUE[key] if getattr(base, key) != OTHER_VALUE[key] else SECOND_VALUE[key]
    changed = load_config(job, {key: other})
    assert changed.data_path != base.data_path, f"{job}: --set {key}=... would reuse {base.data_path}"


def test_scaffold_needs_the_per_node_state_that_local_state_reset_drops():
    with pytest.raises(ConfigError, match="config key 'algorithm': scaffold keeps per-node control variates"):
        Config(algorithm="scaffold", local_state="reset")
    assert Config(algorithm="scaffold").local_state == "keep"


def test_the_per_node_state_a_run_keeps():
    from fedmpi.config import node_state_names

    assert node_state_names(Config()) == ("momentum",)
    assert node_state_names(Config(local_state="reset")) == ()
    assert node_state_names(Config(momentum=0.0, algorithm="scaffold")) == ("control",)
