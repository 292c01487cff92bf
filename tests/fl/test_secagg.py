"""Pairwise masking: the masks cancel exactly, a wrong key breaks the sum, a masked buffer looks uniform.

Parties are simulated in one process for the pure math (fixed private keys, so every test is
deterministic); one test runs the real key exchange and Allreduce under mpirun.
"""
import hashlib
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, mpi_env, mpirun_path
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from scipy import stats

from fedmpi.fl.ring import FixedPoint
from fedmpi.fl.secagg import CHUNK_BYTES, PairwiseMasks, add_keystream, keystream_into, pair_key, public_bytes


def private_keys(n: int, tag: str = "party") -> list:
    return [X25519PrivateKey.from_private_bytes(hashlib.sha256(f"{tag}{i}".encode()).digest()) for i in range(n)]


def parties(n: int, tag: str = "party") -> list:
    privates = private_keys(n, tag)
    publics = [public_bytes(p) for p in privates]
    return [PairwiseMasks.from_private_key(i, privates[i], publics) for i in range(n)]


def ring_sum(buffers: list) -> np.ndarray:
    return np.sum(np.stack(buffers), axis=0, dtype=buffers[0].dtype)  # unsigned: wraps mod 2^b


def test_chacha20_keystream_is_rfc_8439s_for_the_zero_key_and_round_zero():
    """RFC 8439, A.1 test vector 1: key 0, nonce 0, block counter 0."""
    out = keystream_into(bytes(32), 0, np.zeros(8, np.uint8))
    assert out.tobytes().hex() == "76b8e0ada0f13d90"
    assert keystream_into(bytes(32), 1, np.zeros(8, np.uint8)).tobytes() != out.tobytes()
    assert keystream_into(bytes(32), np.int64(0), np.zeros(8, np.uint8)).tobytes() == out.tobytes()
    for bad in (-1, 2 ** 64):
        with pytest.raises(ValueError, match="outside"):
            keystream_into(bytes(32), bad, np.zeros(8, np.uint8))
    with pytest.raises(TypeError):
        keystream_into(bytes(32), 1.0, np.zeros(8, np.uint8))


def test_masks_added_chunk_by_chunk_are_the_whole_keystream():
    key = hashlib.sha256(b"k").digest()
    for dtype in (np.uint64, np.uint32):
        n = 3 * CHUNK_BYTES // np.dtype(dtype).itemsize + 5  # several chunks and a ragged end
        whole = keystream_into(key, 9, np.zeros(n, dtype))
        buf = np.arange(n, dtype=dtype)
        add_keystream(buf, key, 9)
        assert np.array_equal(buf, np.arange(n, dtype=dtype) + whole)
        add_keystream(buf, key, 9, subtract=True)
        assert np.array_equal(buf, np.arange(n, dtype=dtype))


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("dtype", [np.uint64, np.uint32])
def test_masks_cancel_exactly_in_the_ring_sum(n, dtype):
    group = parties(n)
    for rnd in (1, 2):
        masks = [p.mask(rnd, 5000, dtype) for p in group]
        assert not ring_sum(masks).any()
        assert all(np.count_nonzero(m) > 4900 for m in masks)
    assert not np.array_equal(group[0].mask(1, 100, dtype), group[0].mask(2, 100, dtype))  # fresh per round


@pytest.mark.parametrize("n", [2, 3, 4])
def test_masked_buffers_sum_to_the_unmasked_sum_bit_for_bit(n):
    rng = np.random.default_rng(n)
    plain = [rng.integers(0, 2 ** 64, 3000, dtype=np.uint64, endpoint=False) for _ in range(n)]
    masked = [p.mask_into(x.copy(), rnd=7) for p, x in zip(parties(n), plain)]
    assert all(not np.array_equal(m, x) for m, x in zip(masked, plain))
    assert np.array_equal(ring_sum(masked), ring_sum(plain))


def test_both_ends_of_a_pair_derive_the_same_key_and_other_pairs_other_keys():
    privates = private_keys(3)
    publics = [public_bytes(p) for p in privates]
    k01, k10 = pair_key(privates[0], publics, 0, 1), pair_key(privates[1], publics, 1, 0)
    assert k01 == k10 and len(k01) == 32
    assert k01 != pair_key(privates[0], publics, 0, 2) != pair_key(privates[1], publics, 1, 2)


