"""Secure aggregation by pairwise masking (Bonawitz et al. 2017, CCS; its Sec. 3 masks, no dropout recovery).

Each rank i holds an X25519 key pair; one allgather of the public keys at setup gives every pair
(i, j) a shared secret s_ij = DH(sk_i, pk_j) = DH(sk_j, pk_i), stretched by HKDF-SHA256 into a
256-bit pair key. Each round r, the pair key and r seed a ChaCha20 keystream read as ring elements
PRG(k_ij, r) in Z_{2^b}, and rank i sends, in place of its integer buffer x_i (Bonawitz et al., Sec. 3, y_u)

    y_i = x_i + sum_{j > i} PRG(k_ij, r) - sum_{j < i} PRG(k_ji, r)   (mod 2^b)

so the masks cancel exactly in the SUM over ranks, sum_i y_i = sum_i x_i (mod 2^b), while each
y_i alone is uniform over the ring to anyone without a pair key of rank i (a one-time pad). MPI's
SUM on unsigned integers is C's unsigned addition, which wraps modulo 2^b: the Allreduce itself
computes the ring sum. With two ranks the sum reveals the other rank's input to each; masking
hides contributions only from the ranks that do not know them.

No dropout recovery (no secret sharing of the keys): an MPI job that loses a rank ends anyway.
The x_i are integers: fixed-point quantized updates from fedmpi.fl.ring.

ChaCha20 (RFC 8439), rather than AES-CTR: its speed does not depend on AES hardware; one 256-bit
key and a 96-bit nonce per (pair, round), the 32-bit block counter from 0: up to 256 GiB per
stream, far above any model.
"""
from __future__ import annotations

import hashlib
import operator
from typing import Callable, Sequence

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

PUBLIC_KEY_BYTES = 32
PAIR_KEY_BYTES = 32
MAX_STREAM_BYTES = 64 << 32  # ChaCha20's 32-bit block counter: 2^32 blocks of 64 bytes
HKDF_INFO = b"fedmpi secagg pair key v1"


def public_bytes(private: X25519PrivateKey) -> bytes:
    """The 32 raw bytes of a private key's public key (what the allgather carries)."""
    return private.public_key().public_bytes_raw()


def pair_key(private: X25519PrivateKey, public_keys: Sequence[bytes], rank: int, peer: int) -> bytes:
    """k_ij = HKDF-SHA256(DH(sk_rank, pk_peer); salt = SHA-256 of all public keys; info = (min, max) ranks).

    The same key on both sides of the pair; the salt binds it to this job's whole key list, so a
    rank shown another list than its peers derives keys that do not cancel.
    """
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(public_keys[peer]))
    except ValueError as err:  # a low-order point gives an all-zero secret, which cryptography refuses
        raise ValueError(f"secure aggregation: rank {peer}'s public key is unusable ({err})") from None
    lo, hi = min(rank, peer), max(rank, peer)
    salt = hashlib.sha256(b"".join(public_keys)).digest()
    info = HKDF_INFO + lo.to_bytes(4, "big") + hi.to_bytes(4, "big")
    return HKDF(algorithm=hashes.SHA256(), length=PAIR_KEY_BYTES, salt=salt, info=info).derive(shared)


def check_public_keys(public_keys: Sequence[bytes], rank: int, size: int, own: bytes) -> None:
    """The allgathered key list: one 32-byte key per rank, this rank's own in its place, no two alike."""
    if len(public_keys) != size:
        raise ValueError(f"secure aggregation: {len(public_keys)} public keys for {size} ranks")
    for peer, key in enumerate(public_keys):
        if not isinstance(key, bytes) or len(key) != PUBLIC_KEY_BYTES:
            raise ValueError(f"secure aggregation: rank {peer}'s public key is not {PUBLIC_KEY_BYTES} bytes")
    if public_keys[rank] != own:
        raise ValueError(f"secure aggregation: the key list has another key in rank {rank}'s place")
    if len(set(public_keys)) != size:
        raise ValueError("secure aggregation: two ranks announced the same public key")


