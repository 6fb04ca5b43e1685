"""Django settings for apimgmt: every value comes from the environment (or an optional TOML file)."""

from __future__ import annotations

import logging
import os
import re
import sys
import tomllib
from pathlib import Path
from typing import Any

import environ
from django.core.exceptions import ImproperlyConfigured

from apimgmt.process_role import ProcessRole, serves_gateway
from apimgmt.redis_client import cache_settings

BASE_DIR = Path(__file__).resolve().parent.parent
TESTING = "pytest" in sys.modules or (len(sys.argv) > 1 and sys.argv[1] == "test")

# ---------------------------------------------------------------------------
# Optional TOML file (APIMGMT_CONFIG): the operations guide's sections.
# Environment variables always win over the file; ${VAR} is expanded.
# ---------------------------------------------------------------------------

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _expand(value: Any) -> Any:
    if isinstance(value, str):
        return _ENV_REF.sub(lambda m: os.environ.get(m.group(1), ""), value)
    if isinstance(value, dict):
        return {k: _expand(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v) for v in value]
    return value


def _load_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ImproperlyConfigured(f"APIMGMT_CONFIG points to {path!r}, which does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ImproperlyConfigured(f"APIMGMT_CONFIG file {path!r} is not valid TOML: {exc}") from exc
    expanded: dict[str, Any] = _expand(data)
    return expanded


CONFIG_FILE: dict[str, Any] = _load_toml(os.environ["APIMGMT_CONFIG"]) if os.environ.get("APIMGMT_CONFIG") else {}


def _file(section: str, key: str) -> Any:
    return CONFIG_FILE.get(section, {}).get(key)


def _file_redis_url() -> str | None:
    redis = CONFIG_FILE.get("redis")
    if not redis:
        return None
    scheme = "rediss" if redis.get("ssl") else "redis"
    password = redis.get("password") or ""
    auth = f":{password}@" if password else ""
    return f"{scheme}://{auth}{redis.get('host', '127.0.0.1')}:{redis.get('port', 6379)}/{redis.get('database', 0)}"


env = environ.Env()

# ---------------------------------------------------------------------------
# Core
# ---------------------------------------------------------------------------

DEBUG: bool = env.bool("DEBUG", default=False)

_DEV_SECRET = "django-insecure-dev-only-apimgmt-secret-key-change-me"
SECRET_KEY: str = env.str("SECRET_KEY", default="")
if not SECRET_KEY:
    if not (DEBUG or TESTING):
        raise ImproperlyConfigured("SECRET_KEY must be set when DEBUG is off")
    SECRET_KEY = _DEV_SECRET

# The pepper for API key hashes is separate from SECRET_KEY so that rotating
# the session secret never invalidates every API key.
_DEV_PEPPER = "dev-only-key-hash-pepper-not-for-production"
KEY_HASH_PEPPER: str = env.str("KEY_HASH_PEPPER", default="")
if not KEY_HASH_PEPPER:
    if not (DEBUG or TESTING):
        raise ImproperlyConfigured("KEY_HASH_PEPPER must be set when DEBUG is off")
    KEY_HASH_PEPPER = _DEV_PEPPER
if not DEBUG and not TESTING and len(KEY_HASH_PEPPER) < 32:
    raise ImproperlyConfigured("KEY_HASH_PEPPER must be at least 32 characters long")

ALLOWED_HOSTS: list[str] = env.list("ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS: list[str] = env.list("CSRF_TRUSTED_ORIGINS", default=[])

APIMGMT_ROLE: str = env.str("APIMGMT_ROLE", default=ProcessRole.ALL)
if APIMGMT_ROLE not in tuple(ProcessRole):
    raise ImproperlyConfigured(f"APIMGMT_ROLE must be one of {', '.join(ProcessRole)} (got {APIMGMT_ROLE!r})")

# Allow upstream URLs on loopback/private networks (development, in-cluster services).
UPSTREAM_ALLOW_PRIVATE: bool = env.bool("UPSTREAM_ALLOW_PRIVATE", default=DEBUG)

# Webhooks (apimgmt/webhooks.py, manage.py deliver_events). Endpoint URLs pass the upstreams' address checks;
# private addresses only with WEBHOOK_ALLOW_PRIVATE. A failed delivery is retried with exponential backoff
# (RETRY_BASE_SECONDS doubling, at most RETRY_MAX_DELAY_SECONDS apart, with jitter) for RETRY_WINDOW_SECONDS, then
# marked failed; an endpoint failing without a success for DISABLE_AFTER_SECONDS is disabled.
WEBHOOK_ALLOW_PRIVATE: bool = env.bool("WEBHOOK_ALLOW_PRIVATE", default=UPSTREAM_ALLOW_PRIVATE)
WEBHOOK_TIMEOUT_SECONDS: float = env.float("WEBHOOK_TIMEOUT_SECONDS", default=10.0)
WEBHOOK_RETRY_BASE_SECONDS: float = env.float("WEBHOOK_RETRY_BASE_SECONDS", default=5.0)
WEBHOOK_RETRY_MAX_DELAY_SECONDS: float = env.float("WEBHOOK_RETRY_MAX_DELAY_SECONDS", default=3 * 3600.0)
WEBHOOK_RETRY_WINDOW_SECONDS: float = env.float("WEBHOOK_RETRY_WINDOW_SECONDS", default=24 * 3600.0)
WEBHOOK_DISABLE_AFTER_SECONDS: float = env.float("WEBHOOK_DISABLE_AFTER_SECONDS", default=3 * 86400.0)
# Events and finished deliveries older than this are deleted by the deliverer (0 keeps everything).
EVENT_RETENTION_DAYS: int = env.int("EVENT_RETENTION_DAYS", default=30)
if min(WEBHOOK_TIMEOUT_SECONDS, WEBHOOK_RETRY_BASE_SECONDS, WEBHOOK_RETRY_MAX_DELAY_SECONDS) <= 0:
    raise ImproperlyConfigured("WEBHOOK_TIMEOUT_SECONDS and WEBHOOK_RETRY_*_SECONDS must be positive")

SITE_URL: str = env.str("SITE_URL", default="http://127.0.0.1:8000")

# ---------------------------------------------------------------------------
# Applications and middleware
# ---------------------------------------------------------------------------

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_prometheus",
    "apimgmt",
    "gateway",
    "portal",
]

MIDDLEWARE = [
    # Request id and client IP for every log line below; one JSON access-log line per request.
    "apimgmt.middleware.RequestContextMiddleware",
    # Counts and times every request that reaches Django (the gateway has its own metrics).
    "django_prometheus.middleware.PrometheusBeforeMiddleware",
    # Content-Security-Policy and Permissions-Policy on every control-plane response (never the gateway's).
    "apimgmt.middleware.SecurityHeadersMiddleware",
    "django.middleware.security.SecurityMiddleware",
    # Serves /static/ (admin, portal, API docs) from the app itself, with far-future caching headers.
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_prometheus.middleware.PrometheusAfterMiddleware",
]
if serves_gateway(APIMGMT_ROLE):
    # First, so API traffic never touches sessions, CSRF or URL resolution.
    MIDDLEWARE.insert(0, "gateway.middleware.GatewayMiddleware")

ROOT_URLCONF = "apimgmt.urls"
WSGI_APPLICATION = "apimgmt.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# ---------------------------------------------------------------------------
# Database: SQLite by default, PostgreSQL (psycopg 3, pooled) via DATABASE_URL
# ---------------------------------------------------------------------------

# An empty DATABASE_URL counts as unset.
DATABASES = {"default": env.db_url_config(os.environ.get("DATABASE_URL") or f"sqlite:///{BASE_DIR / 'db.sqlite3'}")}
DB_POOL_SIZE: int = env.int("DB_POOL_SIZE", default=int(_file("database", "pool_size") or 10))
if DATABASES["default"]["ENGINE"] in ("django.db.backends.postgresql", "django.db.backends.postgresql_psycopg2"):
    # django-prometheus's wrapper of Django's PostgreSQL backend: query, error and connection metrics.
    DATABASES["default"]["ENGINE"] = "django_prometheus.db.backends.postgresql"
    _options = DATABASES["default"].setdefault("OPTIONS", {})
    if env.bool("DB_POOL", default=not TESTING):
        _options["pool"] = {
            "min_size": 1,
            "max_size": DB_POOL_SIZE,
            "timeout": float(env.float("DB_POOL_TIMEOUT", default=float(_file("database", "pool_timeout") or 10))),
        }
    _options.setdefault("connect_timeout", env.int("DB_CONNECT_TIMEOUT", default=5))
    DATABASES["default"]["CONN_MAX_AGE"] = 0 if _options.get("pool") else env.int("CONN_MAX_AGE", default=60)
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = not _options.get("pool")
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Queries slower than this are logged with the words "slow query".
SLOW_QUERY_MS: int = env.int("SLOW_QUERY_MS", default=100)

# ---------------------------------------------------------------------------
# Redis and cache: django-redis via REDIS_URL, else local memory (per worker)
# ---------------------------------------------------------------------------

REDIS_URL: str | None = env.str("REDIS_URL", default="") or _file_redis_url() or None
# The suite under pytest-xdist (`make test`): every test flushes the Redis database it is given, so worker gwN uses
# the URL's database + N (PostgreSQL needs nothing: pytest-django gives each worker its own test database). Servers
# the tests start inherit it through the environment.
_xdist_worker = os.environ.get("PYTEST_XDIST_WORKER", "")
if TESTING and REDIS_URL and _xdist_worker.startswith("gw"):
    _plain = re.fullmatch(r"(redis://[^/]+)(?:/(\d+))?", REDIS_URL)
    if _plain:
        REDIS_URL = f"{_plain.group(1)}/{int(_plain.group(2) or 0) + int(_xdist_worker[2:])}"
        os.environ["REDIS_URL"] = REDIS_URL
# Sentinel and cluster URLs carry no password: it comes from here (apimgmt/redis_client.py).
REDIS_PASSWORD: str = env.str("REDIS_PASSWORD", default="")
REDIS_SENTINEL_PASSWORD: str = env.str("REDIS_SENTINEL_PASSWORD", default="")
# Short timeouts for every Redis client, the gateway's and the Django cache's (portal lock-outs and mail
# throttle, which fail open): the gateway must decide quickly when Redis is unwell.
REDIS_SOCKET_TIMEOUT: float = env.float("REDIS_SOCKET_TIMEOUT", default=0.25)
REDIS_CONNECT_TIMEOUT: float = env.float("REDIS_CONNECT_TIMEOUT", default=0.25)
CACHE_TTL_SECONDS: int = env.int("CACHE_TTL_SECONDS", default=int(_file("cache", "ttl_seconds") or 300))
CACHE_MAX_SIZE: int = env.int("CACHE_MAX_SIZE", default=int(_file("cache", "max_size") or 10000))

if REDIS_URL:
    # redis://, redis+sentinel://… or redis+cluster://…; a URL that cannot work stops the start here.
    CACHES = {
        "default": cache_settings(
            REDIS_URL,
            ttl=CACHE_TTL_SECONDS,
            connect_timeout=REDIS_CONNECT_TIMEOUT,
            socket_timeout=REDIS_SOCKET_TIMEOUT,
            password=REDIS_PASSWORD or None,
            sentinel_password=REDIS_SENTINEL_PASSWORD or None,
        )
    }
else:
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.locmem.LocMemCache",
            "TIMEOUT": CACHE_TTL_SECONDS,
            "OPTIONS": {"MAX_ENTRIES": CACHE_MAX_SIZE},
        }
    }
    if not TESTING:
        logging.getLogger("apimgmt").warning(
            "REDIS_URL is not set: caches and rate-limit counters are local to each worker process"
        )

