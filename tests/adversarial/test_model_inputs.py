"""Hostile model, loss and model_args values against the real `fedmpi run` under real mpirun.

Each case ends with exit code 2 and one `fedmpi: error` line naming the key and the path, no traceback,
no MPI_Abort, nothing written, at -n 1 and -n 3: the model and loss are tried on every rank before any
data is read (the shard file the config names does not exist, and is never made). The same for misuse
of the Python API from a user's script: the FedmpiError is raised on every rank alike.
"""
from __future__ import annotations

import compileall
import os
import subprocess
import sys

import pytest
from conftest import ROOT, mpi_env, mpirun_path
from test_config_inputs import RANKS, TIMEOUT, base, refused, snapshot
from usercode import write_user_code

CASES = [  # --set values, what the one line must say
    (["model=nosuchmodule:build"], "config key 'model' 'nosuchmodule:build': no module named 'nosuchmodule'"),
    (["model=usercode:missing"], "config key 'model' 'usercode:missing': usercode has no attribute 'missing'"),
    (["model=usercode:not_callable"], "'usercode:not_callable': not_callable is a int, not a function or class"),
    (["model=broken:build"], "'broken:build': importing broken raised ZeroDivisionError: broken on import"),
    (["model=../evil:build"], "config key 'model' must be 2nn, cnn or an import path package.module:callable"),
    (["model=usercode"], "config key 'model' must be 2nn, cnn or an import path"),
    (["model=usercode:raises"], "'usercode:raises': building the model raised RuntimeError: no weights for you"),
    (["model=usercode:returns_int"], "'usercode:returns_int' returned a int, not a torch.nn.Module"),
    (["model=usercode:no_params"], "'usercode:no_params' returned a Flatten without parameters"),
    (["model=usercode:wrong_outputs"], "must map inputs [2, 1, 28, 28] to outputs [2, 10]"),
    (["model=usercode:double"], "'usercode:double': parameter '1.weight' must be a trainable float32 tensor"),
    (["model=usercode:forward_fails"], "'usercode:forward_fails': the model's forward on inputs [2, 1, 28, 28] raised"),
    (["model=usercode:batchnorm_cumulative"], "batched engine stacks BatchNorm1d with a momentum"),
    (["model=usercode:dropout2d"], "batched engine cannot train a model with Dropout2d"),
    (["model=usercode:small", "model_args={width: 4, depth: 2}"],
     "'usercode:small': building the model raised TypeError: small() got an unexpected keyword argument 'depth'"),
    (["model=usercode:small", "model_args={classes: 3}"], "config key 'model_args': 'classes' is passed by fedmpi"),
    (["model=usercode:small", "model_args=[1, 2]"], "config key 'model_args' must be a mapping of names to values"),
    (["model=usercode:small", "model_args={width: {a: 1}}"], "config key 'model_args' entry 'width' must be a number"),
    (["model=usercode:small", "model_args={w: [" + ", ".join(["1"] * 65) + "]}"], "a list of 65 items, at most 64"),
    (["model=usercode:small", "model_args={w: " + "x" * 300 + "}"], "entry 'w' must be a text of at most 256"),
    (["model=usercode:small", "model_args={w: &a 1}"], "anchors and aliases"),
    (["model=2nn", "model_args={width: 4}"], "config key 'model_args' applies to an imported model"),
    (["model=os:system"], "config key 'model' 'os:system': building the model raised TypeError"),
    (["server_opt=nosuchmodule:Opt"], "config key 'server_opt' 'nosuchmodule:Opt': no module named 'nosuchmodule'"),
    (["server_opt=usercode:NotAnOptimizer"], "'usercode:NotAnOptimizer' is not a server optimizer (no method step"),
    (["server_opt=usercode:BadInit"], "'usercode:BadInit': creating it with lr=1.0 raised RuntimeError: no server"),
    (["server_opt=adam"], "config key 'server_opt' must be none, fedavgm, fedadam, fedyogi or an import path"),
    (["loss=nosuchmodule:f"], "config key 'loss' 'nosuchmodule:f': no module named 'nosuchmodule'"),
    (["loss=mse"], "config key 'loss' must be cross_entropy or an import path"),
    (["loss=usercode:loss_scalar"], "'usercode:loss_scalar' must return one loss per row (shape [2])"),
    (["loss=usercode:loss_raises"], "config key 'loss' 'usercode:loss_raises' raised ValueError: no loss today"),
    (["loss=usercode:loss_not_vmappable"], "config key 'engine': the batched engine trains model '2nn' with loss "
                                           "'usercode:loss_not_vmappable' under torch.func.vmap"),
]


