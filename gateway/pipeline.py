"""One request through the gateway: the runner of gateway.chain's order, and the fixed steps (route, authenticate,
limits, proxy, record). WSGI-level, no Django request."""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import redis
from django.conf import settings
from django.db import DatabaseError

from apimgmt import client_address, redis_client
from apimgmt.context import accept_request_id, client_ip_var, request_id_var
from apimgmt.redis_client import get_redis
from apimgmt.selectors import KeyRecord
from apimgmt.spec_operations import ALLOWED, NO_PATH, Match
from apimgmt.validation import RESERVED_SEGMENTS
from gateway import auth, auth_throttle, metrics, ratelimit, streams
from gateway.accesslog import AccessLog
from gateway.auth import auth_problem
from gateway.chain import ACCESS, CACHE_LOOKUP, PRE_AUTH, REQUEST_TRANSFORMS, Exchange, Finished, Result
from gateway.config import RouteState
from gateway.policies import cors, ip_rules
from gateway.problems import GatewayResponse, problem, status_line
from gateway.proxy import (
    HOP_BY_HOP,
    BodyTooLarge,
    ClientBodyError,
    RequestBody,
    UpstreamError,
    Upstreams,
    body_is_small,
    forward_request,
    response_headers,
)
from gateway.resilience import Balancer, CircuitBreaker
from gateway.routing import BadRequestTarget, Route, split_request_target
from gateway.usage import UsageRecorder

logger = logging.getLogger(__name__)

# Request headers the gateway sets itself: a client's own values are never passed on.
_SET_BY_GATEWAY = frozenset(
    {
        "host",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-request-id",
        "x-consumer-id",
        "x-tenant-id",
        "forwarded",
    }
)
_HEADER_NAMES: dict[str, str] = {}
# Callers whose sliding-window limits are kept ready per worker (cleared whole when full, and on config changes).
WINDOW_CACHE_SIZE = 10_000


def _header_name(environ_key: str) -> str:
    name = _HEADER_NAMES.get(environ_key)
    if name is None:
        name = environ_key[5:].replace("_", "-").title()
        if len(_HEADER_NAMES) < 4096:
            _HEADER_NAMES[environ_key] = name
    return name


