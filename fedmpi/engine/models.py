"""The two models of the FedAvg literature on MNIST, built deterministically from a seed."""
from __future__ import annotations

import torch
from torch import nn


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


def build_model(name: str, input_shape: tuple[int, ...], classes: int, seed: int) -> nn.Module:
    """The same initial weights on every rank: built on the CPU from the seed alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BUILDERS[name](tuple(input_shape), classes)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
