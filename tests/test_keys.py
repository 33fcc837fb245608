"""tunsup.config.keys: RFC 7748 X25519 vectors, redaction and base64 parsing."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunsup.config.keys import InvalidKey, Key, x25519

# RFC 7748 section 5.2
VECTORS_5_2 = [
    (
        "a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4",
        "e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c",
        "c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552",
    ),
    (
        "4b66e9d4d1b4673c5ad22691957d6af5c11b6421e0ea01d42ca4169e7918ba0d",
        # the top bit of the last byte is set; X25519 must mask it
        "e5210f12786811d3f4b7959d0538ae2c31dbe7106fc03c3efc4cd549c715a493",
        "95cbde9476e8907d7aade45cb4b873f88b595a68799fa152e6f8f7647aac7957",
    ),
]

# RFC 7748 section 6.1
ALICE_PRIVATE = "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"
ALICE_PUBLIC = "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
BOB_PRIVATE = "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb"
BOB_PUBLIC = "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"
SHARED = "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"


@pytest.mark.parametrize(("scalar", "u", "out"), VECTORS_5_2)
def test_x25519_rfc7748_vectors(scalar: str, u: str, out: str) -> None:
    assert x25519(bytes.fromhex(scalar), bytes.fromhex(u)).hex() == out


def test_x25519_rfc7748_iterated() -> None:
    k = u = (9).to_bytes(32, "little")
    k, u = x25519(k, u), k
    assert k.hex() == "422c8e7a6227d7bca1350b3e2bb7279f7897b87bb6854b783c60e80311ae3079"
    for _ in range(999):
        k, u = x25519(k, u), k
    assert k.hex() == "684cf59ba83309552800ef566f2f4d3c1c3887c49360e3875f2eb94d99532c51"


def test_rfc7748_diffie_hellman() -> None:
    alice = Key(bytes.fromhex(ALICE_PRIVATE))
    bob = Key(bytes.fromhex(BOB_PRIVATE))
    assert alice.public_key().hex() == ALICE_PUBLIC
    assert bob.public_key().hex() == BOB_PUBLIC
    assert x25519(alice.raw, bytes.fromhex(BOB_PUBLIC)).hex() == SHARED
    assert x25519(bob.raw, bytes.fromhex(ALICE_PUBLIC)).hex() == SHARED


def test_repr_and_str_redact() -> None:
    key = Key(bytes.fromhex(ALICE_PRIVATE))
    for shown in (repr(key), str(key), f"{key}", repr([key]), repr({"k": key})):
        assert "redacted" in shown
        assert ALICE_PRIVATE not in shown
        assert key.to_base64() not in shown


def test_base64_round_trip_and_hex() -> None:
    key = Key(bytes.fromhex(ALICE_PRIVATE))
    text = key.to_base64()
    assert len(text) == 44
    assert Key.from_base64(text) == key
    assert Key.from_base64(f"  {text}\n") == key
    assert key.hex() == ALICE_PRIVATE


def test_generate_private_is_clamped() -> None:
    raw = Key.generate_private().raw
    assert raw[0] & 7 == 0
    assert raw[31] & 0x80 == 0
    assert raw[31] & 0x40


def test_wrong_raw_length() -> None:
    with pytest.raises(InvalidKey):
        Key(b"\x01" * 31)


VALID = Key(bytes.fromhex(BOB_PUBLIC)).to_base64()


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (VALID[:-2] + "=", "44 characters"),  # too short
        (VALID + "A", "44 characters"),  # too long
        (base64.b64encode(b"\x07" * 16).decode(), "44 characters"),  # a 16-byte key
        (VALID[:-1] + "A", "44 characters"),  # no padding
        (VALID[:10] + "!" + VALID[11:], "not valid base64"),  # garbage character
        (VALID[:10] + " " + VALID[11:], "not valid base64"),
        (VALID[:-1] + "==", "44 characters"),  # stray '='
        (base64.b64encode(b"\x07" * 31).decode(), "does not decode to 32 bytes"),  # 44 chars
        ("", "44 characters"),
    ],
)
def test_from_base64_rejects(text: str, reason: str) -> None:
    with pytest.raises(InvalidKey) as info:
        Key.from_base64(text)
    message = str(info.value)
    assert reason in message
    if text:
        assert text not in message
        assert text[:12] not in message


@given(st.binary(min_size=32, max_size=32))
def test_any_32_bytes_round_trip(raw: bytes) -> None:
    key = Key(raw)
    assert Key.from_base64(key.to_base64()) == key
    assert key.to_base64() not in repr(key)
    assert key.hex() not in repr(key)


@given(st.text(min_size=8))
def test_from_base64_message_never_contains_input(text: str) -> None:
    try:
        Key.from_base64(text)
    except InvalidKey as e:
        assert text.strip() == "" or text.strip() not in str(e)
