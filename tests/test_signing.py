"""Standard Webhooks signing, checked against the reference ``standardwebhooks`` package."""

from __future__ import annotations

import base64
import time
from datetime import UTC, datetime

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from app import signing
from app.signing import SignatureError

BODY = '{"id":"snap_1","type":"order.hydrated","brand":"acme","note":"çay ☕"}'.encode()
MSG_ID = "snap_0123456789abcdef0123456789abcdef"
OLD = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
NEW = signing.new_secret()


def headers(msg_id: str, timestamp: int, signature: str) -> dict[str, str]:
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature,
    }


def our_verify(secret: str, signature: str, *, timestamp: int, now: float | None = None) -> int:
    return signing.verify(
        secret,
        msg_id=MSG_ID,
        timestamp=str(timestamp),
        signature_header=signature,
        body=BODY,
        now=time.time() if now is None else now,
        tolerance_seconds=300,
    )


def test_one_secret_verifies_with_reference_package() -> None:
    now = int(time.time())
    header = signing.sign([OLD], MSG_ID, now, BODY)
    assert header.startswith("v1,")
    assert " " not in header
    assert Webhook(OLD).verify(BODY, headers(MSG_ID, now, header)) == {
        "id": "snap_1",
        "type": "order.hydrated",
        "brand": "acme",
        "note": "çay ☕",
    }


def test_rotation_each_secret_alone_verifies() -> None:
    now = int(time.time())
    header = signing.sign([NEW, OLD], MSG_ID, now, BODY)
    assert len(header.split(" ")) == 2
    for secret in (NEW, OLD):
        Webhook(secret).verify(BODY, headers(MSG_ID, now, header), json_parse=False)
        assert our_verify(secret, header, timestamp=now) == now
    stranger = signing.new_secret()
    with pytest.raises(WebhookVerificationError):
        Webhook(stranger).verify(BODY, headers(MSG_ID, now, header))


def test_signature_matches_reference_sign_exactly() -> None:
    ts = 1_700_000_000
    reference = Webhook(OLD).sign(MSG_ID, datetime.fromtimestamp(ts, UTC), BODY.decode())
    assert signing.sign([OLD], MSG_ID, ts, BODY) == reference


def test_verify_accepts_reference_signatures() -> None:
    now = int(time.time())
    reference = Webhook(NEW).sign(MSG_ID, datetime.fromtimestamp(now, UTC), BODY.decode())
    assert our_verify(NEW, reference, timestamp=now) == now
    # Among other entries, including another version and junk, as the spec allows.
    mixed = f"v2,abc v1,!!notbase64 v1,{base64.b64encode(b'x' * 32).decode()} {reference}"
    assert our_verify(NEW, mixed, timestamp=now) == now


def test_raw_inbound_secret_is_keyed_by_its_utf8_bytes() -> None:
    raw = "a shared secret, not whsec"
    now = int(time.time())
    header = signing.sign([raw], MSG_ID, now, BODY)
    assert our_verify(raw, header, timestamp=now) == now
    # The reference package, given the raw bytes as the key, agrees.
    Webhook(raw.encode()).verify(BODY, headers(MSG_ID, now, header), json_parse=False)
    with pytest.raises(SignatureError) as info:
        our_verify("a different shared secret", header, timestamp=now)
    assert info.value.reason == "bad_signature"


def test_unpadded_whsec_secret_is_accepted_like_the_reference() -> None:
    unpadded = "whsec_" + base64.b64encode(b"k" * 31).decode().rstrip("=")
    now = int(time.time())
    header = signing.sign([unpadded], MSG_ID, now, BODY)
    Webhook(unpadded).verify(BODY, headers(MSG_ID, now, header), json_parse=False)


@pytest.mark.parametrize(
    ("offset", "reason"), [(-301, "stale_timestamp"), (301, "future_timestamp")]
)
def test_timestamp_outside_tolerance_is_rejected(offset: int, reason: str) -> None:
    now = 1_700_000_000
    header = signing.sign([OLD], MSG_ID, now + offset, BODY)
    with pytest.raises(SignatureError) as info:
        our_verify(OLD, header, timestamp=now + offset, now=now)
    assert info.value.reason == reason
    # At the edge of the window it is still accepted.
    edge = now + (300 if offset > 0 else -300)
    assert our_verify(OLD, signing.sign([OLD], MSG_ID, edge, BODY), timestamp=edge, now=now) == edge


