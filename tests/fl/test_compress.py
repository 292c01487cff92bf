"""Compressed updates: encode/decode error bounds, the half-precision adds, and real fp16/bf16 Allreduces."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, mpi_env, mpirun_path

from fedmpi.fl.compress import (
    UNIT_ROUNDOFF,
    CountCode,
    bf16_add_into,
    bytes_saved,
    count_code,
    decode,
    decode_count,
    encode,
    encode_count,
    f32_to_bf16,
    fp16_add_into,
    payload_bytes,
)


def update_like(n=200_000, seed=0):
    """Update-sized values over many magnitudes, including ones below fp16's normal range."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * 10.0 ** torch.randint(-8, 0, (n,), generator=g).float()


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_round_trip_error_is_within_half_an_ulp(dtype):
    x = update_like()
    back = decode(encode(x, dtype), dtype)
    assert back.dtype == torch.float32 and back.shape == x.shape
    err = (back - x).abs()
    bound = UNIT_ROUNDOFF[dtype] * x.abs()
    if dtype == "fp16":  # below 2^-14 fp16 is subnormal: steps of 2^-24, so at most 2^-25 off
        bound = torch.where(x.abs() < 2.0 ** -14, torch.full_like(x, 2.0 ** -25), bound)
    assert bool((err <= bound).all())
    assert dtype == "fp32" or err.max() > 0  # the bound is not vacuous


def test_encoded_bits_worked_out_by_hand():
    # 1.0 is 0x3F800000 in float32: bf16 keeps the top half 0x3F80; fp16 writes it 0x3C00.
    # 0.1 is 0x3DCCCCCD: the dropped half 0xCCCD > 0x8000 rounds up, so bf16 0x3DCD.
    assert encode(torch.tensor([1.0, 0.1]), "bf16").tolist() == [0x3F80, 0x3DCD]
    assert encode(torch.tensor([1.0]), "fp16").view(np.uint16).tolist() == [0x3C00]
    assert encode(torch.tensor([1.0]), "bf16").dtype == np.uint16 and encode(torch.ones(1), "fp16").dtype == np.float16


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_the_buffer_never_aliases_the_update(dtype):
    x = torch.ones(4)
    encode(x, dtype)[:] = 0  # the Allreduce sums into the buffer in place
    assert x.tolist() == [1.0] * 4


def test_fp16_overflow_is_refused_rather_than_sent_as_inf():
    with pytest.raises(OverflowError, match="beyond fp16's range"):
        encode(torch.tensor([1.0, 70000.0]), "fp16")
    assert decode(encode(torch.tensor([3e38]), "bf16"), "bf16").item() == pytest.approx(3e38, rel=2 ** -8)


def test_numpy_bf16_rounding_matches_torch_including_edges():
    x = torch.cat([update_like(10_000), torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 3.4e38, -3.4e38,
                                                      1e-40, 1.00390625, 1.01171875])])
    want = x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(f32_to_bf16(x.numpy()), want)
    assert np.isnan(decode(f32_to_bf16(np.array([np.nan], np.float32)), "bf16").numpy()).all()


def test_half_precision_adds_round_to_nearest_even():
    # bf16: 1 + 2^-8 lies halfway between 1 (0x3F80) and 1 + 2^-7 (0x3F81): ties go to even, 0x3F80.
    # 1 + 2^-7 is exact: 0x3F81.  Summing the bit patterns as integers would give 0x3F80 + 0x3B80 = 0x7B00.
    inout = np.array([0x3F80, 0x3F80], np.uint16)
    bf16_add_into(np.array([0x3B80, 0x3C00], np.uint16), inout)  # + 2^-8, + 2^-7
    assert inout.tolist() == [0x3F80, 0x3F81]
    # fp16: 1 + 2^-11 ties to 1.0 (0x3C00); 60000 + 10000 overflows to inf (0x7C00).
    inout = np.array([0x3C00, 0], np.uint16)
    inout[1:].view(np.float16)[:] = 60000
    fp16_add_into(np.array([2.0 ** -11, 10000], np.float16).view(np.uint16), inout)
    assert inout.tolist() == [0x3C00, 0x7C00]


def test_payload_bytes_and_savings_for_the_2nn():
    assert payload_bytes(199_210, "fp32") == 796_840
    assert payload_bytes(199_210, "fp16") == payload_bytes(199_210, "bf16") == 398_420
    assert bytes_saved(199_210, "bf16") == 398_420 and bytes_saved(199_210, "fp32") == 0
    with pytest.raises(ValueError, match="unknown update dtype 'int8'"):
        payload_bytes(10, "int8")