class Gateway:
    """The per-worker gateway: route table, key caches, limiter fallbacks, upstream pools, breakers, usage."""

    def __init__(self) -> None:
        self.routes = RouteState()
        self.keys = auth.KeyResolver()
        self.auth_throttle = auth_throttle.AuthFailureThrottle()
        self.routes.on_evict.append(self.keys.evict)
        self.routes.on_keys_lost.append(self.keys.clear)
        self.routes.on_change.append(self._prune_resilience)
        self._window_cache: dict[
            tuple[str, ...], tuple[Route, list[ratelimit.Window], tuple[list[str], list[Any]]]
        ] = {}
        self.routes.on_change.append(self._window_cache.clear)
        self.usage = UsageRecorder()
        self.access_log = AccessLog()
        self.local_limits = ratelimit.LocalLimiter()
        self.store = ratelimit.StoreHealth()
        self.upstreams = Upstreams()
        self.balancers: dict[str, tuple[tuple[Any, ...], Balancer]] = {}
        self.breakers: dict[str, tuple[tuple[Any, ...], CircuitBreaker]] = {}
        self.max_body = int(settings.GATEWAY["MAX_BODY_BYTES"])
        self.body_read_timeout = float(settings.GATEWAY["BODY_READ_TIMEOUT"])
        self.buffer_body_bytes = int(settings.GATEWAY["BUFFER_BODY_BYTES"])
        self.trusted = client_address.configured_networks()
        self.started = False
        # Metric children by label values: labels() costs a lock and a dict build per call.
        self._counters: dict[tuple[str, str, str, str], Any] = {}
        self._histograms: dict[tuple[str, str], tuple[Any, Any]] = {}

    # -- lifecycle ----------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start this worker's background threads (config poller, usage flusher); safe to call repeatedly."""
        self.routes.start()
        self.usage.start()
        self.started = True

    def stop(self) -> None:
        self.routes.stop()
        self.usage.stop()

    def ready(self) -> bool:
        """Readiness: the route table has loaded (loading it now if needed)."""
        if not self.routes.loaded:
            try:
                self.routes.current()
            except Exception:
                return False
        return self.routes.loaded

    # -- the request --------------------------------------------------------------------------------------------

    def handle(self, environ: dict[str, Any]) -> Result | None:
        """Answer a request under an API's base_path; None when the path belongs to Django."""
        if not self.started:
            self.start()
        raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
        if not raw:
            raw = quote(environ.get("PATH_INFO", "/").encode("latin-1"), safe="/;=,:@!$&'()*+~")
            if environ.get("QUERY_STRING"):
                raw += "?" + environ["QUERY_STRING"]
        try:
            path, query = split_request_target(raw)
        except BadRequestTarget as exc:
            if _control_plane(raw):
                return None
            started = time.perf_counter()
            request_id = accept_request_id(environ.get("HTTP_X_REQUEST_ID"))
            done = Finished(request_id, environ.get("REQUEST_METHOD", "GET"), started)
            return self._error(done, problem(400, "bad-path", "Bad request path", str(exc), request_id))
        table = self.routes.current()
        host = environ.get("HTTP_HOST", "")
        if host:
            host = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            host = host.lower()
        route = table.resolve(host, path)
        if route is None:
            return None
        return self._serve(environ, route, path, query, table.plan_policies)

    def _serve(self, environ: dict[str, Any], route: Route, path: str, query: str, plans: dict[str, Any]) -> Result:
        """The chain (gateway.chain): each step returns None to go on, or the Result that ends the request."""
        started = time.perf_counter()
        request_id = accept_request_id(environ.get("HTTP_X_REQUEST_ID"))
        request_id_var.set(request_id)
        method = environ.get("REQUEST_METHOD", "GET")
        done = Finished(request_id, method, started)
        done.route = route
        client_ip = self._client_ip(environ)
        client_ip_var.set(client_ip)
        ex = Exchange(self, environ, route, method, path, query, request_id, client_ip, done)
        chain = route.chain
        if chain.empty:
            result = self._route_step(ex) or self._authenticate(ex) or self._limits(ex, plans) or self._proxy(ex)
        else:
            result = (
                self._route_step(ex)
                or chain.run(ex, PRE_AUTH)
                or self._authenticate(ex)
                or chain.run(ex, ACCESS)
                or self._limits(ex, plans)
                or chain.run(ex, REQUEST_TRANSFORMS)
                or chain.run(ex, CACHE_LOOKUP)
                or self._proxy(ex)
            )
            result = chain.respond(ex, result)  # response transforms, cache store
        if not result.recorded:
            self._finish(done)  # record (a streamed body records when it is closed)
        return result

    # -- the fixed steps ----------------------------------------------------------------------------------------

    def _route_step(self, ex: Exchange) -> Result | None:
        """The rest of routing: an API restricted to its OpenAPI document routes only the operations in it (before
        any key look-up); a WebSocket handshake (APIs that allow it) may carry its key in a protocol entry or the query.
        """
        route = ex.route
        if route.operations is not None:
            method = ex.method
            if method == "OPTIONS" and cors.answers_preflight(route, ex.environ):
                # A CORS preflight asks about another method: the document is checked for that one, and the cors
                # step (pre_auth) answers.
                method = ex.environ.get("HTTP_ACCESS_CONTROL_REQUEST_METHOD", method).upper()
            operation = route.operations.match(method, ex.path[len(route.spec.base_path) :])
            if operation.status != ALLOWED:
                return ex.fail(_not_in_spec(operation, method, ex.request_id))
        if "HTTP_UPGRADE" in ex.environ and route.spec.websocket and _websocket().wants_upgrade(ex.environ):
            ex.upgrade = True
            ex.environ, ex.query = _websocket().move_credentials(ex.environ, route, ex.query)
        return None

    def _authenticate(self, ex: Exchange) -> Result | None:
        """The caller: an API key (gateway.auth), or a JWT from one of the API's issuers (gateway.jwt_auth); then
        the IP lists its consumer or key carry, if any (gateway.policies.ip_rules; four attribute reads otherwise)."""
        auth_method = ex.route.auth_method
        if auth_method != "key":
            jwt_auth = _jwt_auth()
            if auth_method == "jwt" or jwt_auth.presents_jwt(ex):
                return jwt_auth.authenticate(ex) or self._caller_known(ex)
        return self._key_auth(ex) or self._caller_known(ex)

    @staticmethod
    def _caller_known(ex: Exchange) -> Result | None:
        """The caller is known: its plan for this API (for the access steps), and its own IP lists if it has any."""
        record = ex.record
        if record is None:
            return None
        ex.plan_id = record.subscriptions.get(ex.route.api_id, "")
        if record.consumer_ip_allow or record.consumer_ip_deny or record.key_ip_allow or record.key_ip_deny:
            return ip_rules.check_caller(ex)
        return None

    def _key_auth(self, ex: Exchange) -> Result | None:
        # An address with too many failures gets no key look-ups for a while (gateway.auth_throttle).
        route, client_ip, request_id = ex.route, ex.client_ip, ex.request_id
        throttled = self.auth_throttle.retry_after(client_ip) if self.auth_throttle.blocked else None
        try:
            record, credential, failure = auth.authenticate(
                ex.environ, route, ex.query, self.keys, lookup=throttled is None
            )
        except (DatabaseError, redis.RedisError):
            logger.exception("key lookup failed")
            return ex.fail(
                problem(
                    503,
                    "key-store-unavailable",
                    "Service unavailable",
                    "Keys cannot be checked right now; retry shortly.",
                    request_id,
                    headers=[("Retry-After", "1")],
                ),
            )
        if failure is not None:
            retry = throttled if failure is auth.THROTTLED else None
            if failure.reason in auth_throttle.COUNTED_REASONS:
                retry = self.auth_throttle.failed(client_ip)
            if retry is not None:
                metrics.auth_throttled_total.labels(route.api_id).inc()
                detail = f"{auth.THROTTLED.detail} Retry in {retry} s."
                return ex.fail(
                    problem(
                        429,
                        "auth-throttled",
                        "Too many requests",
                        detail,
                        request_id,
                        headers=[("Retry-After", str(retry))],
                    ),
                )
            metrics.count_auth_failure(route.api_id, failure.reason)
            # A 403 for the API's own tenant is that consumer's traffic. Another tenant's key is not: its consumer
            # and key ids must never show up in this tenant's usage, access log or metrics.
            if record is not None and failure.status == 403 and failure.reason != "wrong_tenant":
                ex.done.record, ex.done.key = record, record.key_id
            return ex.fail(auth_problem(route, failure, request_id))
        assert record is not None and credential is not None
        ex.done.record, ex.done.key = record, record.key_id
        ex.record, ex.credential = record, credential
        return None

    def _limits(self, ex: Exchange, plans: dict[str, Any]) -> Result | None:
        """Rate limits and quotas: the limiter call is sent, the upstream request prepared while Redis answers (so
        the reply is usually there when it is read), then the decision.

        A route whose cache lookup reads with the limits (chain.Step.reads_with_limits) has the cached answer's key
        read in the same write; the upstream request is then prepared only when that answer is not a hit.
        """
        route, record = ex.route, ex.record
        assert record is not None
        plan_id = ex.plan_id
        windows, script = self._windows(route, record, plan_id, plans, ex.client_ip)
        reader = route.chain.limits_reader if windows else None
        read_key = reader.limits_read(ex) if reader is not None else None
        if read_key is not None and redis_client.hash_tag(read_key) != redis_client.hash_tag(script[0][0]):
            read_key = None  # another slot (a plan's policy of another tenant): the step reads on its own
        pending = self._send_limits(route, windows, script, read_key) if windows else None
        if read_key is None:
            try:
                self._prepare_upstream(ex)
            except BaseException:
                if isinstance(pending, ratelimit.PendingCheck):
                    pending.abandon()
                raise
        if not windows:
            return None
        decision, replies = self._limit_decision(route, windows, pending)
        request_id = ex.request_id
        if decision.unavailable:
            return ex.fail(
                problem(
                    503,
                    "rate-limit-store-unavailable",
                    "Service unavailable",
                    "Rate limits cannot be checked right now; retry shortly.",
                    request_id,
                    headers=[("Retry-After", str(decision.retry_after))],
                ),
            )
        limit_headers = decision.headers or []
        if decision.blocked is not None:
            window = decision.blocked.window
            detail = (
                f"Policy '{window.policy.name}' allows {window.limit} requests per {window.label}; "
                f"retry in {decision.retry_after} s."
            )
            return ex.fail(
                problem(
                    429,
                    "rate-limited",
                    "Too many requests",
                    detail,
                    request_id,
                    headers=[*limit_headers, ("Retry-After", str(decision.retry_after))],
                    extra={"policy": window.policy.name, "policy_id": window.policy.id, "window": window.label},
                ),
            )
        if limit_headers:
            if ex.state is None:
                ex.state = {}
            ex.state["limit_headers"] = limit_headers
        if read_key is not None:
            assert reader is not None
            if replies and not isinstance(replies[0], redis.ResponseError):
                answered = reader.limits_reply(ex, replies[0])
                if answered is not None:
                    route.chain.answered_with_limits(ex, reader)
                    return answered
            self._prepare_upstream(ex)
        return None

    def _prepare_upstream(self, ex: Exchange) -> None:
        """The upstream request's headers, path and query (the credential's query parameter never reaches it)."""
        route = ex.route
        spec = route.spec
        assert ex.record is not None and ex.credential is not None
        ex.upstream_headers = self._upstream_headers(
            ex.environ, route, ex.record, ex.credential, ex.request_id, ex.client_ip
        )
        ex.target_path = ex.path[len(spec.base_path) :] if spec.strip_path else ex.path
        ex.query = auth.upstream_query(ex.query, ex.credential, route)

    def _proxy(self, ex: Exchange) -> Result:
        """The upstream call: the body (small ones buffered first), the breaker, the response streamed or whole."""
        limit_headers: list[tuple[str, str]] = ex.state.get("limit_headers", []) if ex.state else []
        environ, route, method, request_id, done = ex.environ, ex.route, ex.method, ex.request_id, ex.done
        spec = route.spec
        if ex.upgrade:
            assert ex.record is not None and ex.credential is not None
            result: Result = _websocket().open_connection(
                self,
                environ,
                route,
                ex.record,
                ex.credential,
                done,
                ex.upstream_headers,
                ex.target_path,
                ex.query,
                limit_headers,
                identity=ex.state.get("jwt_identity") if ex.state else None,  # jwt_auth.IDENTITY_STATE
            )
            result.recorded = True  # every answer of open_connection is recorded there (the handshake at once)
            return result
        length_text = environ.get("CONTENT_LENGTH") or ""
        chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
        try:
            length = int(length_text) if length_text else None
        except ValueError:
            return ex.fail(problem(400, "bad-length", "Bad request", "Content-Length is not a number.", request_id))
        # An API's request_limits policy may set a smaller cap for this request (gateway/policies/request_limits.py).
        max_body = self.max_body
        if ex.state is not None and "max_body_bytes" in ex.state:
            max_body = min(max_body, ex.state["max_body_bytes"])
        if length is not None and length > max_body:
            return ex.fail(self._too_large(request_id, max_body))
        body = None
        if length or chunked:
            body = RequestBody(
                environ["wsgi.input"],
                length,
                max_body,
                client_socket=environ.get("gunicorn.socket"),
                reaper=self.upstreams.reaper,
                read_timeout=self.body_read_timeout,
            )
            if length is not None and length <= self.buffer_body_bytes:
                # A small body is read whole first: a slow client then never holds an upstream connection.
                try:
                    body.buffer()
                except ClientBodyError as exc:
                    done.bytes_in = body.sent
                    return self._client_body_failed(ex, exc)
        breaker = self._breaker(route)
        allowed, wait = breaker.allow()
        if not allowed:
            if body is not None:
                body.close()
            return ex.fail(
                problem(
                    503,
                    "circuit-open",
                    "Service unavailable",
                    "The upstream is failing; requests are paused.",
                    request_id,
                    headers=[("Retry-After", str(max(1, int(wait + 0.999))))],
                ),
            )
        try:
            upstream = forward_request(
                self.upstreams,
                self._balancer(route),
                method=method,
                path=ex.target_path,
                query=ex.query,
                headers=ex.upstream_headers,
                body=body,
                chunked=chunked and length is None,
                connect_timeout=spec.connect_timeout,
                read_timeout=spec.read_timeout,
                total_timeout=spec.total_timeout,
                retries=spec.retries,
            )
        except UpstreamError as exc:
            if body is not None and body.started and not body.complete:
                # It broke while the client's body was still arriving: the gateway cannot tell a slow or vanished
                # client from a failing upstream there, so it is not held against the upstream.
                breaker.release()
            else:
                breaker.failure()
            done.bytes_in = body.sent if body else 0
            title = "Bad gateway" if exc.status == 502 else "Gateway timeout"
            slug = "upstream-unavailable" if exc.status == 502 else "upstream-timeout"
            return ex.fail(problem(exc.status, slug, title, exc.detail, request_id), limit_headers)
        except BodyTooLarge:
            breaker.release()
            return ex.fail(self._too_large(request_id, max_body))
        except ClientBodyError as exc:
            breaker.release()  # the client's fault, never the upstream's
            done.bytes_in = body.sent if body else 0
            return self._client_body_failed(ex, exc)
        finally:
            if body is not None:
                body.close()
        response = upstream.response
        if response.status >= 500 and response.status != 501:
            breaker.failure()
        else:
            breaker.success()
        done.bytes_in = body.sent if body else 0
        done.upstream_s = upstream.headers_at - upstream.started
        done.status = response.status
        out_headers = response_headers(response)
        out_headers = [h for h in out_headers if h[0].lower() != "x-request-id"]
        out_headers += limit_headers
        out_headers += route.extra_headers
        out_headers.append(("X-Request-ID", request_id))
        status = f"{response.status} {response.reason or status_line(response.status)[4:]}"
        if body_is_small(response, method):
            try:
                data = response.read(decode_content=False) if method != "HEAD" else b""
            except Exception as exc:  # the upstream broke off mid-body, or the deadline cut it
                self.upstreams.reaper.done(upstream.watch)
                response.release_conn()
                breaker.failure()
                code = 504 if upstream.watch.expired else 502
                detail = (
                    "The upstream response was incomplete."
                    if code == 502
                    else "The upstream did not finish within the API's total timeout."
                )
                logger.warning("upstream response failed: %s", exc)
                return ex.fail(
                    problem(
                        code,
                        "upstream-unavailable" if code == 502 else "upstream-timeout",
                        "Bad gateway" if code == 502 else "Gateway timeout",
                        detail,
                        request_id,
                    ),
                    limit_headers,
                )
            self.upstreams.reaper.done(upstream.watch)
            response.release_conn()
            done.bytes_out = len(data)
            return Result(status, out_headers, [data] if data else [])
        # A stream (SSE, or no length) of an API with a stream_timeout: an idle gap instead of the total deadline.
        chunks = (
            streams.chunks(upstream, spec.stream_timeout)
            if spec.stream_timeout and streams.is_stream(response)
            else None
        )
        if chunks is not None:
            out_headers.append(("X-Accel-Buffering", "no"))  # nginx in front passes each event on at once too
        result = Result(status, out_headers, StreamedBody(self, upstream, done, chunks))
        result.recorded = True  # StreamedBody.close() records
        return result

    def _too_large(self, request_id: str, cap: int | None = None) -> GatewayResponse:
        return problem(
            413,
            "body-too-large",
            "Request body too large",
            f"The request body may be at most {self.max_body if cap is None else cap} bytes.",
            request_id,
        )

    # -- steps --------------------------------------------------------------------------------------------------

    def _windows(
        self, route: Route, record: KeyRecord, plan_id: str, plans: dict[str, Any], client_ip: str
    ) -> tuple[list[ratelimit.Window], tuple[list[str], list[Any]]]:
        """The caller's windows and the limiter script's KEYS/ARGV for them.

        Sliding (GCRA) windows depend only on the route, the plan and the caller, so they are built once and
        reused (dropped with the route table); calendar windows move with the clock and are built every time.
        """
        cache_key = (route.api_id, plan_id, record.key_id, record.consumer_id, client_ip)
        cached = self._window_cache.get(cache_key)
        if cached is not None and cached[0] is route:  # built from this very route table
            return cached[1], cached[2]
        plan_policies = plans.get(plan_id, []) if plan_id else []
        windows = ratelimit.windows_for(route, record, client_ip, plan_policies, time.time())
        script = ratelimit.script_args(windows)
        if all(w.kind == ratelimit.GCRA for w in windows):
            if len(self._window_cache) >= WINDOW_CACHE_SIZE:
                self._window_cache.clear()
            self._window_cache[cache_key] = (route, windows, script)
        return windows, script

    def _send_limits(
        self, route: Route, windows: list[ratelimit.Window], script: tuple[list[str], list[Any]], read_key: str | None
    ) -> ratelimit.PendingCheck | ratelimit.LimitDecision:
        """Send the limiter call (after a GET of ``read_key``, if any); a decision at once when Redis is out of reach."""
        client = get_redis()
        if client is None or not self.store.available():
            return ratelimit.store_error_decision(route, windows, self.local_limits, time.time())
        keys, args = script
        try:
            return ratelimit.send_check(client, keys, args, [("GET", read_key)] if read_key is not None else [])
        except redis.RedisError:
            return self._store_failed(route, windows)

    def _limit_decision(
        self,
        route: Route,
        windows: list[ratelimit.Window],
        pending: ratelimit.PendingCheck | ratelimit.LimitDecision | None,
    ) -> tuple[ratelimit.LimitDecision, list[Any]]:
        """The decision, and the replies of the commands sent before the limiter's (none when Redis was not asked)."""
        if isinstance(pending, ratelimit.LimitDecision):
            return pending, []
        assert pending is not None
        try:
            raw, replies = pending.result()
        except redis.RedisError:
            return self._store_failed(route, windows), []
        blocked, results_ = ratelimit.parse_result(windows, raw)
        return ratelimit.decide(route, blocked, results_), replies

    def _store_failed(self, route: Route, windows: list[ratelimit.Window]) -> ratelimit.LimitDecision:
        logger.warning("rate-limit store unavailable; applying on_store_error")
        self.store.failed()
        return ratelimit.store_error_decision(route, windows, self.local_limits, time.time())

    def _client_ip(self, environ: dict[str, Any]) -> str:
        return client_address.client_address(
            environ.get("REMOTE_ADDR", "") or "", environ.get("HTTP_X_FORWARDED_FOR", ""), self.trusted
        )

    def _upstream_headers(
        self,
        environ: dict[str, Any],
        route: Route,
        record: KeyRecord,
        credential: auth.Credential,
        request_id: str,
        client_ip: str,
    ) -> dict[str, str]:
        authorization = environ.get("HTTP_AUTHORIZATION", "")
        bearer = credential.source == "bearer" or (route.spec.accept_bearer and authorization[:7].lower() == "bearer ")
        drop = _dropped_headers(route.spec.key_header, bearer)
        connection = environ.get("HTTP_CONNECTION")
        if connection:
            drop = drop | {name.strip().lower() for name in connection.split(",")}
        headers: dict[str, str] = {}
        for key, value in environ.items():
            if key.startswith("HTTP_"):
                name = _header_name(key)
                if name.lower() not in drop:
                    headers[name] = value
        if environ.get("CONTENT_TYPE"):
            headers["Content-Type"] = environ["CONTENT_TYPE"]
        if environ.get("CONTENT_LENGTH"):
            headers["Content-Length"] = environ["CONTENT_LENGTH"]
        peer = environ.get("REMOTE_ADDR", "")
        trusted_peer = bool(self.trusted) and client_address.is_trusted(peer, self.trusted)
        prior = environ.get("HTTP_X_FORWARDED_FOR", "") if trusted_peer else ""
        headers["X-Forwarded-For"] = f"{prior}, {peer}" if prior else (client_ip if trusted_peer else peer)
        proto = environ.get("HTTP_X_FORWARDED_PROTO") if trusted_peer else None
        headers["X-Forwarded-Proto"] = proto or environ.get("wsgi.url_scheme", "http")
        forwarded_host = environ.get("HTTP_X_FORWARDED_HOST") if trusted_peer else None
        headers["X-Forwarded-Host"] = forwarded_host or environ.get("HTTP_HOST", "")
        headers["X-Request-ID"] = request_id
        headers["X-Consumer-ID"] = record.consumer_id
        headers["X-Tenant-ID"] = route.tenant_id
        return headers

    def _balancer(self, route: Route) -> Balancer:
        signature = tuple((t.url, t.weight) for t in route.targets)
        entry = self.balancers.get(route.api_id)
        if entry is None or entry[0] != signature:
            entry = (signature, Balancer(route.targets))
            self.balancers[route.api_id] = entry
        return entry[1]

    def _breaker(self, route: Route) -> CircuitBreaker:
        signature = (route.spec.cb_failure_threshold, route.spec.cb_recovery_timeout)
        entry = self.breakers.get(route.api_id)
        if entry is None or entry[0] != signature:
            entry = (signature, CircuitBreaker(route.api_id, *signature, tenant_id=route.tenant_id))
            self.breakers[route.api_id] = entry
        return entry[1]

    def _prune_resilience(self) -> None:
        table = self.routes.table
        if table is None:
            return
        live = {route.api_id for route in table.routes}
        for mapping in (self.balancers, self.breakers):
            for api_id in [a for a in mapping if a not in live]:
                mapping.pop(api_id, None)

    # -- results and records ------------------------------------------------------------------------------------

    def _client_body_failed(self, ex: Exchange, exc: ClientBodyError) -> Result:
        slug, title = ("body-timeout", "Request timeout") if exc.status == 408 else ("bad-body", "Bad request")
        return ex.fail(problem(exc.status, slug, title, exc.detail, ex.request_id))

    def _error(
        self, done: Finished, response: GatewayResponse, extra_headers: list[tuple[str, str]] | None = None
    ) -> Result:
        """An answer of the gateway's own, recorded now (outside the chain: a bad request target, a WebSocket
        handshake's refusal)."""
        done.status = response.status
        done.bytes_out = len(response.body)
        headers = response.headers + (extra_headers or []) + [("X-Request-ID", done.request_id)]
        if done.route is not None:
            headers += done.route.extra_headers
        self._finish(done)
        result = Result(status_line(response.status), headers, [response.body])
        result.recorded = True
        return result

    def _finish(self, done: Finished) -> None:
        """Metrics, access log and usage event of a completed request."""
        duration = time.perf_counter() - done.started
        route = done.route
        tenant = route.tenant_id if route else ""
        api = route.api_id if route else metrics.UNMATCHED
        status = str(done.status)
        counter = self._counters.get((tenant, api, done.method, status))
        if counter is None:
            counter = metrics.requests_total.labels(tenant, api, done.method, status)
            self._counters[(tenant, api, done.method, status)] = counter
        counter.inc()
        histograms = self._histograms.get((tenant, api))
        if histograms is None:
            histograms = (metrics.request_duration.labels(tenant, api), metrics.upstream_duration.labels(tenant, api))
            self._histograms[(tenant, api)] = histograms
        histograms[0].observe(duration)
        if done.upstream_s is not None:
            histograms[1].observe(done.upstream_s)
        record = done.record
        self.access_log.write(
            {
                "request_id": done.request_id,
                "tenant": tenant,
                "api": api,
                "consumer": record.consumer_id if record else "",
                "key_prefix": record.key_prefix if record else "",
                "method": done.method,
                "path": route.spec.base_path if route else "",
                "status": done.status,
                "duration_ms": round(duration * 1000, 3),
                "upstream_ms": round(done.upstream_s * 1000, 3) if done.upstream_s is not None else None,
            }
        )
        if route is not None:
            self.usage.record(
                tenant,
                api,
                record.consumer_id if record else "",
                done.key,
                done.status,
                done.bytes_in,
                done.bytes_out,
                duration,
                done.upstream_s,
                time.time(),
            )
        # The request is over: later log lines of this thread or greenlet must not carry its id.
        request_id_var.set(None)
        client_ip_var.set(None)


