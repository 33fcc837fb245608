"""WireGuard keys: a redacting value type, base64 parsing and X25519.

Keys are 32 bytes.  :class:`Key` never shows its bytes in ``repr`` or
``str`` so that key material cannot reach logs or error messages by
accident; use :meth:`Key.to_base64` / :meth:`Key.hex` explicitly.

The X25519 implementation (RFC 7748) is used only to derive a public key
from a private one and to generate keys for ``tunsup demo``; it is not
constant-time and is never used on the data path (wireguard-go does that).
"""

from __future__ import annotations

import base64
import binascii
import os

import attrs

KEY_LEN = 32


class InvalidKey(ValueError):
    """Raised for text that is not a base64-encoded 32-byte key.

    The message never contains the text itself.
    """


@attrs.frozen(repr=False)
class Key:
    """A 32-byte WireGuard key (private, public or preshared)."""

    raw: bytes = attrs.field(validator=attrs.validators.instance_of(bytes))

    def __attrs_post_init__(self) -> None:
        if len(self.raw) != KEY_LEN:
            raise InvalidKey(f"a key must be {KEY_LEN} bytes")

    @classmethod
    def from_base64(cls, text: str) -> Key:
        text = text.strip()
        if len(text) != 44 or not text.endswith("="):
            raise InvalidKey("must be 44 characters of base64 ending in '='")
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidKey("is not valid base64") from None
        if len(raw) != KEY_LEN:
            raise InvalidKey(f"does not decode to {KEY_LEN} bytes")
        return cls(raw)

    @classmethod
    def generate_private(cls) -> Key:
        """A fresh, clamped X25519 private key (as ``wg genkey``)."""
        raw = bytearray(os.urandom(KEY_LEN))
        raw[0] &= 248
        raw[31] &= 127
        raw[31] |= 64
        return cls(bytes(raw))

    def public_key(self) -> Key:
        """The X25519 public key of this private key (as ``wg pubkey``)."""
        return Key(x25519(self.raw, _BASEPOINT))

    def to_base64(self) -> str:
        return base64.b64encode(self.raw).decode("ascii")

    def hex(self) -> str:
        """Lower-case hex, the encoding the UAPI protocol uses."""
        return self.raw.hex()

    def __repr__(self) -> str:
        return "Key(<redacted>)"

    __str__ = __repr__


_P = 2**255 - 19
_A24 = 121665
_BASEPOINT = (9).to_bytes(32, "little")


def _decode_scalar(k: bytes) -> int:
    b = bytearray(k)
    b[0] &= 248
    b[31] &= 127
    b[31] |= 64
    return int.from_bytes(b, "little")


def x25519(scalar: bytes, u_bytes: bytes) -> bytes:
    """RFC 7748 X25519 scalar multiplication (Montgomery ladder)."""
    k = _decode_scalar(scalar)
    u = int.from_bytes(u_bytes, "little") & ((1 << 255) - 1)
    x1, x2, z2, x3, z3 = u, 1, 0, u, 1
    swap = 0
    for t in reversed(range(255)):
        k_t = (k >> t) & 1
        swap ^= k_t
        if swap:
            x2, x3 = x3, x2
            z2, z3 = z3, z2
        swap = k_t
        a = (x2 + z2) % _P
        aa = a * a % _P
        b = (x2 - z2) % _P
        bb = b * b % _P
        e = (aa - bb) % _P
        c = (x3 + z3) % _P
        d = (x3 - z3) % _P
        da = d * a % _P
        cb = c * b % _P
        x3 = (da + cb) ** 2 % _P
        z3 = x1 * (da - cb) ** 2 % _P
        x2 = aa * bb % _P
        z2 = e * (aa + _A24 * e) % _P
    if swap:
        x2, x3 = x3, x2
        z2, z3 = z3, z2
    return (x2 * pow(z2, _P - 2, _P) % _P).to_bytes(32, "little")
