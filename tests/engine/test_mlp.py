"""The MLP kernel's bfloat16 shadow weights: the matmuls read the master weights of the current step."""
import torch

from fedmpi.engine.mlp import MLPKernel, mlp_layers
from fedmpi.engine.models import build_model
from fedmpi.engine.params import flatten
from fedmpi.engine.plan import Plan


def plan_of(steps, nodes, batch, rows, seed=0):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, rows, (steps, nodes, batch), generator=gen)
    return Plan(idx, torch.full((steps, nodes, batch), 1.0 / batch), torch.ones(steps, nodes),
                torch.ones(steps, dtype=torch.bool).numpy())


def first(plan, s, e):
    return Plan(plan.idx[s:e], plan.weight[s:e], plan.active[s:e], plan.full[s:e])


def kernel_run(dtype, steps=4):
    torch.manual_seed(0)
    model = build_model("2nn", (1, 28, 28), 10, seed=0)
    x, y = torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,))
    kernel = MLPKernel(model, mlp_layers(model), dtype)
    return kernel, flatten(list(model.parameters())), x, y, plan_of(steps, 1, 8, len(x))


def test_shadow_weights_follow_the_master_every_step():
    """Four bf16 steps in one run equal two runs of two steps, the second starting from fresh shadows
    of the first's result: the shadows must be refreshed after each parameter pass, not kept stale."""
    kernel, main, x, y, plan = kernel_run(torch.bfloat16)
    mom = torch.zeros(1, main.numel())
    whole = kernel.run(main, mom, x, y, plan, lr=0.5, m=0.9)
    mom2 = torch.zeros(1, main.numel())
    half = kernel.run(main, mom2, x, y, first(plan, 0, 2), lr=0.5, m=0.9)
    again = kernel.run(half[0], mom2, x, y, first(plan, 2, 4), lr=0.5, m=0.9)
    assert torch.equal(whole, again) and torch.equal(mom, mom2)
    assert whole.dtype == mom.dtype == torch.float32 and not torch.equal(whole[0], half[0])


def test_bf16_matmuls_round_but_keep_to_float32s_path():
    """bf16 differs from float32 (the matmuls did run in bfloat16) by far less than the update itself."""
    kernel, main, x, y, plan = kernel_run(torch.bfloat16)
    bf16 = kernel.run(main, torch.zeros(1, main.numel()), x, y, plan, lr=0.05, m=0.9)[0]
    kernel32 = kernel_run(None)[0]
    fp32 = kernel32.run(main, torch.zeros(1, main.numel()), x, y, plan, lr=0.05, m=0.9)[0]
    moved = float((bf16 - fp32).norm() / (fp32 - main).norm())
    assert 1e-3 < moved < 0.12, moved  # measured 0.06; stale shadows: 0.27