def test_a_party_with_a_wrong_key_breaks_the_sum():
    privates, impostor = private_keys(3), private_keys(1, tag="other")[0]
    publics = [public_bytes(p) for p in privates]
    honest = [PairwiseMasks.from_private_key(i, privates[i], publics) for i in (0, 1)]
    # party 2 announced publics[2] but masks with pair keys from another private key
    wrong = PairwiseMasks(2, 3, {j: pair_key(impostor, publics, 2, j) for j in (0, 1)})
    plain = [np.full(2000, i, np.uint64) for i in range(3)]
    total = ring_sum([p.mask_into(x.copy(), 1) for p, x in zip(honest + [wrong], plain)])
    assert np.count_nonzero(total != ring_sum(plain)) > 1990


def test_a_party_shown_another_key_list_derives_keys_that_do_not_cancel():
    privates = private_keys(3)
    publics = [public_bytes(p) for p in privates]
    forged = list(publics)
    forged[1] = public_bytes(private_keys(1, tag="forged")[0])
    group = [PairwiseMasks.from_private_key(0, privates[0], forged)]
    group += [PairwiseMasks.from_private_key(i, privates[i], publics) for i in (1, 2)]
    assert np.count_nonzero(ring_sum([p.mask(1, 1000) for p in group])) > 990


def structured_input(dtype) -> np.ndarray:
    """What a rank really sends: small signed fixed-point values (here quantized N(0, 1) * 2^20), far from uniform."""
    values = np.round(np.random.default_rng(0).standard_normal(1 << 16) * 2 ** 20).astype(np.int64)
    return values.view(np.uint64).astype(dtype)


@pytest.mark.parametrize("dtype,bits", [(np.uint64, 64), (np.uint32, 32)])
def test_one_partys_masked_buffer_is_indistinguishable_from_uniform(dtype, bits):
    plain = structured_input(dtype)
    masked = parties(3)[1].mask_into(plain.copy(), rnd=5)
    top_bytes = (masked >> dtype(bits - 8)).astype(np.int64)
    uniform = stats.chisquare(np.bincount(top_bytes, minlength=256)).pvalue
    ks = stats.kstest(masked.astype(np.float64) / 2.0 ** bits, "uniform").pvalue
    low_bytes = stats.chisquare(np.bincount((masked & dtype(255)).astype(np.int64), minlength=256)).pvalue
    assert min(uniform, ks, low_bytes) > 1e-3, (uniform, ks, low_bytes)
    # the same statistics tell the unmasked buffer apart at once: the test can fail
    plain_top = stats.chisquare(np.bincount((plain >> dtype(bits - 8)).astype(np.int64), minlength=256)).pvalue
    assert plain_top < 1e-12 and stats.kstest(plain.astype(np.float64) / 2.0 ** bits, "uniform").pvalue < 1e-12


def test_masks_need_an_unsigned_contiguous_buffer():
    party = parties(2)[0]
    for bad in (np.zeros(10, np.float32), np.zeros(10, np.int64), np.zeros((2, 5), np.uint64),
                np.zeros(20, np.uint64)[::2]):
        with pytest.raises(ValueError, match="contiguous 1-D uint32 or uint64"):
            party.mask_into(bad, 1)


@pytest.mark.parametrize("keys,match", [
    (lambda own: [own], "1 public keys for 2 ranks"),
    (lambda own: [own, own], "same public key"),
    (lambda own: [own, b"x" * 31], "rank 1's public key is not 32 bytes"),
    (lambda own: [public_bytes(private_keys(1, "a")[0]), public_bytes(private_keys(1, "b")[0])], "another key"),
    (lambda own: [own, bytes(32)], "rank 1's public key is unusable")])
def test_setup_refuses_a_bad_key_list(keys, match):
    with pytest.raises(ValueError, match=match):
        PairwiseMasks.setup(0, 2, keys)


def test_one_rank_alone_has_no_peers_and_adds_no_mask():
    alone = PairwiseMasks.setup(0, 1, lambda own: [own])
    assert not alone.mask(1, 100).any()


@pytest.mark.parametrize("ranks,bits", [(2, 64), (3, 64), (4, 64), (3, 32)])
def test_key_exchange_and_masked_allreduce_under_mpirun_give_the_unmasked_sum_bit_for_bit(ranks, bits):
    script = ROOT / "tests" / "fl" / "secagg_mpi_check.py"
    cmd = [mpirun_path(), "-n", str(ranks), sys.executable, str(script), str(ranks), str(bits)]
    env = dict(os.environ, **mpi_env(), PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert row["ranks"] == ranks and row["nodes"] == 10
    assert row["equal"] and row["masked_differs"]
    assert row["max_error"] <= row["error_bound"]
    # the ring sum is exact integer arithmetic: the bits of one process summing every node alone
    spec = importlib.util.spec_from_file_location("secagg_mpi_check", script)
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    alone = check.ring_buffer(FixedPoint(check.CLIP, check.NODES, bits), range(check.NODES))
    assert hashlib.sha256(alone.tobytes()).hexdigest() == row["digest"]
