"""The cryptographic primitives of SecAgg, all from ``cryptography`` (OpenSSL).

- Key agreement: X25519 (RFC 7748). Each site has two key pairs per round (Bonawitz et al.
  2017, §4): ``c`` keys agree the AEAD keys that encrypt Shamir shares travelling through the
  server; ``s`` keys agree the pairwise mask seeds s_ij. Fresh keys per round.
- Key derivation: HKDF-SHA256 (RFC 5869) over the X25519 output, salted with the round's session
  id and with an ``info`` naming the purpose and the participants, so keys for different purposes,
  pairs, directions or rounds are independent.
- Share encryption: ChaCha20-Poly1305 AEAD (RFC 8439). The key is specific to the direction
  sender → receiver; the associated data binds (protocol version, session, sender, receiver), so
  the server cannot alter, swap, misroute or replay a ciphertext from another round undetected.
- Mask expansion: the ChaCha20 keystream keyed with a 32-byte seed (a CSPRNG), read as
  little-endian uint32. Unlike Flower 1.41's SecAgg+ (``np.random.RandomState`` seeded with a
  32-bit fold of the shared key, upstream issue #7522), the mask is computationally
  indistinguishable from uniform on the ring Z_{2³²} for anyone without the seed.

Every seed here is used to expand exactly one mask per session, so a fixed nonce and block
counter 0 never repeat a (key, nonce, counter) block.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from privacy.secagg.errors import SecAggProtocolError, ShareDecryptionError

Entropy = Callable[[int], bytes]

PROTOCOL = b"medsilo-secagg-v1"
KEY_BYTES = 32  # X25519 keys, seeds, derived keys
NONCE_BYTES = 12  # ChaCha20-Poly1305
TAG_BYTES = 16
# ChaCha20 in OpenSSL takes a 16-byte IV: 4-byte little-endian block counter + 12-byte nonce,
# so one key addresses 2³² blocks of 64 bytes = 2³⁸ bytes = 2³⁶ uint32 mask coordinates.
MAX_MASK_LENGTH = 2**36


def _participant(index: int) -> bytes:
    return index.to_bytes(4, "big")


def _session(session: bytes) -> bytes:
    return len(session).to_bytes(2, "big") + session


def generate_key_pair(entropy: Entropy = os.urandom) -> tuple[bytes, bytes]:
    """A fresh X25519 key pair as raw bytes: ``(private_key, public_key)``, 32 bytes each."""
    private_key = X25519PrivateKey.from_private_bytes(entropy(KEY_BYTES))
    return private_key.private_bytes_raw(), private_key.public_key().public_bytes_raw()


def public_key_of(private_key: bytes) -> bytes:
    """The raw X25519 public key of a raw private key."""
    return X25519PrivateKey.from_private_bytes(private_key).public_key().public_bytes_raw()


def check_public_key(public_key: object, owner: int, what: str) -> bytes:
    """``public_key`` if it is 32 raw bytes, else a protocol error naming ``owner``."""
    if not isinstance(public_key, bytes) or len(public_key) != KEY_BYTES:
        raise SecAggProtocolError(f"{what} of participant {owner} must be {KEY_BYTES} raw "
                                  "bytes (X25519)", owner)
    return public_key


def _agree(private_key: bytes, public_key: bytes, owner: int) -> bytes:
    try:
        return X25519PrivateKey.from_private_bytes(private_key).exchange(
            X25519PublicKey.from_public_bytes(public_key))
    except ValueError as error:  # all-zero output: a low-order (invalid) public key
        raise SecAggProtocolError(f"public key of participant {owner} is invalid for X25519 "
                                  f"({error})", owner) from error


def _hkdf(secret: bytes, session: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=session,
                info=PROTOCOL + b"/" + info).derive(secret)


def pairwise_mask_seed(s_private_key: bytes, own_index: int, peer_public_key: bytes,
                       peer_index: int, session: bytes) -> bytes:
    """s_ij = HKDF(X25519(s_sk_i, s_pk_j)): the same 32 bytes at i and at j (symmetric info)."""
    low, high = sorted((own_index, peer_index))
    shared = _agree(s_private_key, peer_public_key, peer_index)
    return _hkdf(shared, session, b"pairwise-mask" + _participant(low) + _participant(high))


def _share_key(c_private_key: bytes, peer_public_key: bytes, peer_index: int, sender: int,
               receiver: int, session: bytes) -> bytes:
    shared = _agree(c_private_key, peer_public_key, peer_index)
    return _hkdf(shared, session, b"share-encryption" + _participant(sender)
                 + _participant(receiver))


def _associated_data(session: bytes, sender: int, receiver: int) -> bytes:
    return PROTOCOL + _session(session) + _participant(sender) + _participant(receiver)


def encrypt_shares(plaintext: bytes, c_private_key: bytes, sender: int,
                   receiver_public_key: bytes, receiver: int, session: bytes,
                   entropy: Entropy = os.urandom) -> bytes:
    """nonce ‖ ChaCha20-Poly1305(key_{sender→receiver}, nonce, plaintext, AD(session, s, r))."""
    key = _share_key(c_private_key, receiver_public_key, receiver, sender, receiver, session)
    nonce = entropy(NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(
        nonce, plaintext, _associated_data(session, sender, receiver))


def decrypt_shares(ciphertext: bytes, c_private_key: bytes, receiver: int,
                   sender_public_key: bytes, sender: int, session: bytes) -> bytes:
    """The plaintext, or :class:`ShareDecryptionError` naming ``sender`` if it fails to verify."""
    if not isinstance(ciphertext, bytes) or len(ciphertext) < NONCE_BYTES + TAG_BYTES:
        raise ShareDecryptionError(f"share ciphertext from participant {sender} to {receiver} "
                                   "is malformed (too short or not bytes)", sender)
    key = _share_key(c_private_key, sender_public_key, sender, sender, receiver, session)
    try:
        return ChaCha20Poly1305(key).decrypt(ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:],
                                             _associated_data(session, sender, receiver))
    except InvalidTag as error:
        raise ShareDecryptionError(
            f"share ciphertext from participant {sender} to {receiver} failed authentication "
            "(altered, misrouted, or replayed from another round)", sender) from error


def expand_mask(seed: bytes, length: int) -> np.ndarray:
    """``length`` uint32 values of the ChaCha20 keystream keyed with ``seed`` (32 bytes).

    Vectorised: OpenSSL encrypts a zero buffer and numpy views the result as little-endian
    uint32 (no Python loop over coordinates). The returned array is read-only.
    """
    _check_seed(seed)
    if not 0 <= length <= MAX_MASK_LENGTH:
        raise ValueError(f"mask length must be in [0, {MAX_MASK_LENGTH}], got {length}")
    encryptor = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor()
    return np.frombuffer(encryptor.update(bytes(4 * length)), dtype="<u4")


# 64 KiB of keystream per step: the target chunk and the keystream buffer stay in L1/L2
MASK_CHUNK_WORDS = 1 << 14
_ZEROS = bytes(4 * MASK_CHUNK_WORDS)


def _check_seed(seed: object) -> None:
    if not isinstance(seed, bytes) or len(seed) != KEY_BYTES:
        raise ValueError(f"mask seed must be {KEY_BYTES} bytes")


def apply_mask(target: np.ndarray, seed: bytes, *, subtract: bool = False) -> None:
    """``target ± expand_mask(seed, len(target))`` mod 2³², in place (1-D uint32)."""
    apply_masks(target, [(seed, subtract)])


def apply_masks(target: np.ndarray, masks: Sequence[tuple[bytes, bool]]) -> None:
    """For each ``(seed, subtract)``: ``target ± expand_mask(seed, len(target))`` mod 2³², in
    place (1-D uint32); the same values as applying them one by one.

    One pass over ``target``: each cache-sized chunk of it receives every mask's keystream for
    that chunk in turn (one ChaCha20 stream per seed, each advanced chunk by chunk), through one
    reused keystream buffer, with numpy's uint32 wrap-around (no wider temporaries). A site's
    input takes n masks (self mask + n − 1 pairwise at full SecAgg): streaming the target from
    memory once instead of n times, and a keystream buffer that stays in L1, is measured in
    privacy/secagg/benchmark.py (``masks``).
    """
    for seed, _ in masks:
        _check_seed(seed)
    if target.dtype != np.uint32 or target.ndim != 1:
        raise ValueError(f"masked vector must be 1-D uint32, got {target.dtype} {target.shape}")
    if len(target) > MAX_MASK_LENGTH:
        raise ValueError(f"mask length must be at most {MAX_MASK_LENGTH}, got {len(target)}")
    if not target.flags.writeable:
        raise ValueError("masked vector must be writeable (masks are applied in place)")
    streams = [(Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor().update_into,
                np.subtract if subtract else np.add) for seed, subtract in masks]
    # update_into wants room for one extra block beyond the input
    buffer = bytearray(4 * MASK_CHUNK_WORDS + 64)
    words = np.frombuffer(buffer, dtype="<u4")
    for start in range(0, len(target), MASK_CHUNK_WORDS):
        chunk = target[start:start + MASK_CHUNK_WORDS]
        size = len(chunk)
        zeros, keystream = _ZEROS[:4 * size], words[:size]
        for update_into, combine in streams:
            update_into(zeros, buffer)
            combine(chunk, keystream, out=chunk)