# ---------------------------------------------------------------------------
# Gateway
# ---------------------------------------------------------------------------

GATEWAY: dict[str, Any] = {
    # How often a worker checks Redis for a changed configuration version.
    "CONFIG_POLL_SECONDS": env.float("GATEWAY_CONFIG_POLL_SECONDS", default=0.25),
    # Largest request body forwarded upstream; larger ones get 413.
    "MAX_BODY_BYTES": env.int(
        "GATEWAY_MAX_BODY_BYTES", default=int(_file("gateway", "max_body_bytes") or 10 * 1024**3)
    ),
    # A request body must keep coming: each 64 KiB of it (or its rest, when less) within this many seconds, else
    # 408 (a client dribbling a byte now and then must not hold an upstream connection). 0: no limit.
    "BODY_READ_TIMEOUT": env.float("GATEWAY_BODY_READ_TIMEOUT", default=10.0),
    # Bodies with a Content-Length up to this size are read whole before the upstream is contacted. 0: never.
    "BUFFER_BODY_BYTES": env.int("GATEWAY_BUFFER_BODY_BYTES", default=64 * 1024),
    # Proxies whose X-Forwarded-For we believe (IPs or CIDRs).
    "TRUSTED_PROXIES": env.list("TRUSTED_PROXIES", default=[]),
    "AUTH_CACHE_SECONDS": env.float("GATEWAY_AUTH_CACHE_SECONDS", default=30.0),
    "AUTH_CACHE_MAX_SIZE": env.int("GATEWAY_AUTH_CACHE_MAX_SIZE", default=CACHE_MAX_SIZE),
    # Key failures (unknown, revoked, expired) one client address may cause per window before it gets 429 without
    # any key look-up until the window ends (gateway/auth_throttle.py); 0 turns the throttle off.
    "AUTH_FAILURE_LIMIT": env.int("GATEWAY_AUTH_FAILURE_LIMIT", default=20),
    "AUTH_FAILURE_WINDOW_SECONDS": env.int("GATEWAY_AUTH_FAILURE_WINDOW_SECONDS", default=60),
    "USAGE_SPOOL_DIR": env.str("USAGE_SPOOL_DIR", default=str(BASE_DIR / "var" / "spool")),
    # Worker processes per pod, the number gunicorn runs (gunicorn.conf.py's on_starting exports it as
    # GUNICORN_WORKERS, whether it came from there, GATEWAY_WORKERS or --workers): local rate limits divide by it.
    "WORKERS": env.int(
        "GUNICORN_WORKERS", default=env.int("GATEWAY_WORKERS", default=int(_file("gateway", "workers") or 2))
    ),
    # Body-less idempotent requests to plain-http upstreams use the gateway's lean HTTP/1.1 client (about
    # +80 % requests/s in make bench); false sends everything through urllib3.
    "LEAN_HTTP1": env.bool("GATEWAY_LEAN_HTTP1", default=True),
}
if GATEWAY["BODY_READ_TIMEOUT"] < 0 or GATEWAY["BUFFER_BODY_BYTES"] < 0:
    raise ImproperlyConfigured("GATEWAY_BODY_READ_TIMEOUT and GATEWAY_BUFFER_BODY_BYTES must be 0 (off) or more")
