"""Scoring a flat parameter vector on data: whole test set, or per node via segment sums."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .losses import Loss
from .params import float_buffer_names, model_tensors, views, views_k

EVAL_BATCH = 2048


@contextmanager
def scoring(model: nn.Module) -> Iterator[None]:
    """model.eval() while scoring (Dropout off, BatchNorm on its running statistics), its mode restored after."""
    training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(training)


def tensor_names(model: nn.Module) -> list[str]:
    """Names of model_tensors(model), for functional_call."""
    return [n for n, _ in model.named_parameters()] + float_buffer_names(model)


@torch.no_grad()
def predict_stats(model: nn.Module, flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                  loss_fn: Optional[Loss] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample correctness (bool) and loss (`loss_fn`, cross-entropy when None) with the main vector `flat`
    (parameters, then float buffers: BatchNorm scores with the running statistics it carries)."""
    params = dict(zip(tensor_names(model), views(flat, model_tensors(model))))
    correct, losses = [], []
    for start in range(0, len(y), EVAL_BATCH):
        with scoring(model):
            logits = functional_call(model, params, (x[start:start + EVAL_BATCH],))
        target = y[start:start + EVAL_BATCH]
        correct.append(logits.argmax(1) == target)
        losses.append(F.cross_entropy(logits, target, reduction="none") if loss_fn is None
                      else loss_fn(logits, target))
    if not correct:
        empty = torch.zeros(0, device=x.device)
        return empty.bool(), empty
    return torch.cat(correct), torch.cat(losses)


def accuracy_loss(model: nn.Module, flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                  loss_fn: Optional[Loss] = None) -> tuple[float, float]:
    """Accuracy and mean loss (`loss_fn`, cross-entropy when None) over the whole of (x, y)."""
    correct, losses = predict_stats(model, flat, x, y, loss_fn)
    return correct.float().mean().item(), losses.mean().item()


def per_node_accuracy(model: nn.Module, flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                      offsets: np.ndarray) -> np.ndarray:
    """Accuracy of one model on each node's rows offsets[i]:offsets[i+1] (NaN for an empty split)."""
    correct = predict_stats(model, flat, x, y)[0].double().cpu().numpy()
    cumulative = np.concatenate([[0.0], np.cumsum(correct)])
    sums = cumulative[offsets[1:]] - cumulative[offsets[:-1]]
    counts = np.diff(offsets)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


@torch.no_grad()
def stacked_accuracy(model: nn.Module, params: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                     starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Accuracy of K models at once, params[j] ([K, P]) on its own rows starts[j]:starts[j]+counts[j]
    (NaN for an empty split): one vmapped forward over rows padded to the longest split, instead
    of K small forwards (about 2 ms of fixed cost each: 0.2 s of a 5 s tutorial round in all)."""
    starts, counts = np.asarray(starts, dtype=np.int64), np.asarray(counts, dtype=np.int64)
    width = int(counts.max()) if len(counts) else 0
    if width == 0:
        return np.full(len(counts), np.nan)
    slot = np.arange(width)
    real = slot[None, :] < counts[:, None]
    rows = torch.from_numpy(np.where(real, starts[:, None] + slot[None, :], 0)).to(x.device)  # padding: row 0
    names, like = tensor_names(model), model_tensors(model)
    stacked = {n: v.reshape(len(params), *t.shape) for n, v, t in zip(names, views_k(params, like), like)}
    with scoring(model):
        logits = torch.vmap(lambda p, xb: functional_call(model, p, (xb,)))(stacked, x[rows])
    hits = ((logits.argmax(-1) == y[rows]) & torch.from_numpy(real).to(x.device)).sum(1).double().cpu().numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, hits / np.maximum(counts, 1), np.nan)
