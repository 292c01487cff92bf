"""Fixed-point updates in Z_{2^b}: the scale's overflow bound, the error bound, the same bits at any split."""
import math

import numpy as np
import pytest
import torch

from fedmpi.fl.privacy import clip_updates
from fedmpi.fl.ring import FixedPoint, from_ring, to_ring


def clipped_rows(k: int, p: int, clip: float, seed: int) -> torch.Tensor:
    """k updates of widely varying norms (some far beyond the clip), clipped."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(k, p, generator=gen) * torch.logspace(-3, 1, k)[:, None] * clip
    return clip_updates(rows, clip)[0]


@pytest.mark.parametrize("bits", [32, 64])
@pytest.mark.parametrize("clip,max_nodes", [(1.0, 1000), (0.1, 100), (5.0, 1), (3e-4, 10_000)])
def test_the_scale_is_the_finest_power_of_two_that_keeps_the_worst_sum_inside_the_signed_range(bits, clip, max_nodes):
    fp = FixedPoint(clip, max_nodes, bits)
    limit = 2 ** (bits - 1) - 1
    assert max_nodes * fp.saturation <= limit
    c32 = np.float32(clip)
    c32 = float(c32 if float(c32) <= clip else np.nextafter(c32, np.float32(0)))  # the largest float32 <= clip
    assert fp.saturation >= c32 * 2.0 ** fp.frac_bits  # no float32 inside the clip saturates
    assert max_nodes * (math.floor(clip * 2.0 ** (fp.frac_bits + 1)) + 1) > limit


@pytest.mark.parametrize("bits", [32, 64])
def test_decoded_sums_stay_within_the_error_bound(bits):
    fp = FixedPoint(clip=0.5, max_nodes=64, bits=bits)
    for seed, k in enumerate((1, 7, 64)):
        rows = clipped_rows(k, 2000, 0.5, seed)
        acc = np.zeros(2000, fp.dtype)
        fp.add_rows(acc, rows)
        exact = rows.double().sum(0).numpy()
        error = np.abs(fp.decode(acc, k) - exact)
        assert error.max() <= fp.error_bound(k) + 2.0 ** -52 * np.abs(exact).max()
        if bits == 32:  # the bound is not vacuous: 32-bit quantization does round
            assert error.max() > fp.error_bound(k) / 100


def test_the_worst_case_sum_does_not_wrap_around():
    """max_nodes updates with their whole norm on one coordinate, all the same sign: the extreme the bound allows."""
    for bits in (32, 64):
        fp = FixedPoint(clip=2.0, max_nodes=300, bits=bits)
        for sign in (1.0, -1.0):
            rows = torch.zeros(300, 3)
            rows[:, 1] = sign * 2.0
            acc = np.zeros(3, fp.dtype)
            fp.add_rows(acc, rows[:150])
            fp.add_rows(acc, rows[150:])  # two ranks' shares
            got = fp.decode(acc, 300)
            assert abs(got[1] - sign * 600.0) <= fp.error_bound(300) and got[0] == got[2] == 0.0


def test_the_ring_sum_is_the_same_bits_for_any_split_of_the_nodes_over_ranks_and_any_order():
    fp = FixedPoint(clip=1.0, max_nodes=12, bits=64)
    rows = clipped_rows(12, 500, 1.0, seed=3)

    def total(blocks):
        acc = np.zeros(500, fp.dtype)
        for block in blocks:
            part = np.zeros(500, fp.dtype)
            fp.add_rows(part, rows[block])
            np.add(acc, part, out=acc)
        return acc.tobytes()

    one = total([list(range(12))])
    assert total([list(range(6)), list(range(6, 12))]) == one
    assert total([[0, 1, 2, 3, 4], [5], [6, 7, 8, 9, 10, 11]]) == one
    assert total([[11, 3, 7], [0, 9, 2, 5], [10, 1, 8, 6, 4]]) == one


def test_values_past_the_clip_and_non_finite_values_saturate_instead_of_breaking_the_bound():
    fp = FixedPoint(clip=1.0, max_nodes=4, bits=32)
    at_clip = int(fp.quantize(torch.tensor([[1.0]]))[0, 0])
    assert at_clip == 2 ** fp.frac_bits <= fp.saturation  # the clip itself is inside the bound
    rows = torch.tensor([[1.0 + 1e-6, -5.0, float("inf"), float("-inf"), float("nan")]])
    q_max = fp.saturation
    assert fp.quantize(rows)[0].tolist() == [q_max, -q_max, q_max, -q_max, 0]
    assert torch.equal(fp.quantize(rows.double()), fp.quantize(rows))  # float32 and float64 paths agree


def test_quantization_of_a_float32_update_is_exact_in_the_64_bit_ring_for_values_above_its_resolution():
    fp = FixedPoint(clip=1.0, max_nodes=1000, bits=64)
    rows = clipped_rows(3, 1000, 1.0, seed=1)
    assert float(rows.abs().min()) > 2.0 ** -(fp.frac_bits - 24)  # float32 values there are multiples of 2^-f
    acc = np.zeros(1000, fp.dtype)
    fp.add_rows(acc, rows)
    assert np.array_equal(fp.decode(acc, 3), rows.double().sum(0).numpy())


def test_ring_conversion_keeps_signed_integers():
    for bits in (32, 64):
        values = [0, 1, -1, 2 ** 30, -(2 ** 31) if bits == 32 else -(2 ** 63), 12345]
        assert from_ring(to_ring(values, bits), bits).tolist() == values
    assert to_ring([-1], 32).tolist() == [2 ** 32 - 1] and to_ring([-1]).tolist() == [2 ** 64 - 1]


def test_bad_settings_and_buffers_are_refused():
    for kwargs, match in [(dict(clip=1.0, max_nodes=10, bits=16), "ring bits"),
                          (dict(clip=0.0, max_nodes=10), "clip"), (dict(clip=1.0, max_nodes=0), "max_nodes"),
                          (dict(clip=1.0, max_nodes=2 ** 30, bits=32), "cannot hold")]:
        with pytest.raises(ValueError, match=match):
            FixedPoint(**kwargs)
    fp = FixedPoint(clip=1.0, max_nodes=2)
    with pytest.raises(ValueError, match="accumulator"):
        fp.add_rows(np.zeros(3, np.uint32), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="rows must be"):
        fp.add_rows(np.zeros(3, np.uint64), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="overflow"):
        fp.decode(np.zeros(3, np.uint64), nodes=3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_quantization_on_a_gpu_gives_the_cpu_bits():
    fp = FixedPoint(clip=1.0, max_nodes=100, bits=32)
    rows = clipped_rows(20, 3000, 1.0, seed=2)
    on_gpu = fp.quantize(rows.cuda())
    assert on_gpu.is_cuda and torch.equal(on_gpu.cpu(), fp.quantize(rows))