class StreamedBody:
    """The upstream's body streamed to the client; closing it (WSGI close()) records the request."""

    def __init__(self, gateway: Gateway, upstream: Any, done: Finished, chunks: Iterator[bytes] | None = None) -> None:
        self.gateway = gateway
        self.upstream = upstream
        self.done = done
        self.closed = False
        self.chunks = chunks  # gateway.streams.chunks for a stream; else the body as urllib3 or http1 reads it

    def __iter__(self) -> Iterator[bytes]:
        response = self.upstream.response
        try:
            chunks = self.chunks if self.chunks is not None else response.stream(64 * 1024, decode_content=False)
            for chunk in chunks:
                self.done.bytes_out += len(chunk)
                yield chunk
        except Exception as exc:
            # Headers are already sent: the only honest signal left is to cut the connection short.
            logger.warning("upstream body failed after %d bytes: %s", self.done.bytes_out, type(exc).__name__)
            if self.done.route is not None:
                self.gateway._breaker(self.done.route).failure()
            raise

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        response = self.upstream.response
        self.gateway.upstreams.reaper.done(self.upstream.watch)
        if not response.isclosed() and response.length_remaining:
            response.close()  # not fully read (client went away): never reuse this connection
        response.release_conn()
        self.gateway._finish(self.done)


