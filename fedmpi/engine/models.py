"""Models built deterministically from a seed: the two of the FedAvg literature, or a user's builder."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..errors import ConfigError
from ..plugins import describe, load


def mlp_2nn(input_shape: tuple[int, ...], classes: int) -> nn.Module:
    """The tutorial's 2NN: 784-200-200-10 with ReLU (199,210 parameters on MNIST)."""
    n_in = 1
    for d in input_shape:
        n_in *= d
    return nn.Sequential(nn.Flatten(), nn.Linear(n_in, 200), nn.ReLU(), nn.Linear(200, 200), nn.ReLU(),
                         nn.Linear(200, classes))


def cnn(input_shape: tuple[int, ...], classes: int) -> nn.Module:
    """McMahan et al.'s CNN: two 5x5 convs (32, 64; same padding) each with 2x2 max-pool, FC 512, softmax."""
    channels, height, width = input_shape
    flat = 64 * (height // 4) * (width // 4)
    return nn.Sequential(
        nn.Conv2d(channels, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(flat, 512), nn.ReLU(), nn.Linear(512, classes))


BUILDERS = {"2nn": mlp_2nn, "cnn": cnn}


def build_model(name: str, input_shape: tuple[int, ...], classes: int, seed: int,
                args: Optional[dict] = None) -> nn.Module:
    """The same initial weights on every rank: built on the CPU from the seed alone.

    `name` is a built-in or an import path to `builder(input_shape=, classes=, **args) -> nn.Module`;
    whatever goes wrong with a user's builder is one ConfigError naming config key 'model' and the path.
    """
    builder = BUILDERS.get(name) or load("model", name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name in BUILDERS:
            return builder(tuple(input_shape), classes)
        try:
            model = builder(input_shape=tuple(input_shape), classes=classes, **(args or {}))
        except Exception as err:  # noqa: BLE001 - user code: whatever it raises is one line
            raise ConfigError(f"config key 'model' {name!r}: building the model raised {describe(err)}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"config key 'model' {name!r} returned a {type(model).__name__}, not a torch.nn.Module")
    params = list(model.parameters())
    if not params:
        raise ConfigError(f"config key 'model' {name!r} returned a {type(model).__name__} without parameters: "
                          f"there is nothing to train")
    odd = next((n for n, p in model.named_parameters() if p.dtype != torch.float32 or not p.requires_grad), None)
    if odd is not None:
        raise ConfigError(f"config key 'model' {name!r}: parameter {odd!r} must be a trainable float32 tensor "
                          f"(fedmpi trains and averages every parameter in float32)")
    return model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
