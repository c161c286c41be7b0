"""Standard Webhooks signatures (https://www.standardwebhooks.com), as pure functions.

A message is signed as ``HMAC-SHA256(key, "<webhook-id>.<webhook-timestamp>.<body>")``
and sent as ``webhook-signature: v1,<base64>``; several space-separated entries are
allowed, which is how a secret is rotated (sign with the new and the old one, the
receiver accepts any match).

**Keys.** A secret of the form ``whsec_<base64>`` (what the spec and its libraries
use, and what every http sink secret must be) is keyed by the *decoded* bytes after
the prefix. Any other string is keyed by its own UTF-8 bytes: the inbound
``WEBHOOK_SECRET`` is an arbitrary shared string, so a Clopos-side sender signs with
``HMAC(secret.encode(), ...)``. The reference libraries do the same when given bytes.

Header values are bounded before any work is done, so a hostile request costs at
most a few HMACs. No I/O here; the caller passes ``now``.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import re
import secrets as _random
from collections.abc import Sequence
from typing import Literal

WHSEC_PREFIX = "whsec_"
SIGNATURE_VERSION = "v1"

# Bounds on what a sender may put in the headers. Real ids are tens of characters and
# a rotation sends two or three signatures; anything past these is not worth reading.
MAX_MSG_ID_LENGTH = 256
MAX_SIGNATURE_HEADER_LENGTH = 4096
MAX_SIGNATURES = 16
_TIMESTAMP = re.compile(r"[0-9]{1,12}")  # integer Unix seconds, per the spec

SignatureFailure = Literal[
    "missing_headers", "bad_timestamp", "stale_timestamp", "future_timestamp", "bad_signature"
]


class SignatureError(ValueError):
    """A signed request does not verify. ``reason`` is a stable identifier for
    responses and metrics; the message never contains the secret or a signature."""

    def __init__(self, reason: SignatureFailure, message: str) -> None:
        super().__init__(message)
        self.reason: SignatureFailure = reason


def secret_key(secret: str) -> bytes:
    """The HMAC key of a secret: decoded ``whsec_`` base64, or the string's UTF-8 bytes.

    Raises ``ValueError`` for a ``whsec_`` secret whose rest is not base64 or is empty:
    that is a configuration mistake, best caught at start-up by calling this once.
    """
    if not secret:
        raise ValueError("the secret is empty")
    if not secret.startswith(WHSEC_PREFIX):
        return secret.encode()
    encoded = secret[len(WHSEC_PREFIX) :]
    # Unpadded base64 is common in the wild; the reference libraries accept it too.
    padded = encoded + "=" * (-len(encoded) % 4)
    try:
        key = base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("the part after 'whsec_' is not valid base64") from exc
    if not key:
        raise ValueError("the part after 'whsec_' is empty")
    return key


def _digest(key: bytes, msg_id: str, timestamp: str, body: bytes) -> bytes:
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return hmac.new(key, signed, hashlib.sha256).digest()


def sign(secrets: Sequence[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: one ``v1,<base64>`` entry per secret, in order."""
    if not secrets:
        raise ValueError("at least one secret is required to sign")
    entries = [
        f"{SIGNATURE_VERSION},"
        + base64.b64encode(_digest(secret_key(s), msg_id, str(timestamp), body)).decode()
        for s in secrets
    ]
    return " ".join(entries)


def _signatures(header: str) -> list[bytes]:
    """The decoded ``v1`` signatures of a header; other versions and junk are skipped."""
    found: list[bytes] = []
    for entry in header.split()[:MAX_SIGNATURES]:
        version, _, encoded = entry.partition(",")
        if version != SIGNATURE_VERSION or not encoded:
            continue
        try:
            found.append(base64.b64decode(encoded, validate=True))
        except (binascii.Error, ValueError):
            continue
    return found


def _check_timestamp(timestamp: str, now: float, tolerance_seconds: int) -> int:
    if not _TIMESTAMP.fullmatch(timestamp):
        raise SignatureError("bad_timestamp", "webhook-timestamp must be integer Unix seconds")
    value = int(timestamp)
    if value < now - tolerance_seconds:
        raise SignatureError("stale_timestamp", "webhook-timestamp is too old")
    if value > now + tolerance_seconds:
        raise SignatureError("future_timestamp", "webhook-timestamp is too far in the future")
    return value


def verify(
    secret: str,
    *,
    msg_id: str,
    timestamp: str,
    signature_header: str,
    body: bytes,
    now: float,
    tolerance_seconds: int,
) -> int:
    """Check a Standard Webhooks signature; return the signed timestamp.

    The HMAC is computed over the headers exactly as received. Every ``v1`` entry is
    compared in constant time; one match is enough. Raises :class:`SignatureError`.
    """
    if not (msg_id and timestamp and signature_header):
        raise SignatureError(
            "missing_headers", "webhook-id, webhook-timestamp and webhook-signature are required"
        )
    if len(msg_id) > MAX_MSG_ID_LENGTH or len(signature_header) > MAX_SIGNATURE_HEADER_LENGTH:
        # Not worth hashing; a legitimate sender never gets near these sizes.
        raise SignatureError("bad_signature", "signature headers are too long")
    signed_at = _check_timestamp(timestamp, now, tolerance_seconds)
    expected = _digest(secret_key(secret), msg_id, timestamp, body)
    matched = False
    for candidate in _signatures(signature_header):
        # No early exit: the work done does not depend on which entry matched.
        matched |= hmac.compare_digest(expected, candidate)
    if not matched:
        raise SignatureError("bad_signature", "no matching v1 signature")
    return signed_at


def constant_time_equals(given: str, expected: str) -> bool:
    """Compare a caller's token with ours without leaking where they differ, nor their
    lengths.

    Both sides are hashed first: ``compare_digest`` on raw values returns early on a
    length mismatch, which would tell an attacker the secret's length. Our side's hash
    is computed once per secret (it is asked on every webhook request).
    """
    return hmac.compare_digest(_token_digest(given), _expected_digest(expected))


def _token_digest(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


# Keyed only by our configured secrets (never by what a caller sends): bounded by them.
_expected_digest = functools.cache(_token_digest)


def new_secret() -> str:
    """A fresh ``whsec_`` secret: 32 random bytes, base64 encoded."""
    return WHSEC_PREFIX + base64.b64encode(_random.token_bytes(32)).decode()