def _encryptor(key: bytes, rnd: int, nbytes: int) -> CipherContext:
    """ChaCha20 with key k_ij and nonce = round; its encryption of zeros is the keystream PRG(k_ij, r)."""
    rnd = operator.index(rnd)  # any integer type (numpy's too), never a float
    if not 0 <= rnd < 1 << 64:
        raise ValueError(f"round {rnd} outside [0, 2^64)")
    if nbytes > MAX_STREAM_BYTES:
        raise ValueError(f"mask of {nbytes} bytes exceeds one ChaCha20 stream ({MAX_STREAM_BYTES} bytes)")
    # cryptography's 16-byte ChaCha20 nonce: 4-byte little-endian block counter, then the 96-bit nonce.
    nonce = (0).to_bytes(4, "little") + rnd.to_bytes(8, "little") + bytes(4)
    return Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()


def keystream_into(key: bytes, rnd: int, out: np.ndarray) -> np.ndarray:
    """Fill `out` (any dtype, C-contiguous) with the keystream PRG(key, rnd); returns out."""
    _encryptor(key, rnd, out.nbytes).update_into(bytes(out.nbytes), memoryview(out).cast("B"))
    return out


CHUNK_BYTES = 1 << 18  # masks are made and added in cache-sized pieces: one pass over the buffer per peer
_ZEROS = bytes(CHUNK_BYTES)


def add_keystream(buf: np.ndarray, key: bytes, rnd: int, subtract: bool = False) -> None:
    """buf +/-= PRG(key, rnd) modulo 2^b, in place, a cache-sized chunk of keystream at a time."""
    encryptor = _encryptor(key, rnd, buf.nbytes)
    op = np.subtract if subtract else np.add  # unsigned arithmetic: wraps modulo 2^b
    scratch = np.empty(CHUNK_BYTES // buf.itemsize, dtype=buf.dtype)
    raw = memoryview(scratch).cast("B")
    for start in range(0, buf.size, scratch.size):
        part = buf[start:start + scratch.size]
        encryptor.update_into(_ZEROS[:part.nbytes], raw[:part.nbytes])  # the stream continues across chunks
        op(part, scratch[:part.size], out=part)


class PairwiseMasks:
    """One rank's pair keys and the masks they make: `mask_into` turns x_i into y_i in place."""

    def __init__(self, rank: int, size: int, pair_keys: dict[int, bytes]) -> None:
        if sorted(pair_keys) != [j for j in range(size) if j != rank]:
            raise ValueError(f"rank {rank} of {size} needs one pair key per other rank, got {sorted(pair_keys)}")
        self.rank, self.size, self._keys = rank, size, dict(pair_keys)

    @classmethod
    def from_private_key(cls, rank: int, private: X25519PrivateKey, public_keys: Sequence[bytes]) -> PairwiseMasks:
        """The masks of `rank` given its private key and every rank's public key."""
        size = len(public_keys)
        check_public_keys(public_keys, rank, size, public_bytes(private))
        return cls(rank, size, {j: pair_key(private, public_keys, rank, j) for j in range(size) if j != rank})

    @classmethod
    def setup(cls, rank: int, size: int, allgather: Callable[[bytes], list]) -> PairwiseMasks:
        """A fresh key pair, one allgather of the public keys (e.g. comm.allgather), the pair keys.

        Every rank must call it at the same point (it is a collective). The private key comes from
        the OS's random source, never from the run's seed, and never leaves this process.
        """
        private = X25519PrivateKey.generate()
        public_keys = list(allgather(public_bytes(private)))
        check_public_keys(public_keys, rank, size, public_bytes(private))
        return cls.from_private_key(rank, private, public_keys)

    def mask_into(self, buf: np.ndarray, rnd: int) -> np.ndarray:
        """y_i = x_i + sum_{j>i} PRG(k_ij, r) - sum_{j<i} PRG(k_ji, r) mod 2^b, in place on unsigned `buf`.

        Mask each (round, buffer) once: two buffers masked with the same round's masks differ by
        the difference of their contents.
        """
        if buf.dtype not in (np.uint32, np.uint64) or buf.ndim != 1 or not buf.flags.c_contiguous:
            raise ValueError(f"masks need a contiguous 1-D uint32 or uint64 buffer, got {buf.dtype} {buf.shape}")
        for peer, key in self._keys.items():
            add_keystream(buf, key, rnd, subtract=peer < self.rank)
        return buf

    def mask(self, rnd: int, length: int, dtype: type = np.uint64) -> np.ndarray:
        """This rank's net mask for round `rnd` (what mask_into adds), as a new array."""
        return self.mask_into(np.zeros(length, dtype=dtype), rnd)