@pytest.mark.parametrize("ranks", RANKS)
@pytest.mark.parametrize("values,expect", CASES, ids=[" ".join(v)[:40] for v, _ in CASES])
def test_bad_user_code_is_one_line_naming_key_and_path_before_any_data_is_read(tmp_path, ranks, values, expect):
    compileall.compile_dir(write_user_code(tmp_path), quiet=1)  # the run's imports then write no bytecode
    refused(base(tmp_path) + values + ["--out", "out"], ranks, tmp_path, expect)


API_SCRIPT = '''
import sys
import fedmpi
from conftest import SMALL

config = dict(item.split("=", 1) for item in SMALL)
config["data_file"] = "data/s.h5"


def build(input_shape, classes):
    from torch import nn
    return nn.Sequential(nn.Flatten(), nn.Linear(784, classes))


def raises(input_shape, classes):
    raise KeyError("width")


def scalar_loss(outputs, targets):
    return outputs.sum()


CASES = {
    "config_int": lambda: fedmpi.run(42, out="out"),
    "lambda_model": lambda: fedmpi.run(config, model=lambda input_shape, classes: build(input_shape, classes)),
    "model_not_callable": lambda: fedmpi.run(config, model=5, out="out"),
    "unknown_key": lambda: fedmpi.run(config, nosuchkey=1, out="out"),
    "unknown_key_config": lambda: fedmpi.run(fedmpi.Config(**config), nosuchkey=1, out="out"),
    "resume_with_out": lambda: fedmpi.run(resume="out", out="out"),
    "resume_nothing": lambda: fedmpi.run(resume="nowhere"),
    "model_raises": lambda: fedmpi.run(config, model=raises, out="out"),
    "loss_scalar": lambda: fedmpi.run(config, model=build, loss=scalar_loss, out="out"),
    "model_args_object": lambda: fedmpi.run(config, model=build, model_args={"x": object()}, out="out"),
    "model_args_nan": lambda: fedmpi.run(config, model=build, model_args={"x": float("nan")}, out="out"),
    "config_missing": lambda: fedmpi.run("nowhere.yaml", out="out"),
    "server_opt_not_a_class": lambda: fedmpi.run(config, server_opt=3.5, out="out"),
    "server_opt_no_interface": lambda: fedmpi.run(config, server_opt=dict, out="out"),
}
try:
    CASES[sys.argv[1]]()
except fedmpi.FedmpiError as err:
    if fedmpi.world_rank() == 0:
        print(f"fedmpi: error: {err}", file=sys.stderr)
    sys.exit(err.exit_code)
print("no error")
'''
API_CASES = [
    ("config_int", "config must be a Config, a dict or the path of a YAML file, got int"),
    ("lambda_model", "model=: '__main__:<lambda>.<locals>.<lambda>' has no module-level name (a lambda"),
    ("model_not_callable", "model=: expected a function or class, got int"),
    ("unknown_key", "unknown config key 'nosuchkey'"),
    ("unknown_key_config", "unknown config key 'nosuchkey'"),
    ("resume_with_out", "resume=RUN_DIR continues the run there with its own config.yaml: drop config, out"),
    ("resume_nothing", "resume='nowhere': no config.yaml there"),
    ("model_raises", "config key 'model' '__main__:raises': building the model raised KeyError: 'width'"),
    ("loss_scalar", "config key 'loss' '__main__:scalar_loss' must return one loss per row"),
    ("model_args_object", "config key 'model_args' entry 'x' must be a number, true/false, a text or a list"),
    ("model_args_nan", "config key 'model_args' entry 'x' must be finite, got nan"),
    ("config_missing", "cannot read config file nowhere.yaml"),
    ("server_opt_not_a_class", "server_opt=: expected a function or class, got float"),
    ("server_opt_no_interface", "config key 'server_opt' 'builtins:dict' is not a server optimizer (no method step"),
]


@pytest.mark.parametrize("ranks", RANKS)
@pytest.mark.parametrize("case,expect", API_CASES, ids=[c for c, _ in API_CASES])
def test_api_misuse_raises_one_error_on_every_rank_and_writes_nothing(tmp_path, ranks, case, expect):
    (tmp_path / "experiment.py").write_text(API_SCRIPT)
    before = snapshot(tmp_path)
    cmd = [mpirun_path(), "-n", str(ranks), sys.executable, "experiment.py", case]
    env = dict(os.environ, **mpi_env(), PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=tmp_path)
    errors = [line for line in result.stderr.splitlines() if line.startswith("fedmpi: error")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr + result.stdout
    assert expect in errors[0], errors[0]
    assert "Traceback" not in result.stderr and "Abort(" not in result.stderr + result.stdout
    assert snapshot(tmp_path) == before, sorted(snapshot(tmp_path) - before)
