"""A shard file made from another config: the advice never says to overwrite a file that may be another config's."""
from pathlib import Path

import pytest
from conftest import SMALL, fedmpi

from fedmpi.config import Config
from fedmpi.data.prepare import mismatch_advice


def test_a_name_built_from_the_key_may_be_rewritten():
    cfg = Config(data_file="data/x-{seed}.h5")
    assert mismatch_advice(cfg, "seed") == "delete it, or rewrite it with `fedmpi prepare --force`"
    assert "--force" in mismatch_advice(Config(data_file="d/{nodes}.h5"), "num_nodes")  # the attribute's own name
    assert "--force" in mismatch_advice(cfg, "local_test_scheme")  # follows from partition: an older file


@pytest.mark.parametrize("template,attr,suggested", [
    ("data/mnist-balanced-100x450-seed0.h5", "dataset", "data/mnist-balanced-100x450-seed0-dataset{dataset}.h5"),
    ("data/x-{seed}.h5", "alpha", "data/x-{seed}-alpha{alpha}.h5"),
    ("data/x", "seed", "data/x-seed{seed}"),
    ("data.d/x", "num_nodes", "data.d/x-nodes{nodes}"),
])
def test_a_name_not_built_from_the_key_gets_a_placeholder_never_force(template, attr, suggested):
    advice = mismatch_advice(Config(data_file=template), attr)
    assert "--force" not in advice and f"--set data_file='{suggested}'" in advice
    assert Config(data_file=suggested).data_path != Config(data_file=template).data_path


def test_the_run_says_so_and_the_suggested_name_works(small_data, tmp_path):
    result = fedmpi(["run", "--set", *SMALL, small_data, "seed=1", "--out", str(tmp_path / "out")], ranks=2,
                    timeout=120)
    errors = [line for line in result.stderr.splitlines() if line.startswith("fedmpi: error")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr
    path = small_data.split("=", 1)[1]
    assert f"shard file {path} was made with seed=0, the config says 1" in errors[0]
    assert "--force" not in errors[0]
    suggested = errors[0].split("--set data_file='")[1].rstrip("'")
    assert suggested == path[:-len(".h5")] + "-seed{seed}.h5"
    prepared = fedmpi(["prepare", "--set", *SMALL, "seed=1", f"data_file={suggested}"], timeout=120)
    assert prepared.returncode == 0, prepared.stderr
    assert Path(suggested.format(seed=1)).exists() and Path(path).exists()  # a new file; the old one kept


def test_a_synthetic_file_of_another_shape_is_refused_and_the_shape_is_written(tmp_path):
    from fedmpi.data.prepare import check_matches, prepare
    from fedmpi.data.shards import read_attrs
    from fedmpi.errors import DataError

    cfg = Config(dataset="synthetic", nodes=4, samples_per_node=10, test_per_node=10, synthetic_shape="1x8x8",
                 data_file=str(tmp_path / "s-{synthetic_shape}.h5"))
    path = prepare(cfg)
    assert path.name == "s-1x8x8.h5" and list(read_attrs(path)["input_shape"]) == [1, 8, 8]
    other = Config(**{**cfg.to_dict(), "synthetic_shape": [1, 4, 4], "data_file": str(path)})
    try:
        check_matches(other, path)
    except DataError as err:
        assert "was made with input_shape=[1, 8, 8], the config says [1, 4, 4]" in str(err)
        assert "delete it, or rewrite it" not in str(err)  # the name does not say the shape: a placeholder is advised
    else:
        raise AssertionError("a file of another shape was accepted")
