"""The signing keys of JWT issuers, per worker: inline keys as they are, JWKS URLs fetched and kept.

A set fetched from a ``jwks_url`` is kept in the worker and used until one of these happens:

- a token names a ``kid`` the set lacks: the set is fetched again on the request, at most once per issuer every
  ``REFETCH_INTERVAL_SECONDS`` (an issuer that rotated its key is picked up at once; a flood of made-up kids
  costs one fetch a minute, not one per request);
- it is older than ``MAX_AGE_SECONDS``: a request that finds it so starts a fetch in the background and goes on
  with the set it has (a key the issuer withdrew stops working within about that long).

A fetch that fails (refused address, timeout, not JSON, no usable key) keeps the last good set and logs a
warning. With no set at all yet, the request gets 503 and a new attempt waits ``RETRY_FAILED_SECONDS``, so an
issuer's outage does not cost a connection attempt per request.

Fetches go through the same address checks as upstream calls: the URL is validated again as an upstream URL and
each connection is made by ``gateway.http1.connect_upstream`` (a name that now resolves to a refused address is
never contacted; resolving the name has the connect timeout). No redirects, short timeouts per read and a
deadline for the whole fetch (a server that drips a byte at a time is cut off at ``TOTAL_TIMEOUT_SECONDS``), a
size cap.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from typing import Any
from urllib.parse import urlsplit

import urllib3
from django.core.exceptions import ValidationError
from jwt import PyJWK
from jwt.exceptions import PyJWKError, PyJWTError

from apimgmt.selectors import IssuerSpec
from apimgmt.validation import validate_upstream_url
from gateway import metrics
from gateway.proxy import WatchedHTTPConnectionPool, WatchedHTTPSConnectionPool, _current_watch
from gateway.resilience import DeadlineReaper, DeadlineWatch

logger = logging.getLogger(__name__)

REFETCH_INTERVAL_SECONDS = 60.0
MAX_AGE_SECONDS = 600.0
RETRY_FAILED_SECONDS = 5.0
CONNECT_TIMEOUT_SECONDS = 2.0
READ_TIMEOUT_SECONDS = 3.0
TOTAL_TIMEOUT_SECONDS = 5.0
MAX_JWKS_BYTES = 256 * 1024
MAX_KEYS = 100
# Key types a token may be checked with: public keys only (an "oct" key is a shared secret, never used).
_PUBLIC_TYPES = frozenset({"RSA", "EC", "OKP"})
_PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "k")


# Cuts JWKS fetches at TOTAL_TIMEOUT_SECONDS (its thread starts with the first fetch of the process).
_REAPER = DeadlineReaper()


class FetchFailed(Exception):
    """A JWKS fetch that produced no usable key set; the message is for the log (no secrets in it)."""


class KeysUnavailable(Exception):
    """No key set is known for the issuer and none could be fetched now."""

    def __init__(self, retry_after: int) -> None:
        super().__init__("signing keys unavailable")
        self.retry_after = retry_after


class KeyRefused(Exception):
    """The token's kid and alg select no usable key; ``reason`` is the metric label, ``detail`` the client's text."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def parse_jwks(document: Any) -> dict[str, dict[str, Any]]:
    """kid -> JWK of the signing keys in a JWKS document ("" for a key without a kid). Keys that are not public
    signature keys (symmetric, encryption-only, with private members, of unknown type) are left out."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise FetchFailed('not a JWKS document ({"keys": [...]})')
    found: dict[str, dict[str, Any]] = {}
    for jwk in document["keys"][:MAX_KEYS]:
        if not isinstance(jwk, dict) or jwk.get("kty") not in _PUBLIC_TYPES:
            continue
        if jwk.get("use", "sig") != "sig" or any(member in jwk for member in _PRIVATE_MEMBERS):
            continue
        kid = jwk.get("kid", "")
        if not isinstance(kid, str) or kid in found:
            continue
        found[kid] = jwk
    if not found:
        raise FetchFailed("no public signing key in the JWKS document")
    return found


def fetch_jwks(url: str) -> dict[str, dict[str, Any]]:
    """GET the JWKS at ``url`` (checked as an upstream URL; connections vetted per address) and parse it."""
    try:
        validate_upstream_url(url, field="jwks_url")
    except ValidationError as exc:
        raise FetchFailed(" ".join(exc.messages)) from exc
    parts = urlsplit(url)
    https = parts.scheme == "https"
    pool_class = WatchedHTTPSConnectionPool if https else WatchedHTTPConnectionPool
    pool = pool_class(
        parts.hostname or "",
        parts.port or (443 if https else 80),
        maxsize=1,
        retries=False,
        timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT_SECONDS, read=READ_TIMEOUT_SECONDS),
    )
    # Socket timeouts bound each read, not their sum: a server that sends a byte now and then (in its headers or
    # its body) would hold the fetch, and every request waiting on the issuer's lock, for ever. The reaper shuts
    # the socket down at the deadline, which ends any read in progress.
    watch = _REAPER.watch(time.monotonic() + TOTAL_TIMEOUT_SECONDS)
    token = _current_watch.set(watch)  # the pool's connection hands its socket to the watch when it sends
    try:
        body = _get(pool, parts.path or "/", watch)
    finally:
        _current_watch.reset(token)
        _REAPER.done(watch)
    try:
        document = json.loads(body)
    except ValueError as exc:
        raise FetchFailed("not JSON") from exc
    return parse_jwks(document)


def _get(pool: WatchedHTTPConnectionPool | WatchedHTTPSConnectionPool, path: str, watch: DeadlineWatch) -> bytes:
    """The JWKS document's bytes (at most MAX_JWKS_BYTES), read before ``watch``'s deadline."""
    too_slow = f"took longer than {TOTAL_TIMEOUT_SECONDS:g} s"
    try:
        response = pool.urlopen(
            "GET",
            path,
            headers={"Accept": "application/jwk-set+json, application/json", "User-Agent": "apimgmt-gateway"},
            redirect=False,
            retries=False,
            preload_content=False,
        )
        try:
            if response.status != 200:
                raise FetchFailed(f"HTTP {response.status}")
            body = b""
            while len(body) <= MAX_JWKS_BYTES:
                chunk = response.read1(64 * 1024)  # what has arrived, not a wait for 64 KiB
                if not chunk:
                    break
                body += chunk
            if watch.expired:
                raise FetchFailed(too_slow)
            if len(body) > MAX_JWKS_BYTES:
                raise FetchFailed(f"larger than {MAX_JWKS_BYTES} bytes")
        finally:
            response.release_conn()
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise FetchFailed(too_slow if watch.expired else type(exc).__name__) from exc
    finally:
        pool.close()
    return body


class IssuerKeys:
    """One issuer's keys in this worker: the set, its age, and the parsed key per (kid, algorithm)."""

    def __init__(self, spec: IssuerSpec) -> None:
        self.spec = spec
        self.url = spec.jwks_url
        self.lock = threading.Lock()
        self.keys: dict[str, dict[str, Any]] | None = None
        if spec.public_keys:
            try:
                self.keys = parse_jwks(spec.public_keys)
            except FetchFailed as exc:  # validated when saved; an unusable set refuses tokens, never crashes
                logger.warning("inline keys of issuer %s are not usable: %s", spec.name, exc)
                self.keys = {}
        self.parsed: dict[tuple[str, str], Any] = {}
        self.fetched_at = time.monotonic()
        self.refetched_at = -math.inf  # the last unknown-kid refetch
        self.failed_at = -math.inf  # the last failed fetch while no set was known
        self.refreshing = False
        # Moves whenever the set changes: a verified token remembered under an older generation is checked again.
        self.generation = 0
        self.fetches = 0  # fetches started, for operators and tests

    def key(self, kid: str | None, alg: str) -> Any:
        """The public key to check a token with ``kid`` (None: the header has none) signed with ``alg``."""
        keys = self.keys
        if keys is None:
            keys = self._first_set()
        elif self.url and time.monotonic() - self.fetched_at > MAX_AGE_SECONDS:
            self._refresh_in_background()
        jwk, name = _select(keys, kid)
        if jwk is None and self.url and kid is not None:
            keys = self._refetched_for(kid)
            jwk, name = _select(keys, kid)
        if jwk is None:
            if kid is None:
                raise KeyRefused("unknown_kid", "The token names no key (kid) and its issuer has more than one.")
            raise KeyRefused("unknown_kid", "The token's key id (kid) is not one of its issuer's keys.")
        parsed = self.parsed.get((name, alg))
        if parsed is None:
            declared = jwk.get("alg")
            if declared is not None and declared != alg:
                raise KeyRefused("wrong_algorithm", f"The token's key (kid) is for {declared}, not {alg}.")
            try:
                parsed = PyJWK(jwk, algorithm=alg).key
            except (PyJWKError, PyJWTError, ValueError, TypeError) as exc:
                raise KeyRefused("wrong_algorithm", f"The token's key (kid) cannot check {alg} signatures.") from exc
            if len(self.parsed) >= 4 * MAX_KEYS:
                self.parsed.clear()
            self.parsed[(name, alg)] = parsed
        return parsed

    # -- fetching -----------------------------------------------------------------------------------------------

    def _first_set(self) -> dict[str, dict[str, Any]]:
        with self.lock:
            if self.keys is not None:  # another request fetched it while this one waited
                return self.keys
            wait = RETRY_FAILED_SECONDS - (time.monotonic() - self.failed_at)
            if wait > 0:
                raise KeysUnavailable(max(1, math.ceil(wait)))
            if self._fetch():
                assert self.keys is not None
                return self.keys
            self.failed_at = time.monotonic()
            raise KeysUnavailable(max(1, math.ceil(RETRY_FAILED_SECONDS)))

    def _refetched_for(self, kid: str) -> dict[str, dict[str, Any]]:
        """The set after one refetch for an unknown kid (the same set when a refetch was made lately)."""
        with self.lock:
            keys = self.keys
            assert keys is not None
            if kid in keys or time.monotonic() - self.refetched_at < REFETCH_INTERVAL_SECONDS:
                return keys
            self.refetched_at = time.monotonic()
            self._fetch()
            assert self.keys is not None
            return self.keys

    def _refresh_in_background(self) -> None:
        with self.lock:
            if self.refreshing:
                return
            self.refreshing = True

        def refresh() -> None:
            try:
                with self.lock:
                    if time.monotonic() - self.fetched_at > MAX_AGE_SECONDS and not self._fetch():
                        self.fetched_at = time.monotonic()  # keep the last good set a while longer
            finally:
                self.refreshing = False

        threading.Thread(target=refresh, name="jwks-refresh", daemon=True).start()

    def _fetch(self) -> bool:
        """Fetch the set (the caller holds the lock); on failure keep what there is and say why in the log."""
        self.fetches += 1
        try:
            keys = fetch_jwks(self.url)
        except FetchFailed as exc:
            metrics.count_jwks_fetch(self.spec.tenant_id, self.spec.id, "error")
            logger.warning(
                "JWKS of issuer %s could not be fetched (%s); %s",
                self.spec.name,
                exc,
                "keeping the last good keys" if self.keys is not None else "no keys yet",
                extra={"jwks_url": self.url, "issuer_id": self.spec.id},
            )
            return False
        except Exception:
            metrics.count_jwks_fetch(self.spec.tenant_id, self.spec.id, "error")
            logger.exception("JWKS of issuer %s could not be fetched", self.spec.name)
            return False
        metrics.count_jwks_fetch(self.spec.tenant_id, self.spec.id, "unchanged" if keys == self.keys else "ok")
        if keys != self.keys:
            self.keys = keys
            self.parsed = {}
            self.generation += 1
        self.fetched_at = time.monotonic()
        return True


def _select(keys: dict[str, dict[str, Any]], kid: str | None) -> tuple[dict[str, Any] | None, str]:
    if kid is None:
        if len(keys) == 1:
            name = next(iter(keys))
            return keys[name], name
        return None, ""
    return keys.get(kid), kid


class KeyCache:
    """Every issuer's keys in this worker, by issuer id; an issuer whose key source changed starts afresh."""

    def __init__(self) -> None:
        self.issuers: dict[str, IssuerKeys] = {}
        self.lock = threading.Lock()

    def for_issuer(self, spec: IssuerSpec) -> IssuerKeys:
        entry = self.issuers.get(spec.id)
        if entry is not None and entry.spec is spec:
            return entry
        with self.lock:
            entry = self.issuers.get(spec.id)
            if entry is None or entry.spec is not spec:
                if (
                    entry is not None
                    and entry.spec.jwks_url == spec.jwks_url
                    and entry.spec.public_keys == spec.public_keys
                ):
                    entry.spec = spec  # the route table was reloaded; the keys are the same
                else:
                    entry = IssuerKeys(spec)
                    self.issuers[spec.id] = entry
        return entry
