import pytest

from fedmpi.config import Config, load_config, parse_overrides
from fedmpi.errors import ConfigError


def test_tutorial_job_file_loads_with_the_tutorial_values(tmp_path):
    cfg = load_config("jobs/mnist_iid.yaml")
    assert (cfg.nodes, cfg.samples_per_node, cfg.partition, cfg.model) == (100, 450, "balanced", "2nn")
    assert (cfg.rounds, cfg.local_epochs, cfg.batch_size, cfg.lr, cfg.momentum) == (11, 10, 32, 0.01, 0.9)
    assert (cfg.aggregation, cfg.central_epochs) == ("mean", 10)


def test_overrides_are_parsed_as_yaml_scalars_and_win_over_the_file():
    overrides = parse_overrides(["rounds=3", "lr=0.5", "model=cnn", "data_dir=null"])
    assert overrides == {"rounds": 3, "lr": 0.5, "model": "cnn", "data_dir": None}
    cfg = load_config("jobs/mnist_iid.yaml", overrides)
    assert (cfg.rounds, cfg.lr, cfg.model, cfg.nodes) == (3, 0.5, "cnn", 100)


def test_unknown_key_is_named_with_its_source(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("nodes: 4\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'learning_rate' \(from .*job.yaml\)"):
        load_config(str(job))
    with pytest.raises(ConfigError, match="unknown config key 'round' .from --set"):
        load_config(None, {"round": 2})


@pytest.mark.parametrize("key,value,message", [
    ("nodes", "many", "'nodes' must be of type int"),
    ("nodes", 0, "'nodes' must be >= 1"),
    ("lr", -1, "'lr' must be > 0"),
    ("momentum", 1.0, "'momentum' must be in"),
    ("model", "resnet", "'model' must be one of 2nn, cnn"),
    ("rounds", True, "'rounds' must be of type int"),
    ("data_dir", 5, "'data_dir' must be a string or null"),
])
def test_bad_values_name_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message):
        Config(**{key: value})


def test_int_is_accepted_for_a_float_key():
    assert Config(lr=1).lr == 1.0 and isinstance(Config(lr=1).lr, float)


def test_set_without_equals_is_rejected():
    with pytest.raises(ConfigError, match="--set expects key=value"):
        parse_overrides(["rounds"])


def test_data_file_placeholders_are_filled_from_the_config():
    cfg = Config(data_file="d/{dataset}-{nodes}-{seed}.h5", dataset="synthetic", nodes=7, seed=3)
    assert str(cfg.data_path) == "d/synthetic-7-3.h5"
    with pytest.raises(ConfigError, match="'data_file' has a bad placeholder"):
        Config(data_file="{nope}.h5").data_path


def test_config_file_that_is_not_a_mapping(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(str(job))
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize("key,value,message", [
    ("alpha", 0, r"'alpha' must be in \(0.0, inf\)"),
    ("shards_per_node", 0, r"'shards_per_node' must be in \[1, inf\)"),
    ("quantity_sigma", -0.5, "'quantity_sigma' must be in"),
    ("fraction", 0.0, r"'fraction' must be in \(0.0, 1.0\]"),
    ("fraction", 1.01, "'fraction' must be in"),
    ("fraction", float("nan"), "'fraction' must be in"),
    ("server_opt", "adam", "'server_opt' must be one of none, fedavgm, fedadam, fedyogi"),
    ("server_lr", 0, "'server_lr' must be in"),
    ("server_lr", "fast", "'server_lr' must be of type float"),
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
