"""The cryptographic primitives of secure aggregation, all from the ``cryptography`` library.

- Key agreement: X25519, the shared secret through HKDF-SHA256 (32 bytes, no salt, ``info``
  naming the purpose), so one key pair serves one purpose and two parties derive the same
  key: agree(a, B, i) == agree(b, A, i).
- Shares in transit: AES-256-GCM with a fresh random 96-bit nonce per message, prefixed to
  the ciphertext; the associated data binds the session, sender and receiver.
- Masks: a pseudo-random generator of uint64 words, AES-256-CTR keyed by HKDF(key, info)
  over a zero buffer. Decision: the whole 32-byte derived key keys the cipher (seeding
  numpy's generator would cut a secret to its seed's size and is not a CSPRNG); the HKDF
  step gives independent streams for the self mask and the pairwise masks of one secret.
- Commitments: SHA-256 of a domain tag and the secret (the self-mask seed is 32 random
  bytes, so hiding needs no salt).

Every secret comes from the OS (``os.urandom`` through ``cryptography``'s key generation).
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32
NONCE_BYTES = 12  # AES-GCM's 96-bit nonce
TAG_BYTES = 16
_COMMITMENT_TAG = b"brokerfl secagg commitment"


class CryptoError(ValueError):
    """A key, ciphertext or agreement refused (the message says which)."""


def _hkdf(key: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(key)


def new_private_key() -> bytes:
    return X25519PrivateKey.generate().private_bytes_raw()


def _private(private: bytes | X25519PrivateKey) -> X25519PrivateKey:
    if isinstance(private, X25519PrivateKey):
        return private
    try:
        return X25519PrivateKey.from_private_bytes(private)
    except (ValueError, TypeError) as error:
        raise CryptoError(f"not an X25519 private key: {error}") from None


def _public(public: bytes) -> X25519PublicKey:
    if not isinstance(public, bytes | bytearray) or len(public) != KEY_BYTES:
        raise CryptoError(f"an X25519 public key is {KEY_BYTES} bytes")
    try:
        return X25519PublicKey.from_public_bytes(bytes(public))
    except (ValueError, TypeError) as error:
        raise CryptoError(f"not an X25519 public key: {error}") from None


def public_key(private: bytes) -> bytes:
    return _private(private).public_key().public_bytes_raw()


def check_public_key(public: bytes) -> None:
    _public(public)


def private_key_object(private: bytes) -> X25519PrivateKey:
    """The key as the library's object: agreeing with many peers, parse it once (rebuilding
    it from bytes is about half an agreement's cost)."""
    return _private(private)


def agree(private: bytes | X25519PrivateKey, peer_public: bytes, info: bytes) -> bytes:
    """HKDF-SHA256(X25519(private, peer_public), info): 32 bytes both sides compute alike."""
    try:
        shared = _private(private).exchange(_public(peer_public))
    except ValueError as error:  # the library refuses an all-zero result itself
        raise CryptoError(f"key agreement failed (a low-order public key?): {error}") from None
    if shared == bytes(len(shared)):  # and in case a version does not
        raise CryptoError("key agreement gave the all-zero secret (a low-order public key)")
    return _hkdf(shared, info)


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """nonce || AES-GCM(key, nonce, plaintext, aad), a fresh random nonce each call."""
    if len(key) != KEY_BYTES:
        raise CryptoError(f"an AES-256 key is {KEY_BYTES} bytes")
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def open_sealed(key: bytes, blob: bytes, aad: bytes) -> bytes:
    """The plaintext of :func:`seal`'s ``blob``; CryptoError for any failure."""
    if len(key) != KEY_BYTES:
        raise CryptoError(f"an AES-256 key is {KEY_BYTES} bytes")
    if len(blob) < NONCE_BYTES + TAG_BYTES:
        raise CryptoError(f"a sealed message of {len(blob)} bytes is too short")
    try:
        return AESGCM(key).decrypt(bytes(blob[:NONCE_BYTES]), bytes(blob[NONCE_BYTES:]), aad)
    except InvalidTag:
        raise CryptoError("the sealed message does not open (wrong key, tampered, or other associated data)") from None


def prg_words(key: bytes, count: int, info: bytes) -> np.ndarray:
    """``count`` little-endian uint64 words of AES-256-CTR(HKDF(key, info)), counter block 0.

    One zero buffer encrypted in one call (AES-NI: about 1 GB/s or more), written into a
    bytearray so the array is writable without a copy.
    """
    if count < 0:
        raise CryptoError(f"a negative word count {count}")
    encryptor = Cipher(algorithms.AES(_hkdf(key, info)), modes.CTR(bytes(16))).encryptor()
    n = 8 * count
    out = bytearray(n + 15)  # update_into wants room for a block more than the input
    written = encryptor.update_into(bytes(n), out)
    return np.frombuffer(out, dtype="<u8", count=written // 8).astype(np.uint64, copy=False)  # no copy on little-endian


def commitment(secret: bytes) -> bytes:
    return hashlib.sha256(_COMMITMENT_TAG + secret).digest()
