"""API key format: generation, offline checksum validation and the peppered hash that is all we store.

Format: ``ak_live_`` + 32 random base62 characters + 6-character base62 CRC32
(zlib) of the first 40 characters, left-padded with ``0`` — 46 characters in all.
The checksum lets the gateway reject a typo or a forged key without any I/O and
lets secret scanners find leaked keys.
"""

from __future__ import annotations

import hashlib
import hmac
import zlib

from django.conf import settings

from apimgmt.ids import BASE62, random_base62

KEY_PREFIX = "ak_live_"
KEY_RANDOM_LENGTH = 32
CHECKSUM_LENGTH = 6
KEY_LENGTH = len(KEY_PREFIX) + KEY_RANDOM_LENGTH + CHECKSUM_LENGTH  # 46
DISPLAY_PREFIX_LENGTH = 12  # stored in key_prefix, e.g. "ak_live_3kT9"
_BASE62_SET = frozenset(BASE62)


def base62_encode(number: int, width: int) -> str:
    digits: list[str] = []
    while number:
        number, rem = divmod(number, 62)
        digits.append(BASE62[rem])
    return "".join(reversed(digits)).rjust(width, "0")


def checksum(body: str) -> str:
    """Base62 CRC32 of the key body (prefix + random part), 6 characters."""
    return base62_encode(zlib.crc32(body.encode("ascii")) & 0xFFFFFFFF, CHECKSUM_LENGTH)


def generate_key() -> str:
    body = KEY_PREFIX + random_base62(KEY_RANDOM_LENGTH)
    return body + checksum(body)


def is_well_formed(key: str) -> bool:
    """True when ``key`` has the right prefix, length, alphabet and checksum. No I/O."""
    if len(key) != KEY_LENGTH or not key.startswith(KEY_PREFIX):
        return False
    rest = key[len(KEY_PREFIX) :]
    if not _BASE62_SET.issuperset(rest):
        return False
    body, check = key[:-CHECKSUM_LENGTH], key[-CHECKSUM_LENGTH:]
    return hmac.compare_digest(checksum(body), check)


def hash_key(key: str, pepper: str | None = None) -> str:
    """HMAC-SHA256 of the key under KEY_HASH_PEPPER, hex. The only form of a key we store."""
    secret = (pepper if pepper is not None else settings.KEY_HASH_PEPPER).encode()
    return hmac.new(secret, key.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()


def display_prefix(key: str) -> str:
    return key[:DISPLAY_PREFIX_LENGTH]
