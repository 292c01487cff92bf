"""The user's model and loss tried once on every rank before any data is read: bad code fails in seconds."""
from __future__ import annotations

import math

import torch

from ..config import MODELS, SERVER_OPTS, Config
from ..errors import ConfigError
from ..plugins import describe
from .losses import loss_function
from .models import build_model

# What each built-in dataset gives a model: input shape and classes (data/sources.py).
DATASET_INPUTS = {"mnist": ((1, 28, 28), 10), "fashion-mnist": ((1, 28, 28), 10), "cifar10": ((3, 32, 32), 10),
                  "synthetic": ((1, 28, 28), 10)}
MAX_TRIAL_INPUTS = 1 << 24  # values of the trial batch: a malformed shape is refused later, by validation


def data_inputs(cfg: Config):
    """(input shape, classes) of the run's data from the dataset name or the shard file's attributes; None
    when the file's are malformed (the shard file's validation then names the attribute)."""
    if cfg.dataset != "file":
        return DATASET_INPUTS[cfg.dataset]
    from ..data.shards import read_attrs

    attrs = read_attrs(cfg.data_path)
    shape, classes = attrs.get("input_shape"), attrs.get("classes")
    plain = isinstance(shape, list) and all(isinstance(d, int) and d > 0 for d in shape)
    if not plain or not isinstance(classes, int) or classes < 2 or math.prod(shape) > MAX_TRIAL_INPUTS:
        return None
    return tuple(shape), classes


def try_stacked(cfg: Config, model: torch.nn.Module, shape: tuple) -> None:
    """One vmapped gradient of the batched engine's generic path on two zero rows: model or loss code that
    vmap cannot batch (`.item()`, data-dependent branches) is refused now, not in the first round."""
    from .vmap import VmapKernel

    grads = VmapKernel(model, None, loss_function(cfg.loss))._grads()
    params = {n: p.detach()[None] for n, p in model.named_parameters()}
    buffers = {n: b.detach()[None] for n, b in model.named_buffers() if b.is_floating_point()}
    try:
        grads(params, buffers, {}, torch.zeros(1, 2, *shape), torch.zeros(1, 2, dtype=torch.int64),
              torch.full((1, 2), 0.5), False)
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - user code: whatever it raises is one line
        raise ConfigError(f"config key 'engine': the batched engine trains model {cfg.model!r} with loss "
                          f"{cfg.loss!r} under torch.func.vmap, which raised {describe(err)}; make them "
                          f"vmap-compatible or set engine: sequential") from None


def check_user_code(cfg: Config) -> None:
    """Build an imported model and run it (and an imported loss) on a batch of two zero inputs."""
    if cfg.server_opt not in SERVER_OPTS:
        from ..fl.server import from_config

        from_config(cfg)
    if cfg.model in MODELS and cfg.loss == "cross_entropy":
        return  # the built-ins: nothing to try, and no torch import for the cheap checks
    inputs = data_inputs(cfg)
    if inputs is None:
        return
    shape, classes = inputs
    model = build_model(cfg.model, shape, classes, cfg.seed, cfg.model_args)
    with torch.no_grad():
        try:
            outputs = model(torch.zeros(2, *shape))
        except Exception as err:  # noqa: BLE001 - user code: whatever it raises is one line
            raise ConfigError(f"config key 'model' {cfg.model!r}: the model's forward on inputs {[2, *shape]} "
                              f"raised {describe(err)}") from None
        if not isinstance(outputs, torch.Tensor) or tuple(outputs.shape) != (2, classes):
            got = list(outputs.shape) if isinstance(outputs, torch.Tensor) else type(outputs).__name__
            raise ConfigError(f"config key 'model' {cfg.model!r}: the model must map inputs {[2, *shape]} to "
                              f"outputs [2, {classes}] (one score per class), got {got}")
        loss = loss_function(cfg.loss)
        if loss is not None:
            try:
                loss(outputs, torch.zeros(2, dtype=torch.int64))
            except ConfigError:
                raise
            except Exception as err:  # noqa: BLE001
                raise ConfigError(f"config key 'loss' {cfg.loss!r} raised {describe(err)} on outputs "
                                  f"[2, {classes}] and targets [2]") from None
    if cfg.engine == "batched":
        from .batched import check_stackable

        check_stackable(model)
        try_stacked(cfg, model, shape)
