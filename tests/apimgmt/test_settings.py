"""Settings come from the environment (and an optional TOML file); production refuses unsafe values."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.support.settings_probe import run_python

ROOT = Path(__file__).resolve().parents[2]
PROD = {
    "DEBUG": "0",
    "SECRET_KEY": "s" * 60 + "-Very-Random-Secret-Key-0123456789",
    "KEY_HASH_PEPPER": "p" * 40,
    "ALLOWED_HOSTS": "apimgmt.example.com",
    "DATABASE_URL": "postgres://postgres@127.0.0.1:5432/test",
    "REDIS_URL": "redis://127.0.0.1:6379/9",
}


def _python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return run_python(code, env, drop=set(PROD))


def _settings(env: dict[str, str], *names: str) -> dict[str, object]:
    code = f"import json; from django.conf import settings as s; print(json.dumps({{n: getattr(s, n) for n in {names!r}}}, default=str))"
    result = _python(code, env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_production_without_secret_key_refuses_to_start() -> None:
    result = _python("from django.conf import settings; settings.SECRET_KEY", {**PROD, "SECRET_KEY": ""})
    assert result.returncode != 0 and "SECRET_KEY must be set" in result.stderr


def test_short_pepper_refuses_to_start() -> None:
    result = _python("from django.conf import settings; settings.SECRET_KEY", {**PROD, "KEY_HASH_PEPPER": "short"})
    assert result.returncode != 0 and "KEY_HASH_PEPPER must be at least 32" in result.stderr


def test_bad_role_refuses_to_start() -> None:
    result = _python("from django.conf import settings; settings.SECRET_KEY", {**PROD, "APIMGMT_ROLE": "proxy"})
    assert result.returncode != 0 and "APIMGMT_ROLE must be one of" in result.stderr


def test_no_database_url_means_sqlite_and_no_redis_means_local_memory() -> None:
    env = {**PROD, "DATABASE_URL": "", "REDIS_URL": ""}
    values = _settings(env, "DATABASES", "CACHES")
    assert "sqlite3" in str(values["DATABASES"])
    assert "LocMemCache" in str(values["CACHES"])
    result = _python("import django; django.setup()", env)
    assert "limits are per worker" in result.stderr or "local to each worker" in result.stderr


def test_postgres_uses_psycopg_pool() -> None:
    values = _settings(PROD, "DATABASES")
    assert "'pool'" in str(values["DATABASES"]) and "postgresql" in str(values["DATABASES"])


def test_toml_file_sections_are_read_and_environment_wins(tmp_path: Path) -> None:
    config = tmp_path / "apimgmt.toml"
    config.write_text(
        '[database]\npool_size = 20\n[redis]\nhost = "redis-service"\nport = 6380\ndatabase = 2\n'
        'password = "${REDIS_PASSWORD}"\nssl = true\n[cache]\nttl_seconds = 120\nmax_size = 500\n'
        "[gateway]\nworkers = 4\n"
    )
    env = {**PROD, "REDIS_URL": "", "APIMGMT_CONFIG": str(config), "REDIS_PASSWORD": "s3cr3t"}
    values = _settings(env, "DB_POOL_SIZE", "REDIS_URL", "CACHE_TTL_SECONDS", "CACHE_MAX_SIZE", "GATEWAY")
    assert values["DB_POOL_SIZE"] == 20
    assert values["REDIS_URL"] == "rediss://:s3cr3t@redis-service:6380/2"
    assert values["CACHE_TTL_SECONDS"] == 120 and values["CACHE_MAX_SIZE"] == 500
    assert values["GATEWAY"]["WORKERS"] == 4  # type: ignore[index]
    env_wins = _settings({**env, "DB_POOL_SIZE": "7", "REDIS_URL": "redis://other:6379/0"}, "DB_POOL_SIZE", "REDIS_URL")
    assert env_wins == {"DB_POOL_SIZE": 7, "REDIS_URL": "redis://other:6379/0"}


def test_broken_toml_file_is_a_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[database\npool_size = ")
    result = _python("from django.conf import settings; settings.SECRET_KEY", {**PROD, "APIMGMT_CONFIG": str(config)})
    assert result.returncode != 0 and "is not valid TOML" in result.stderr
    result = _python("from django.conf import settings; settings.SECRET_KEY", {**PROD, "APIMGMT_CONFIG": "/nope.toml"})
    assert "does not exist" in result.stderr


def test_check_deploy_is_clean_with_production_settings() -> None:
    env = {
        **PROD,
        "SECURE_SSL_REDIRECT": "1",
        "SECURE_HSTS_SECONDS": "31536000",
        "SECURE_HSTS_INCLUDE_SUBDOMAINS": "1",
        "SECURE_HSTS_PRELOAD": "1",
    }
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_check_deploy_flags_a_development_pepper() -> None:
    env = {
        **PROD,
        "KEY_HASH_PEPPER": "dev-only-key-hash-pepper-not-for-production",
        "SECURE_SSL_REDIRECT": "1",
        "SECURE_HSTS_SECONDS": "31536000",
        "SECURE_HSTS_INCLUDE_SUBDOMAINS": "1",
        "SECURE_HSTS_PRELOAD": "1",
    }
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy"],
        cwd=ROOT,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0 and "apimgmt.E001" in result.stderr