if GATEWAY["AUTH_FAILURE_LIMIT"] < 0 or GATEWAY["AUTH_FAILURE_WINDOW_SECONDS"] < 1:
    raise ImproperlyConfigured(
        "GATEWAY_AUTH_FAILURE_LIMIT must be 0 (off) or more, GATEWAY_AUTH_FAILURE_WINDOW_SECONDS 1 or more"
    )

# Usage history: whole months of am_usage_records and its rollups older than this are dropped by the flusher
# (0 keeps everything).
USAGE_RETENTION_DAYS = env.int("USAGE_RETENTION_DAYS", default=0)
if USAGE_RETENTION_DAYS < 0:
    raise ImproperlyConfigured("USAGE_RETENTION_DAYS must be 0 (keep everything) or a number of days")

# ---------------------------------------------------------------------------
# Authentication, sessions and security
# ---------------------------------------------------------------------------

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
if TESTING:
    PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

SECURE_SSL_REDIRECT: bool = env.bool("SECURE_SSL_REDIRECT", default=False)
SECURE_REDIRECT_EXEMPT = [r"^health$", r"^ready$", r"^metrics$"]
SECURE_HSTS_SECONDS: int = env.int("SECURE_HSTS_SECONDS", default=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS: bool = env.bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", default=False)
SECURE_HSTS_PRELOAD: bool = env.bool("SECURE_HSTS_PRELOAD", default=False)
SESSION_COOKIE_SECURE: bool = env.bool("SESSION_COOKIE_SECURE", default=not DEBUG and not TESTING)
CSRF_COOKIE_SECURE: bool = env.bool("CSRF_COOKIE_SECURE", default=not DEBUG and not TESTING)
if env.bool("USE_X_FORWARDED_PROTO", default=False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
SECURE_CROSS_ORIGIN_OPENER_POLICY = "same-origin"
# Over HTTPS the cookies carry the __Host- prefix: the browser then takes them only with Secure, Path=/ and no
# Domain, so a sibling subdomain cannot plant a session or CSRF cookie. Plain names over http (development),
# where browsers refuse __Host- cookies.
SESSION_COOKIE_NAME = "__Host-sessionid" if SESSION_COOKIE_SECURE else "sessionid"
CSRF_COOKIE_NAME = "__Host-csrftoken" if CSRF_COOKIE_SECURE else "csrftoken"


def _csp_sources(value: str) -> dict[str, list[str]]:
    """CSP_EXTRA in policy syntax, "img-src https://cdn.example.com; connect-src https://sentry.example.com"."""
    extra: dict[str, list[str]] = {}
    for part in filter(None, (p.strip() for p in value.split(";"))):
        directive, *sources = part.split()
        if not re.fullmatch(r"[a-z]+(-[a-z]+)*", directive) or not sources or any("," in s for s in sources):
            raise ImproperlyConfigured(f"CSP_EXTRA: {part!r} is not '<directive> <source> …'")
        extra.setdefault(directive, []).extend(sources)
    return extra


# Content-Security-Policy of the control plane (apimgmt/middleware.py holds the strict default): CSP_EXTRA adds
# sources per directive, CSP_REPORT_URI a report-uri; CSP_REPORT_ONLY=1 only reports (to try a change out).
CSP_EXTRA: dict[str, list[str]] = _csp_sources(env.str("CSP_EXTRA", default=""))
CSP_REPORT_URI: str = env.str("CSP_REPORT_URI", default="")
CSP_REPORT_ONLY: bool = env.bool("CSP_REPORT_ONLY", default=False)

LOGIN_URL = "/admin/login/"

# Portal sign-in lockout (portal/lockout.py): counters in the shared cache, so every worker agrees.
# After ACCOUNT_FAILURES wrong passwords for one user name, or IP_FAILURES from one address, within
# LOCKOUT_SECONDS, further attempts are refused (even with the right password) until LOCKOUT_SECONDS pass.
PORTAL_LOGIN_ACCOUNT_FAILURES: int = env.int("PORTAL_LOGIN_ACCOUNT_FAILURES", default=5)
PORTAL_LOGIN_IP_FAILURES: int = env.int("PORTAL_LOGIN_IP_FAILURES", default=20)
PORTAL_LOGIN_LOCKOUT_SECONDS: int = env.int("PORTAL_LOGIN_LOCKOUT_SECONDS", default=900)

# Portal mail throttle (portal/mail_throttle.py): requests that make the portal mail someone (sign-up,
# password reset), at most ADDRESS_LIMIT per target address per ADDRESS_WINDOW_SECONDS and IP_LIMIT per
# client IP per IP_WINDOW_SECONDS, counted in the shared cache; over either, 429 and no mail.
PORTAL_MAIL_ADDRESS_LIMIT: int = env.int("PORTAL_MAIL_ADDRESS_LIMIT", default=3)
PORTAL_MAIL_ADDRESS_WINDOW_SECONDS: int = env.int("PORTAL_MAIL_ADDRESS_WINDOW_SECONDS", default=900)
PORTAL_MAIL_IP_LIMIT: int = env.int("PORTAL_MAIL_IP_LIMIT", default=20)
PORTAL_MAIL_IP_WINDOW_SECONDS: int = env.int("PORTAL_MAIL_IP_WINDOW_SECONDS", default=3600)
# Notice mails to developers (key expiring, quota, …; portal/notifications.py), sent by the event deliverer: at most
# NOTICE_MAIL_LIMIT per address per NOTICE_MAIL_WINDOW_SECONDS; more wait for the next window.
PORTAL_NOTICE_MAIL_LIMIT: int = env.int("PORTAL_NOTICE_MAIL_LIMIT", default=20)
PORTAL_NOTICE_MAIL_WINDOW_SECONDS: int = env.int("PORTAL_NOTICE_MAIL_WINDOW_SECONDS", default=3600)
if min(PORTAL_MAIL_ADDRESS_WINDOW_SECONDS, PORTAL_MAIL_IP_WINDOW_SECONDS, PORTAL_NOTICE_MAIL_WINDOW_SECONDS) < 1:
    raise ImproperlyConfigured("PORTAL_*_WINDOW_SECONDS must be at least 1 (0 would switch the throttle off)")

# ---------------------------------------------------------------------------
# Internationalisation and static files
# ---------------------------------------------------------------------------

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "/static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
# Without collectstatic (development, tests) WhiteNoise finds files in the apps themselves.
WHITENOISE_USE_FINDERS = True

EMAIL_BACKEND: str = env.str("EMAIL_BACKEND", default="django.core.mail.backends.console.EmailBackend")
DEFAULT_FROM_EMAIL: str = env.str("DEFAULT_FROM_EMAIL", default="apimgmt@localhost")
# Used by django.core.mail.backends.filebased.EmailBackend (tests read the portal's mails from it).
EMAIL_FILE_PATH: str | None = env.str("EMAIL_FILE_PATH", default="") or None
if env.str("EMAIL_URL", default=""):
    vars().update(env.email_url("EMAIL_URL"))

# ---------------------------------------------------------------------------
# Management API (DRF)
# ---------------------------------------------------------------------------

REST_FRAMEWORK: dict[str, Any] = {
    "DEFAULT_SCHEMA_CLASS": "apimgmt.api.schema.ManagementAutoSchema",
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "apimgmt.api.authentication.ApiTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["apimgmt.api.parsers.ManagementJSONParser"],
    "DEFAULT_PAGINATION_CLASS": "apimgmt.api.pagination.ManagementPagination",
    "EXCEPTION_HANDLER": "apimgmt.api.exceptions.problem_exception_handler",
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}
SPECTACULAR_SETTINGS: dict[str, Any] = {
    "TITLE": "apimgmt management API",
    "DESCRIPTION": "Manage tenants, APIs, consumers, keys, plans, policies and subscriptions; read usage and audit "
    "events. Authenticate with `Authorization: Token <token>`. Errors are application/problem+json.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
    "SCHEMA_PATH_PREFIX": r"/mgmt/v1",
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "apimgmt.api.schema.reject_unknown_request_fields",
    ],
    "ENUM_NAME_OVERRIDES": {
        "ApprovalEnum": "apimgmt.models.Plan.Approval",
        "ApiStatusEnum": "apimgmt.models.Api.Status",
        "SubscriptionStatusEnum": "apimgmt.models.Subscription.Status",
        "WebhookEndpointStatusEnum": "apimgmt.models.WebhookEndpoint.Status",
    },
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}

# ---------------------------------------------------------------------------
# Metrics and logging
# ---------------------------------------------------------------------------

PROMETHEUS_EXPORT_MIGRATIONS = False
LOG_LEVEL: str = env.str("LOG_LEVEL", default="INFO")

LOGGING: dict[str, Any] = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"json": {"()": "apimgmt.logs.JsonFormatter"}},
    "filters": {"request_id": {"()": "apimgmt.logs.RequestIdFilter"}},
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "json", "filters": ["request_id"]},
    },
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        "django.db.backends": {"propagate": True},
        # apimgmt.access logs every request (route template, never the raw path, which may hold a
        # reset token); django.request would repeat each 4xx with the raw path, so only errors pass.
        "django.request": {"level": "ERROR", "propagate": True},
    },
}
