"""ConvKernel (one autograd pass per node) trains exactly as VmapKernel, and takes the convolutional models."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from fedmpi.engine.batched import BatchedEngine
from fedmpi.engine.conv import ConvKernel, fits_conv_kernel
from fedmpi.engine.models import build_model
from fedmpi.engine.params import flatten
from fedmpi.engine.plan import make_plan
from fedmpi.engine.vmap import VmapKernel

SHAPE = (1, 12, 12)
TOL = 1e-6  # float32: a few ulps, as the batched-vs-sequential tests


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def data(counts):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(sum(counts), *SHAPE, generator=gen)
    y = torch.randint(0, 10, (sum(counts),), generator=gen)
    return x, y, np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


@pytest.mark.parametrize("counts,mu,with_corr", [([37, 13, 0, 20], 0.0, False), ([37, 13, 0, 20], 0.1, True),
                                                 ([16, 16], 0.1, False), ([16, 16], 0.0, True)])
def test_conv_kernel_matches_vmap_kernel(counts, mu, with_corr):
    """Short batches, a node without data, nodes sitting steps out, every node stepping: same results."""
    x, y, offsets = data(counts)
    model = build_model("cnn", SHAPE, 10, seed=1)
    cfg = SimpleNamespace(seed=7, local_epochs=2, batch_size=8)
    plan = make_plan(offsets, np.arange(len(counts)), 0, cfg, 1, x.device, x.dtype)
    assert plan.full.all() == (0 not in counts)  # both update branches are covered
    main = flatten(list(model.parameters()))
    corr = torch.randn(len(counts), main.numel(), generator=torch.Generator().manual_seed(3)) * 1e-3 \
        if with_corr else None
    out = {}
    for cls in (VmapKernel, ConvKernel):
        mom = torch.zeros(len(counts), main.numel())
        params = cls(model).run(main, mom, x, y, plan, 0.01, 0.9, mu, corr=corr)
        out[cls] = params, mom
    (p_v, m_v), (p_c, m_c) = out[VmapKernel], out[ConvKernel]
    assert float((p_c - p_v).abs().max() / p_v.abs().max()) <= TOL
    assert float((m_c - m_v).abs().max() / m_v.abs().max()) <= TOL
    assert not torch.equal(p_c[0], main)
    assert all(torch.equal(p_c[k], main) for k, n in enumerate(counts) if n == 0)  # an empty node keeps main


def test_the_cnn_takes_the_conv_kernel_and_stateful_or_convless_models_do_not():
    x, y, offsets = data([16, 16])
    cfg = SimpleNamespace(seed=0, local_epochs=1, batch_size=8, lr=0.01, momentum=0.9, chunk_nodes=2, prox_mu=0.0)
    assert isinstance(BatchedEngine(build_model("cnn", SHAPE, 10, 0), x, y, offsets, 0, cfg).kernel, ConvKernel)
    assert not fits_conv_kernel(nn.Sequential(nn.Flatten(), nn.Linear(144, 10), nn.Tanh()))
    assert not fits_conv_kernel(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)))
    assert not fits_conv_kernel(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Dropout()))
    assert fits_conv_kernel(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten()))