SCRIPT = """
import hashlib, json, numpy as np, torch
from mpi4py import MPI
from fedmpi.runtime.comm import reduction_for, world
from fedmpi.fl.compress import decode, encode
comm, r, out = world(), MPI.COMM_WORLD.rank, {}
exact = torch.tensor([1.0, r + 0.5, -0.25 * r, 2.0 ** -10 * (r + 1)])  # every partial sum is exact in fp16 and bf16
noisy = torch.from_numpy(np.random.default_rng(r).normal(0, 1e-3, 100_000).astype(np.float32))
for dtype in ("fp32", "fp16", "bf16"):
    for builtin in (True, False):
        key = f"{dtype}-{'builtin' if builtin else 'userop'}"
        assert builtin is False or comm.reduction_name(dtype) == reduction_for(MPI, dtype)[2]
        datatype, op, how = reduction_for(MPI, dtype, builtin)
        res = []
        for x in (exact, noisy):
            buf = encode(x, dtype)
            if builtin:
                comm.allreduce_sum(buf, dtype)  # the path the round loop takes
            else:
                MPI.COMM_WORLD.Allreduce(MPI.IN_PLACE, [buf, datatype], op=op)
            res.append(decode(buf, dtype).double())
        ref = sum(torch.from_numpy(np.random.default_rng(k).normal(0, 1e-3, 100_000).astype(np.float32)).double()
                  for k in range(MPI.COMM_WORLD.size))
        same = len(set(MPI.COMM_WORLD.allgather(hashlib.sha256(res[1].numpy().tobytes()).hexdigest()))) == 1
        out[key] = dict(how=how, exact=res[0].tolist(), rel_err=float((res[1] - ref).norm() / ref.norm()), same=same)
bits = encode(exact, "bf16")
MPI.COMM_WORLD.Allreduce(MPI.IN_PLACE, bits, op=MPI.SUM)  # the pitfall: uint16 bit patterns added as integers
out["bf16-as-uint16"] = decode(bits, "bf16").tolist()
if r == 0:
    print(json.dumps(out))
"""


@pytest.mark.parametrize("ranks", [2, 3])
def test_real_allreduce_of_half_precision_buffers(ranks):
    proc = subprocess.run([mpirun_path(), "-n", str(ranks), sys.executable, "-c", SCRIPT], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, **mpi_env(), PYTHONPATH=str(ROOT)), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    n = ranks
    want = [n, n * n / 2, -0.25 * n * (n - 1) / 2, 2.0 ** -10 * n * (n + 1) / 2]  # 1s, sum of r+0.5, ...
    for key in ("fp32-builtin", "fp16-builtin", "fp16-userop", "bf16-builtin", "bf16-userop"):
        row = out[key]
        assert row["exact"] == want, key
        assert row["same"], key  # every rank holds the same bits: the main models cannot drift apart
        dtype = key.split("-")[0]
        assert row["rel_err"] <= 2 * ranks * UNIT_ROUNDOFF[dtype], key  # encode + one rounding per add
    assert out["bf16-as-uint16"] != want


# --- the dropped count in the trailer: exact digits ---------------------------------------------------

def mpi_sum(bufs, dtype):
    """What a half-precision Allreduce(SUM) computes: one rounding per add (the user op's arithmetic)."""
    acc = np.array(bufs[0]).view(np.uint16).copy()
    add = fp16_add_into if dtype == "fp16" else bf16_add_into
    for b in bufs[1:]:
        add(np.array(b).view(np.uint16), acc)
    return acc.view(np.float16) if dtype == "fp16" else acc


@pytest.mark.parametrize("dtype,ranks,most,code", [
    ("fp16", 4, 25, CountCode(groups=1, base=513, digits=1)),    # 4 x 512 = 2048: every slot sum exact
    ("bf16", 4, 25, CountCode(groups=1, base=65, digits=1)),     # 4 x 64 = 256
    ("bf16", 4, 64, CountCode(groups=1, base=65, digits=1)),
    ("bf16", 4, 65, CountCode(groups=1, base=65, digits=2)),     # 65 itself needs a second digit
    ("bf16", 4, 250, CountCode(groups=1, base=65, digits=2)),    # 65 <= 250 < 65^2
    ("bf16", 300, 3, CountCode(groups=2, base=2, digits=2)),     # 150 ranks a group, bits
    ("fp16", 1, 2048, CountCode(groups=1, base=2049, digits=1)),
])
def test_count_code_worked_out_by_hand(dtype, ranks, most, code):
    assert count_code(dtype, ranks, most) == code


def test_digits_round_trip_and_refuse_what_they_cannot_hold():
    code = CountCode(groups=2, base=3, digits=2)
    assert encode_count(7, 1, code).tolist() == [0, 0, 1, 2]  # rank 1 -> group 1; 7 = 1 + 2 * 3
    assert decode_count(encode_count(7, 1, code) + encode_count(5, 2, code), code) == 12
    with pytest.raises(ValueError, match="outside 0..8"):
        encode_count(9, 0, code)


@pytest.mark.parametrize("dtype,counts", [
    ("bf16", [100, 100, 101]),            # 301: bf16 steps by 2 above 256, a plain slot reads 300
    ("fp16", [601, 600, 600, 600]),       # 2401: fp16 steps by 2 above 2048, a plain slot reads 2400
    ("bf16", [1] * 300),                  # more ranks than bf16's exact integers: two groups
])
def test_counts_beyond_the_formats_exact_integers_sum_exactly(dtype, counts):
    plain = decode(mpi_sum([encode(torch.tensor([float(c)]), dtype) for c in counts], dtype), dtype).item()
    assert plain != sum(counts)  # the case is real: one slot per count would be off
    code = count_code(dtype, len(counts), max(counts))
    slots = [encode(torch.from_numpy(encode_count(c, r, code)), dtype) for r, c in enumerate(counts)]
    assert decode_count(decode(mpi_sum(slots, dtype), dtype).numpy(), code) == sum(counts)
