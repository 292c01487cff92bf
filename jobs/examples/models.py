"""A user's own model for fedmpi: a small CNN with BatchNorm and Dropout.

Named in a config by its import path (`model: models:small_cnn`, run from jobs/examples/ or with
jobs/examples on PYTHONPATH); `model_args` become its keyword arguments beside `input_shape`
and `classes`, which fedmpi passes from the shard file. Both engines train it: BatchNorm's running
statistics follow `buffers:` (average or local), Dropout's masks are drawn per node from (seed, node, round).
"""
from torch import nn


def small_cnn(input_shape, classes, width=16, dropout=0.25):
    """Two 3x3 convs (width, 2*width) with BatchNorm, ReLU and 2x2 max-pool, then Dropout and a linear layer."""
    channels, height, width_px = input_shape
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(dropout), nn.Linear(2 * width * (height // 4) * (width_px // 4), classes))


def label_smoothing(outputs, targets):
    """Cross-entropy against targets smoothed by 0.1: one loss per row, as fedmpi's `loss:` expects."""
    return nn.functional.cross_entropy(outputs, targets, reduction="none", label_smoothing=0.1)
