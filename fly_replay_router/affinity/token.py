"""The session token: an inner MCP session id, signed together with the machine that owns it.

Format (every part URL-safe ASCII, joined with ``.``)::

    <owner machine id>.<inner id, base64url>.<issued at, base64url int>.<HMAC-SHA256, base64url>

A 32-hex inner id (the SDK's ``uuid4().hex``) gives a 109-character token. The signature covers
the first three parts exactly; its key is derived from the secret *and* the app name, so a token of
another app or another secret never verifies. Signing and the key ring are itsdangerous's
``Signer``: every key of the ring verifies, the first one signs.

Reference: itsdangerous ``signer.py`` (key ring, salt per purpose); MCP's session id rule (visible
ASCII only, 0x21-0x7E).
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
import re
from collections.abc import Sequence
from dataclasses import dataclass

from itsdangerous import Signer
from itsdangerous.encoding import base64_encode, int_to_bytes
from itsdangerous.signer import HMACAlgorithm

MAX_TOKEN_LENGTH = 256
MAX_INNER_SESSION_ID_LENGTH = 128
# Verified tokens remembered per codec (about 300 bytes each): a few MB at most.
VERIFIED_TOKENS_KEPT = 10_000
# Tokens minted on a machine whose clock runs ahead are still young, not "from the future".
CLOCK_SKEW_SECONDS = 60

_SALT = "fly-replay-router session token v1 for app "
# A base64url string of 43 characters (32 bytes) leaves two bits of its last character unused;
# only the canonical characters are accepted, so a token has exactly one spelling.
_TOKEN = re.compile(
    r"(?P<payload>(?P<owner>[0-9a-z]{1,32})\.(?P<inner>[A-Za-z0-9_-]{2,171})\.(?P<issued>[A-Za-z0-9_-]{1,12}))"
    r"\.(?P<signature>[A-Za-z0-9_-]{42}[AEIMQUYcgkosw048])"
)
_VISIBLE_ASCII = re.compile(rf"[\x21-\x7e]{{1,{MAX_INNER_SESSION_ID_LENGTH}}}")


class InvalidToken(Exception):
    """A session token that does not prove an owner.

    ``reason`` is a stable code for logs and metrics: ``token_too_long``, ``malformed_token``,
    ``bad_signature`` (forged, another app, or a key no longer in the ring), ``token_from_future``
    or ``token_expired``.
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


class _PreparedHMAC(HMACAlgorithm):
    """itsdangerous's HMAC, with each key's inner and outer pads hashed once and then copied.

    The signatures are byte-for-byte those of ``HMACAlgorithm``; only the per-call set-up goes.
    """

    def __init__(self, digest_method: object) -> None:
        super().__init__(digest_method)
        self._prepared: dict[bytes, hmac.HMAC] = {}

    def get_signature(self, key: bytes, value: bytes) -> bytes:
        prepared = self._prepared.get(key)
        if prepared is None:
            prepared = self._prepared[key] = hmac.new(key, digestmod=self.digest_method)
        mac = prepared.copy()
        mac.update(value)
        return mac.digest()


class _RingSigner(Signer):
    """itsdangerous's ``Signer`` with derived keys computed once per key, not once per call."""

    def derive_key(self, secret_key: str | bytes | None = None) -> bytes:
        cache: dict[str | bytes | None, bytes] = self.__dict__.setdefault("_derived", {})
        derived = cache.get(secret_key)
        if derived is None:
            derived = cache[secret_key] = super().derive_key(secret_key)
        return derived


_URLSAFE_TO_STANDARD = bytes.maketrans(b"-_", b"+/")


def _b64decode(part: str) -> bytes:
    # base64.urlsafe_b64decode without its argument checks; bytes.translate is a table lookup,
    # str.translate a dict lookup per character (4x the instructions of the whole HMAC).
    return binascii.a2b_base64(part.encode("ascii").translate(_URLSAFE_TO_STANDARD) + b"=" * (-len(part) % 4))


class TokenCodec:
    """Issues and verifies session tokens for one app with one key ring."""

    def __init__(self, secret_keys: Sequence[str], *, app_name: str) -> None:
        if not secret_keys:
            raise ValueError("a token codec needs at least one secret key")
        # itsdangerous signs with the *last* key of its list and tries the newest first.
        self._signer = _RingSigner(
            list(reversed(secret_keys)),
            salt=_SALT + app_name,
            digest_method=hashlib.sha256,
            algorithm=_PreparedHMAC(hashlib.sha256),
        )
        # Tokens whose signature verified, so a session's later requests skip the HMAC: the key
        # ring is fixed for this codec's life, so a signature that verified once always will.
        # Age is still checked on every call; tokens that fail are never kept.
        self._verified: dict[str, SessionToken] = {}

    def issue(self, owner_machine_id: str, inner_session_id: str, *, now: float) -> str:
        """A token proving that ``owner_machine_id`` holds ``inner_session_id``."""
        if not _VISIBLE_ASCII.fullmatch(inner_session_id):
            raise ValueError(
                f"the inner server minted a session id that cannot be wrapped: it must be 1 to "
                f"{MAX_INNER_SESSION_ID_LENGTH} visible ASCII characters (MCP's rule)"
            )
        inner = base64_encode(inner_session_id).decode("ascii")
        issued = base64_encode(int_to_bytes(int(now))).decode("ascii")
        return self._signer.sign(f"{owner_machine_id}.{inner}.{issued}").decode("ascii")

    def verify(self, token: str, *, now: float, max_age: float | None = None) -> SessionToken:
        """The owner and inner id a token proves. Raises ``InvalidToken`` for anything else."""
        session = self._verified.get(token)
        if session is None:
            session = self._check_signature(token)
            if len(self._verified) >= VERIFIED_TOKENS_KEPT:
                del self._verified[next(iter(self._verified))]  # the oldest entry
            self._verified[token] = session
        age = now - session.issued_at
        if age < -CLOCK_SKEW_SECONDS:
            raise InvalidToken("token_from_future")
        if max_age is not None and age > max_age:
            raise InvalidToken("token_expired")
        return session

    def _check_signature(self, token: str) -> SessionToken:
        if len(token) > MAX_TOKEN_LENGTH:
            raise InvalidToken("token_too_long")
        match = _TOKEN.fullmatch(token)
        if match is None:
            raise InvalidToken("malformed_token")
        if not self._signer.verify_signature(match["payload"], match["signature"]):
            raise InvalidToken("bad_signature")
        return SessionToken(
            owner_machine_id=match["owner"],
            inner_session_id=_b64decode(match["inner"]).decode("ascii"),
            issued_at=int.from_bytes(_b64decode(match["issued"]), "big"),
        )