_DROPPED: dict[tuple[str, bool], frozenset[str]] = {}


def _dropped_headers(key_header: str, bearer: bool) -> frozenset[str]:
    """Request headers never passed upstream: hop-by-hop, the gateway's own, and the credential's header."""
    dropped = _DROPPED.get((key_header, bearer))
    if dropped is None:
        dropped = HOP_BY_HOP | _SET_BY_GATEWAY | {key_header.lower()} | ({"authorization"} if bearer else set())
        if len(_DROPPED) < 1024:
            _DROPPED[(key_header, bearer)] = dropped
    return dropped


def _not_in_spec(operation: Match, method: str, request_id: str) -> GatewayResponse:
    """404 for a path the API's OpenAPI document does not have, 405 (with Allow) for a method its path lacks."""
    if operation.status == NO_PATH:
        return problem(404, "not-in-spec", "Not found", "This API's OpenAPI document has no such path.", request_id)
    return problem(
        405,
        "method-not-in-spec",
        "Method not allowed",
        f"{method} is not an operation of {operation.template} in this API's OpenAPI document.",
        request_id,
        headers=[("Allow", ", ".join(sorted(operation.allow)))],
    )


def _jwt_auth() -> Any:
    """gateway.jwt_auth, imported on first use (key-only APIs never load PyJWT)."""
    return importlib.import_module("gateway.jwt_auth")


def _websocket() -> Any:
    """gateway.websocket, imported on first use (it builds on this module; APIs without WebSocket never load it)."""
    from gateway import websocket

    return websocket


def _control_plane(raw: str) -> bool:
    first = raw.lstrip("/").split("/", 1)[0].split("?", 1)[0]
    return first.lower() in RESERVED_SEGMENTS
