"""API key format, checksum and storage."""

from __future__ import annotations

import re

import pytest
from django.db import connection

from apimgmt import keys, services
from apimgmt.ids import BASE62
from apimgmt.models import ApiKey, Consumer

KEY_RE = re.compile(r"^ak_live_[0-9A-Za-z]{38}$")


def test_generated_keys_match_the_documented_format_and_verify() -> None:
    for _ in range(200):
        key = keys.generate_key()
        assert KEY_RE.match(key)
        assert len(key) == 46
        assert keys.is_well_formed(key)


def test_checksum_is_base62_crc32_of_the_first_40_characters() -> None:
    import zlib

    key = keys.generate_key()
    crc = zlib.crc32(key[:40].encode())
    digits = ""
    while crc:
        crc, rem = divmod(crc, 62)
        digits = BASE62[rem] + digits
    assert key[40:] == digits.rjust(6, "0")


def test_any_single_character_change_fails_verification() -> None:
    key = keys.generate_key()
    for position in range(len(key)):
        for replacement in ("0", "z", "A", "_", "-"):
            if key[position] == replacement:
                continue
            mutated = key[:position] + replacement + key[position + 1 :]
            assert not keys.is_well_formed(mutated), (position, replacement)


@pytest.mark.parametrize(
    "candidate",
    [
        "",
        "ak_live_",
        "ak_test_" + "a" * 38,
        "ak_live_" + "a" * 37,
        "ak_live_" + "a" * 39,
        "ak_live_" + "é" * 38,
        "x" * 46,
    ],
)
def test_malformed_keys_are_rejected_without_io(candidate: str, db: object, django_assert_num_queries: object) -> None:
    with django_assert_num_queries(0):  # type: ignore[operator]
        assert not keys.is_well_formed(candidate)


def test_hash_is_hmac_sha256_under_the_pepper_not_the_secret_key() -> None:
    key = keys.generate_key()
    assert keys.hash_key(key) == keys.hash_key(key)
    assert keys.hash_key(key, pepper="other") != keys.hash_key(key)
    assert re.fullmatch(r"[0-9a-f]{64}", keys.hash_key(key))


def test_database_holds_no_plaintext_key(bob_app: Consumer, bob: object) -> None:
    plaintexts = [services.api_key_create(consumer=bob_app, name=f"k{i}", actor=None)[1] for i in range(3)]
    key = ApiKey.objects.get(key_prefix=plaintexts[0][:12])
    plaintexts.append(services.api_key_rotate(key=key, overlap_seconds=60, actor=None)[1])
    hits = []
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT table_name, column_name FROM information_schema.columns "
            "WHERE table_schema = 'public' AND data_type IN ('text', 'character varying', 'jsonb')"
        )
        for table, column in cursor.fetchall():
            for plaintext in plaintexts:
                cursor.execute(f'SELECT count(*) FROM "{table}" WHERE "{column}"::text LIKE %s', [f"%{plaintext[8:]}%"])
                if cursor.fetchone()[0]:
                    hits.append((table, column))
    assert hits == []
    assert ApiKey.objects.filter(key_hash=keys.hash_key(plaintexts[0])).exists()
