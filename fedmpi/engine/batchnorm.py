"""BatchNorm for the batched engine: batch statistics over a node's real rows only, running statistics out.

Inside vmap each node sees its batch padded to the chunk's widest one; torch's BatchNorm would let the
padding rows into the mean and variance. This module computes them over the rows the step weights
(a node's real rows: exactly the batch the sequential engine gives torch's BatchNorm) and hands the
updated running statistics back as values (torch.func transforms cannot write buffers in place), as
torch does: running = (1 - momentum) * running + momentum * batch, the variance unbiased. A step
without padding rows (StepRows.dense) takes torch's fused batch norm instead: on the example CNN with
BatchNorm, sequential/batched s/round went from 0.82x (masked ops on every step) to 1.22x.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class StepRows:
    """What every MaskedBatchNorm of one model copy shares during a step: the row mask, and the new
    running statistics in forward order."""

    def __init__(self) -> None:
        self.mask: Optional[torch.Tensor] = None
        self.out: list[tuple[str, torch.Tensor]] = []
        self.noise: Optional[dict[str, torch.Tensor]] = None  # Dropout's masks for the node (engine/dropout.py)
        self.dense = False  # every row of every node real this step: torch's own fused kernel applies


class MaskedBatchNorm(nn.Module):
    """torch's BatchNorm{1,2,3}d in train mode with the batch statistics over the masked rows."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, prefix: str, rows: StepRows) -> None:
        super().__init__()
        self.eps, self.momentum, self.prefix, self.rows = bn.eps, bn.momentum, prefix, rows
        self.weight, self.bias = bn.weight, bn.bias  # same names: functional_call swaps them in
        self.register_buffer("running_mean", bn.running_mean.clone())
        self.register_buffer("running_var", bn.running_var.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rows.mask is None:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        shape = [1, -1] + [1] * (x.dim() - 2)
        dims = [0] + list(range(2, x.dim()))
        if self.rows.dense:
            return self._dense(x, dims)
        mask = self.rows.mask.reshape(-1, *[1] * (x.dim() - 1)).to(x.dtype)
        count = self.rows.mask.sum() * (x[0, 0].numel())
        mean = (x * mask).sum(dims) / count.clamp(min=1)
        centered = x - mean.reshape(shape)
        var = (centered * centered * mask).sum(dims) / count.clamp(min=1)  # biased, as torch normalizes with
        out = centered * torch.rsqrt(var + self.eps).reshape(shape)
        if self.weight is not None:
            out = out * self.weight.reshape(shape) + self.bias.reshape(shape)
        m, took = self.momentum, count > 0  # a node sitting the step out keeps its statistics
        unbiased = var.detach() * count / (count - 1).clamp(min=1)
        self.rows.out.append((self.prefix + "running_mean", torch.where(
            took, (1 - m) * self.running_mean + m * mean.detach(), self.running_mean)))
        self.rows.out.append((self.prefix + "running_var", torch.where(
            took, (1 - m) * self.running_var + m * unbiased, self.running_var)))
        return out


    def _dense(self, x: torch.Tensor, dims: list) -> torch.Tensor:
        """No padding: torch's batch norm (one fused forward and backward), the statistics recomputed detached."""
        out = F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        with torch.no_grad():
            var, mean = torch.var_mean(x.detach(), dim=dims, correction=1)  # unbiased, as torch keeps it
        m = self.momentum
        self.rows.out.append((self.prefix + "running_mean", (1 - m) * self.running_mean + m * mean))
        self.rows.out.append((self.prefix + "running_var", (1 - m) * self.running_var + m * var))
        return out


def check_batchnorm(module: nn.Module) -> bool:
    """Whether `module` is a BatchNorm the batched engine stacks; refuses the variants it does not."""
    if not isinstance(module, BATCHNORMS):
        return False
    if module.momentum is None or not module.track_running_stats:
        raise ConfigError(f"config key 'engine': the batched engine stacks {type(module).__name__} with a momentum "
                          f"and running statistics only (momentum=None, track_running_stats=False are not); "
                          f"set engine: sequential")
    return True


def masked_copy(model: nn.Module) -> tuple[nn.Module, StepRows]:
    """A deep copy of `model` with every BatchNorm replaced by a MaskedBatchNorm and every Dropout by a
    MaskedDropout, all sharing one StepRows."""
    from .dropout import MaskedDropout, is_dropout

    model, rows = copy.deepcopy(model), StepRows()
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if check_batchnorm(child):
                setattr(module, child_name, MaskedBatchNorm(child, full + ".", rows))
            elif is_dropout(child):
                setattr(module, child_name, MaskedDropout(child.p, full, rows))
    return model, rows
