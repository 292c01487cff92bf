"""The centralized baseline: the same model and optimizer trained on the union of all shards.

Run by rank 0 before the first round. The result (accuracy per epoch) is cached beside the
shard file under a hash of everything that determines it, so a rerun does not retrain it.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

from ..config import Config
from ..data.files import read_text, reason, remove_quietly
from ..errors import DataError
from .evaluate import accuracy_loss
from .losses import loss_function
from .models import build_model
from .params import flatten, model_tensors, views
from .sequential import CENTRAL_STREAM, batch_generator, sgd_epochs

CACHE_KEYS = ("model", "central_epochs", "lr", "momentum", "batch_size", "seed")
USER_KEYS = (("model_args", {}), ("loss", "cross_entropy"))  # keyed only when set: built-in runs keep their caches
MAX_CACHE_BYTES = 1 << 20  # a cache holds two floats per epoch


def cache_path(cfg: Config) -> Path:
    user = tuple(k for k, default in USER_KEYS if getattr(cfg, k) != default)
    key = cfg.digest(CACHE_KEYS + ("dataset", "partition", "nodes", "samples_per_node") + user)
    if cfg.dataset == "file":  # a file imported again under the same name holds other data
        st = os.stat(cfg.data_path)
        key = hashlib.sha256(f"{key}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cfg.data_path.with_name(f"{cfg.data_path.stem}.central-{key}.json")


def load_cached(cfg: Config) -> Optional[dict]:
    """The cached baseline, or None when there is none or it is not one (then it is trained again)."""
    path = cache_path(cfg)
    if not os.path.lexists(path):  # a dangling link or a FIFO is refused by read_text below
        return None
    try:
        result = json.loads(read_text(path, "baseline cache", MAX_CACHE_BYTES))
    except (DataError, ValueError, RecursionError):  # not a regular file, too large, not JSON
        return None
    return result if is_baseline(result, cfg.central_epochs) else None


def is_baseline(result, epochs: int) -> bool:
    """Whether `result` has the shape train_central returns: an accuracy in [0, 1] and a loss per epoch."""
    if not isinstance(result, dict) or not all(isinstance(result.get(k), list) for k in ("test_acc", "test_loss")):
        return False
    values = result["test_acc"] + result["test_loss"]
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    return (numbers and len(result["test_acc"]) == len(result["test_loss"]) == epochs
            and all(0 <= v <= 1 for v in result["test_acc"]) and isinstance(result.get("samples"), int))


def write_cache(path: Path, result: dict) -> None:
    """Write atomically; when the data directory cannot take it (read-only, full), say so and go on."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(result))
        os.replace(tmp, path)
    except OSError as err:
        print(f"fedmpi: note: baseline cache {path} not written ({reason(err)}); it is trained again next time",
              file=sys.stderr, flush=True)
    finally:
        remove_quietly(tmp)


def train_central(cfg: Config, x: torch.Tensor, y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                  input_shape: tuple, classes: int, tick: Optional[Callable[[], None]] = None) -> dict:
    """Train for cfg.central_epochs, scoring the test set after each epoch; `tick()` before each step."""
    model = build_model(cfg.model, input_shape, classes, cfg.seed, cfg.model_args).to(x.device)
    loss_fn = loss_function(cfg.loss)
    params = list(model.parameters())
    bufs = views(torch.zeros(sum(p.numel() for p in params), device=x.device), params)
    gen = batch_generator(cfg.seed, 0, 0, stream=CENTRAL_STREAM)
    accs, losses = [], []
    for _ in range(cfg.central_epochs):
        if hasattr(x, "epoch"):  # rows streamed from the file (data/shuffled.py): told the epoch's order first
            ahead = torch.Generator()
            ahead.set_state(gen.get_state())
            x.epoch(torch.randperm(len(y), generator=ahead))
        sgd_epochs(model, bufs, x, y, 1, cfg.batch_size, cfg.lr, cfg.momentum, gen, tick=tick, loss_fn=loss_fn)
        acc, loss = accuracy_loss(model, flatten(model_tensors(model)), test_x, test_y, loss_fn)
        accs.append(acc)
        losses.append(loss)
    return {"test_acc": accs, "test_loss": losses, "samples": len(y), "epochs": cfg.central_epochs}


def central_baseline(cfg: Config, load_train: Callable[[], tuple], test_x: torch.Tensor, test_y: torch.Tensor,
                     input_shape: tuple, classes: int, tick: Optional[Callable[[], None]] = None) -> dict:
    """The cached result when there is one, else train and cache it (written atomically).

    `load_train` returns the union of all shards (on the device, or streamed from the file in each
    epoch's order: data/shuffled.py); it is called only when training, so a rerun with a cached
    baseline never reads the training set.
    """
    cached = load_cached(cfg)
    if cached is not None:
        return dict(cached, cached=True)
    result = train_central(cfg, *load_train(), test_x, test_y, input_shape, classes, tick)
    write_cache(cache_path(cfg), result)
    return dict(result, cached=False)
