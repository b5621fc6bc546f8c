"""The session token: an inner MCP session id, sealed together with the machine that owns it.

Format (URL-safe ASCII, parts joined with ``.``)::

    <owner machine id>.<format>.<nonce + AES-256-GCM ciphertext + tag, base64url without padding>

``format`` is ``2`` (version 1 was the signed, readable token of earlier releases). The sealed part
holds a layout byte, the issue time (5 bytes, seconds) and the inner id: packed to 16 bytes when it
is 32 lowercase hex characters (the official SDK's ``uuid4().hex``), as is otherwise. The layout
byte leaves room for more fields (a worker id) in a later layout without a new token format.

Why encrypted, not only signed: the inner id is the session's bearer secret for the server behind
the layer. A client that could read it could present it raw, in any carrier the server parses,
and skip every check the token carries (expiry, key retirement, app binding). Sealing keeps the
layer stateless (no table of ids to keep or lose), and AES-GCM authenticates as it hides: a token
changed in any way fails to open (``bad_signature``). The owner and format are authenticated too
(associated data), and the key is derived from the secret *and* the app name (HKDF-SHA256), so a
token of another app or another secret never opens. Every key of the ring opens, the first seals.

Nonces are 12 random bytes: safe for far more tokens than a key ever seals (NIST SP 800-38D
allows 2**32 random nonces per key). A 32-hex inner id gives an 84-character token; every token
is at most ``MAX_TOKEN_LENGTH`` characters, and the encoding is canonical (one spelling per token).

References: RFC 5116 (AEAD), NIST SP 800-38D (GCM), RFC 5869 (HKDF), RFC 4648 section 5
(base64url); MCP's session id rule (visible ASCII only, 0x21-0x7E).
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MAX_TOKEN_LENGTH = 256
MAX_INNER_SESSION_ID_LENGTH = 128
# Verified tokens remembered per codec (about 300 bytes each): a few MB at most.
VERIFIED_TOKENS_KEPT = 10_000
# Tokens minted on a machine whose clock runs ahead are still young, not "from the future".
CLOCK_SKEW_SECONDS = 60
_EARLIEST_AGE = -CLOCK_SKEW_SECONDS

TOKEN_FORMAT = "2"
_KDF_SALT = b"fly-replay-router session token"
_NONCE_BYTES = 12
_TAG_BYTES = 16
_ISSUED_BYTES = 5
# Layout byte of the sealed plaintext: how the inner id is stored.
_LAYOUT_ASCII = 0
_LAYOUT_HEX = 1
_SEALED_MIN = _NONCE_BYTES + 1 + _ISSUED_BYTES + 1 + _TAG_BYTES
_SEALED_MAX = _NONCE_BYTES + 1 + _ISSUED_BYTES + MAX_INNER_SESSION_ID_LENGTH + _TAG_BYTES
_TOKEN = re.compile(
    rf"(?P<owner>[0-9a-z]{{1,32}})\.{TOKEN_FORMAT}\."
    rf"(?P<sealed>[A-Za-z0-9_-]{{{-(-_SEALED_MIN * 4 // 3)},{-(-_SEALED_MAX * 4 // 3)}}})"
)
_VISIBLE_ASCII = re.compile(rf"[\x21-\x7e]{{1,{MAX_INNER_SESSION_ID_LENGTH}}}")
_LOWER_HEX_32 = re.compile(r"[0-9a-f]{32}")
_URLSAFE_TO_STANDARD = bytes.maketrans(b"-_", b"+/")


class InvalidToken(Exception):
    """A session token that does not prove an owner.

    ``reason`` is a stable code for logs and metrics: ``token_too_long``, ``malformed_token``,
    ``bad_signature`` (forged, changed, another app, or a key no longer in the ring: the seal does
    not open), ``token_from_future`` or ``token_expired``.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class SessionToken:
    """What a verified token proves."""

    owner_machine_id: str
    inner_session_id: str
    issued_at: int


def _derive_key(secret: str, app_name: str) -> AESGCM:
    kdf = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=_KDF_SALT,
        info=f"token format {TOKEN_FORMAT} for app {app_name}".encode(),
    )
    return AESGCM(kdf.derive(secret.encode("utf-8")))


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64decode(part: str) -> bytes:
    # The token pattern already allows only the base64url alphabet.
    return binascii.a2b_base64(part.encode("ascii").translate(_URLSAFE_TO_STANDARD) + b"=" * (-len(part) % 4))