@pytest.mark.parametrize(
    "timestamp", ["", "abc", "1.5", "-1", " 1700000000", "1700000000\n", "9" * 40]
)
def test_bad_timestamp(timestamp: str) -> None:
    with pytest.raises(SignatureError) as info:
        signing.verify(
            OLD,
            msg_id=MSG_ID,
            timestamp=timestamp,
            signature_header="v1,AAAA",
            body=BODY,
            now=1_700_000_000,
            tolerance_seconds=300,
        )
    assert info.value.reason == ("missing_headers" if timestamp == "" else "bad_timestamp")


@pytest.mark.parametrize(
    ("msg_id", "timestamp", "signature"),
    [("", "1700000000", "v1,AAAA"), (MSG_ID, "", "v1,AAAA"), (MSG_ID, "1700000000", "")],
)
def test_missing_headers(msg_id: str, timestamp: str, signature: str) -> None:
    with pytest.raises(SignatureError) as info:
        signing.verify(
            OLD,
            msg_id=msg_id,
            timestamp=timestamp,
            signature_header=signature,
            body=BODY,
            now=1_700_000_000,
            tolerance_seconds=300,
        )
    assert info.value.reason == "missing_headers"


def test_bad_signature_cases() -> None:
    now = int(time.time())
    good = signing.sign([OLD], MSG_ID, now, BODY)
    cases = {
        "tampered body": (good, BODY + b" "),
        "other id": (signing.sign([OLD], "snap_other", now, BODY), BODY),
        "wrong secret": (signing.sign([NEW], MSG_ID, now, BODY), BODY),
        "not v1": (good.replace("v1,", "v2,"), BODY),
        "garbage": ("v1,%%%% nonsense", BODY),
        "oversized header": (good + " " + "v1,AAAA" * 1000, BODY),
    }
    for name, (signature, body) in cases.items():
        with pytest.raises(SignatureError) as info:
            signing.verify(
                OLD,
                msg_id=MSG_ID,
                timestamp=str(now),
                signature_header=signature,
                body=body,
                now=now,
                tolerance_seconds=300,
            )
        assert info.value.reason == "bad_signature", name
        assert OLD not in str(info.value)


def test_oversized_message_id_is_refused_before_hashing() -> None:
    now = int(time.time())
    long_id = "m" * (signing.MAX_MSG_ID_LENGTH + 1)
    with pytest.raises(SignatureError) as info:
        signing.verify(
            OLD,
            msg_id=long_id,
            timestamp=str(now),
            signature_header=signing.sign([OLD], long_id, now, BODY),
            body=BODY,
            now=now,
            tolerance_seconds=300,
        )
    assert info.value.reason == "bad_signature"


def test_constant_time_equals() -> None:
    assert signing.constant_time_equals("s3cret-token", "s3cret-token")
    assert not signing.constant_time_equals("s3cret-token", "s3cret-tokeN")
    assert not signing.constant_time_equals("s3cret-token", "s3cret")
    assert not signing.constant_time_equals("", "x")
    assert signing.constant_time_equals("çay ☕", "çay ☕")


def test_new_secret_is_32_random_bytes_usable_by_the_reference() -> None:
    first, second = signing.new_secret(), signing.new_secret()
    assert first != second
    assert first.startswith("whsec_")
    assert len(base64.b64decode(first.removeprefix("whsec_"))) == 32
    now = int(time.time())
    Webhook(first).verify(
        BODY, headers(MSG_ID, now, signing.sign([first], MSG_ID, now, BODY)), json_parse=False
    )


@pytest.mark.parametrize("secret", ["whsec_", "whsec_***not base64***", ""])
def test_unusable_secrets_are_refused(secret: str) -> None:
    with pytest.raises(ValueError, match=r"empty|base64"):
        signing.secret_key(secret)
    with pytest.raises(ValueError, match=r"empty|base64"):
        signing.sign([secret], MSG_ID, 1, BODY)


def test_sign_requires_a_secret() -> None:
    with pytest.raises(ValueError, match="at least one secret"):
        signing.sign([], MSG_ID, 1, BODY)