class TokenCodec:
    """Issues and verifies session tokens for one app with one key ring."""

    def __init__(self, secret_keys: Sequence[str], *, app_name: str) -> None:
        if not secret_keys:
            raise ValueError("a token codec needs at least one secret key")
        self._keys = tuple(_derive_key(secret, app_name) for secret in secret_keys)
        # Tokens that opened, so a session's later requests skip the decryption: the key ring is
        # fixed for this codec's life, so a token that opened once always will. Age is still
        # checked on every call; tokens that fail are never kept.
        self._verified: dict[str, SessionToken] = {}

    def issue(self, owner_machine_id: str, inner_session_id: str, *, now: float) -> str:
        """A token proving that ``owner_machine_id`` holds ``inner_session_id``, which it hides."""
        if not _VISIBLE_ASCII.fullmatch(inner_session_id):
            raise ValueError(
                f"the inner server minted a session id that cannot be wrapped: it must be 1 to "
                f"{MAX_INNER_SESSION_ID_LENGTH} visible ASCII characters (MCP's rule)"
            )
        if _LOWER_HEX_32.fullmatch(inner_session_id):
            layout, inner = _LAYOUT_HEX, bytes.fromhex(inner_session_id)
        else:
            layout, inner = _LAYOUT_ASCII, inner_session_id.encode("ascii")
        plaintext = bytes([layout]) + int(now).to_bytes(_ISSUED_BYTES, "big") + inner
        nonce = os.urandom(_NONCE_BYTES)
        prefix = f"{owner_machine_id}.{TOKEN_FORMAT}"
        sealed = nonce + self._keys[0].encrypt(nonce, plaintext, prefix.encode("ascii"))
        return f"{prefix}.{_b64encode(sealed)}"

    def verify(self, token: str, *, now: float, max_age: float | None = None) -> SessionToken:
        """The owner and inner id a token proves. Raises ``InvalidToken`` for anything else."""
        session = self._verified.get(token)
        if session is None:
            session = self._open(token)
            if len(self._verified) >= VERIFIED_TOKENS_KEPT:
                del self._verified[next(iter(self._verified))]  # the oldest entry
            self._verified[token] = session
        age = now - session.issued_at
        if age < _EARLIEST_AGE:
            raise InvalidToken("token_from_future")
        if max_age is not None and age > max_age:
            raise InvalidToken("token_expired")
        return session

    def _open(self, token: str) -> SessionToken:
        if len(token) > MAX_TOKEN_LENGTH:
            raise InvalidToken("token_too_long")
        match = _TOKEN.fullmatch(token)
        if match is None:
            raise InvalidToken("malformed_token")
        sealed_text = match["sealed"]
        if len(sealed_text) % 4 == 1:
            raise InvalidToken("malformed_token")
        sealed = _b64decode(sealed_text)
        # Canonical spelling only: the last character may not carry unused bits.
        if _b64encode(sealed) != sealed_text:
            raise InvalidToken("malformed_token")
        nonce, ciphertext = sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:]
        associated = token[: match.end("owner") + 1 + len(TOKEN_FORMAT)].encode("ascii")
        for key in self._keys:
            try:
                plaintext = key.decrypt(nonce, ciphertext, associated)
            except InvalidTag:
                continue
            return _session(match["owner"], plaintext)
        raise InvalidToken("bad_signature")


def _session(owner_machine_id: str, plaintext: bytes) -> SessionToken:
    layout, issued, inner = plaintext[0], plaintext[1 : 1 + _ISSUED_BYTES], plaintext[1 + _ISSUED_BYTES :]
    # Only this codec seals, so a layout it does not know means a newer release sealed it.
    if layout == _LAYOUT_HEX and len(inner) == 16:
        inner_session_id = inner.hex()
    elif layout == _LAYOUT_ASCII and _VISIBLE_ASCII.fullmatch(inner.decode("latin-1")):
        inner_session_id = inner.decode("ascii")
    else:
        raise InvalidToken("malformed_token")
    return SessionToken(owner_machine_id, inner_session_id, int.from_bytes(issued, "big"))
