"""Reading and writing configuration documents: YAML or JSON text ⇄ the canonical document (a plain dict).

The canonical document is what ``export`` writes and what ``plan`` compares: every field present, in a fixed order,
lists sorted, values normalised the way the services store them. Reading a file fills in defaults, expands
``${ENV_VAR}`` references, checks the shape against the JSON Schema and normalises; every problem found is reported
at once, each naming the file, the object and the field.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import jsonschema
import yaml
from django.core.exceptions import FieldDoesNotExist, ValidationError
from django.db import models
from django.utils.dateparse import parse_datetime

from apimgmt import validation
from apimgmt.config_doc.schema import (
    API_MODEL_FIELD,
    FORMAT,
    JWT_ISSUER_FIELDS,
    api_document_fields,
    document_schema,
)
from apimgmt.config_doc.secrets import REFERENCES, Reference, references_in
from apimgmt.models import Api, Consumer, JwtIssuer, Plan, Policy

SECTIONS = ("policies", "jwt_issuers", "plans", "apis", "consumers")


def _api_field(name: str) -> models.Field[Any, Any] | None:
    try:
        field = Api._meta.get_field(API_MODEL_FIELD.get(name, name))
    except FieldDoesNotExist:
        return None
    return field if isinstance(field, models.Field) else None


# Field order of each kind in the canonical document (the order `export` writes).
POLICY_FIELDS = ("name", "description", "policy_type", "mode", "on_store_error", "config")
PLAN_FIELDS = ("name", "description", "approval", "archived", "policies", "websocket_max_connections")
API_FIELDS = api_document_fields()
# How the model stores some of them: floats (a YAML 2 is 2.0) and moments (UTC, ISO 8601).
_API_FLOATS = {n for n in API_FIELDS if isinstance(_api_field(n), models.FloatField)}
API_MOMENTS = {n for n in API_FIELDS if isinstance(_api_field(n), models.DateTimeField)}
CONSUMER_FIELDS = ("name", "owner", "description", "status", "ip_allow", "ip_deny", "identities", "subscriptions")
# An API's references to other objects of the document, by name.
API_REFERENCES = ("policies", "plans", "jwt_issuers")
SUBSCRIPTION_FIELDS = ("api", "plan", "status")

_VARIABLE = re.compile(r"\$(\$\{)|\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$\{")
# What a document may add up to once its variables are expanded (as large as the text the API takes), and how deeply
# it may nest: a small request must not become gigabytes in memory or exhaust the interpreter's stack.
MAX_EXPANSION_CHARS = 10_000_000
MAX_DEPTH = 100


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a document: where (``apis[users].upstream_url``) and what to do about it."""

    where: str
    message: str


class ConfigError(Exception):
    """A document that cannot be planned or applied; nothing was changed."""

    def __init__(self, source: str, problems: list[Problem]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(
            f"{self.source}: {p.where}: {p.message}" if p.where else f"{self.source}: {p.message}"
            for p in self.problems
        )

    def as_errors(self) -> dict[str, list[str]]:
        errors: dict[str, list[str]] = {}
        for p in self.problems:
            errors.setdefault(p.where or "document", []).append(p.message)
        return errors


# ---------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------


# libyaml's parser and emitter when PyYAML was built with it (the wheels are): parsing a 500-API document in pure
# Python takes seconds.
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_Dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


class _DocumentLoader(_Loader):  # type: ignore[misc,valid-type]
    """Safe YAML without surprises: no aliases (a small file cannot expand into a huge one), no duplicate keys, and
    timestamps stay strings (``sunset_at`` is parsed with its time zone, not by YAML's rules)."""

    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        # Each node is built once; meeting one again means an alias (*name) refers to it.
        if node in self.constructed_objects or node in self.recursive_objects:
            raise yaml.MarkedYAMLError(
                None,
                None,
                "this value is used again through an alias (*name); aliases are not allowed, write it out",
                node.start_mark,
            )
        return super().construct_object(node, deep=deep)

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        seen: set[str] = set()
        for key_node, _value in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                if key_node.value in seen:
                    raise yaml.MarkedYAMLError(None, None, f"duplicate key {key_node.value!r}", key_node.start_mark)
                seen.add(key_node.value)
        return super().construct_mapping(node, deep=deep)


def parse_text(text: str, source: str) -> Any:
    """YAML (or JSON, which YAML reads too) text as plain data; a syntax error names the line and column."""
    try:
        if source.endswith(".json"):
            return json.loads(text)
        return yaml.load(text, Loader=_DocumentLoader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:  # json's decoder recurses once per level
        raise ConfigError(source, [Problem("", f"nested deeper than {MAX_DEPTH} levels; flatten it.")]) from None
    except json.JSONDecodeError as exc:
        raise ConfigError(
            source, [Problem(f"line {exc.lineno} column {exc.colno}", f"not valid JSON: {exc.msg}")]
        ) from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        message = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(source, [Problem(where, f"not valid YAML: {message}")]) from exc


class _DocumentDumper(_Dumper):  # type: ignore[misc,valid-type]
    def represent_str(self, data: str) -> Any:
        # Multi-line text (descriptions) as a literal block, which reads and diffs better than "\n" escapes.
        if "\n" in data:
            return self.represent_scalar("tag:yaml.org,2002:str", data, style="|")
        return super().represent_str(data)


_DocumentDumper.add_representer(str, _DocumentDumper.represent_str)


def dump_text(document: Mapping[str, Any], fmt: str = "yaml") -> str:
    """The document as text; the same document always gives the same bytes."""
    escaped = _escape({key: value for key, value in document.items() if key != REFERENCES})
    if fmt == "json":
        return json.dumps(escaped, indent=2, ensure_ascii=False) + "\n"
    return yaml.dump(escaped, Dumper=_DocumentDumper, sort_keys=False, allow_unicode=True, width=120)


def _escape(value: Any) -> Any:
    """A literal ``${`` is written ``$${`` so that reading the text back does not take it for a variable; a
    document's own reference (``Reference``) is written as it was."""
    if isinstance(value, Reference):
        return str(value)
    if isinstance(value, str):
        return value.replace("${", "$${")
    if isinstance(value, Mapping):
        return {k: _escape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_escape(v) for v in value]
    return value


# ---------------------------------------------------------------------------
# Variables
# ---------------------------------------------------------------------------


def clean_values(data: Any, source: str) -> Any:
    """What the database or the gateway could not take, refused up front: NUL characters, text that is not valid
    Unicode, numbers that are not finite; mapping keys become strings (YAML reads ``200:`` in an OpenAPI
    document as a number)."""
    problems: list[Problem] = []

    def clean(value: Any, path: str, depth: int = 0) -> Any:
        if isinstance(value, (dict, list)) and depth >= MAX_DEPTH:
            problems.append(Problem(path, f"nested deeper than {MAX_DEPTH} levels; flatten it."))
            return value
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                problems.append(Problem(path, "text must be valid Unicode (no lone surrogates)."))
            if "\x00" in value:
                problems.append(Problem(path, "text must not contain NUL characters."))
            return value
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(Problem(path, "numbers must be finite (no NaN or infinity)."))
            return value
        if isinstance(value, dict):
            out = {}
            for key, item in value.items():
                if isinstance(key, bool) or not isinstance(key, (str, int)):
                    problems.append(Problem(path, f"keys must be text, not {key!r}."))
                    continue
                name = str(key)
                out[name] = clean(item, f"{path}.{name}" if path else name, depth + 1)
                clean(name, path)
            return out
        if isinstance(value, list):
            return [clean(v, f"{path}[{_label(v, i)}]", depth + 1) for i, v in enumerate(value)]
        return value

    cleaned = clean(data, "")
    if problems:
        raise ConfigError(source, problems)
    return cleaned


def expand_variables(data: Any, variables: Mapping[str, str], source: str) -> Any:
    """Replace ``${NAME}`` in every string value by ``variables[NAME]`` (``$${`` is a literal ``${``)."""
    problems: list[Problem] = []
    budget = [MAX_EXPANSION_CHARS]  # characters variables may still add, over the whole document

    def expand(value: Any, path: str) -> Any:
        if isinstance(value, str):
            if "$" not in value:
                return value

            def substitute(match: re.Match[str]) -> str:
                if match.group(1):
                    return "${"
                name = match.group(2)
                if name is None:
                    problems.append(
                        Problem(path, "'${' must start a variable such as ${UPSTREAM_URL}; write $${ for a literal.")
                    )
                    return ""
                if name not in variables:
                    problems.append(Problem(path, f"variable ${{{name}}} is not set."))
                    return ""
                budget[0] -= len(variables[name])
                if budget[0] < 0:
                    if budget[0] + len(variables[name]) >= 0:  # named once, where the budget ran out
                        problems.append(
                            Problem(
                                path,
                                f"variables expand to more than {MAX_EXPANSION_CHARS:,} characters in all; "
                                "a document is at most that large.",
                            )
                        )
                    return ""
                return variables[name]

            return _VARIABLE.sub(substitute, value)
        if isinstance(value, dict):
            return {k: expand(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
        if isinstance(value, list):
            return [expand(v, f"{path}[{_label(v, i)}]") for i, v in enumerate(value)]
        return value

    expanded = expand(data, "")
    if problems:
        raise ConfigError(source, problems)
    return expanded


def _label(item: Any, index: int) -> str:
    """How an object is named in messages: by its name when it has one, else by its position."""
    if isinstance(item, dict):
        name = item.get("name", item.get("api"))
        if isinstance(name, str) and name:
            return name
    return str(index)


# ---------------------------------------------------------------------------
# Shape and normalisation
# ---------------------------------------------------------------------------


def _where(data: Any, path: Any) -> str:
    """jsonschema's path (['apis', 3, 'upstream_url']) as 'apis[users].upstream_url'."""
    out = ""
    node = data
    for part in path:
        if isinstance(part, int) and isinstance(node, list):
            out += f"[{_label(node[part], part)}]"
            node = node[part]
        else:
            out += f".{part}" if out else str(part)
            node = node.get(part) if isinstance(node, dict) else None
    return out


_VALIDATOR = jsonschema.Draft202012Validator(document_schema(), format_checker=None)


# An unknown field's message lists the valid ones when there are at most this many.
_UNKNOWN_FIELD_LIST_MAX = 12


def _unknown_field_problems(data: Any, error: jsonschema.ValidationError) -> list[Problem]:
    """One problem per field the schema does not know, at the field's own path, with the closest valid name
    ("apis[users].retires: unknown field; did you mean `retries`?", quoted as the admin and the management API quote
    it: apimgmt/policy_types/fields.py)."""
    instance = error.instance if isinstance(error.instance, dict) else {}
    known = sorted(error.schema.get("properties", {})) if isinstance(error.schema, dict) else []
    where = _where(data, error.absolute_path)
    problems = []
    for name in sorted(set(instance) - set(known)):
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        if close:
            hint = f"did you mean `{close[0]}`?"
        elif len(known) <= _UNKNOWN_FIELD_LIST_MAX:
            hint = "the fields here are " + ", ".join(known) + "."
        else:
            hint = f"not one of the {len(known)} fields this object takes (docs/config.schema.json)."
        problems.append(Problem(f"{where}.{name}" if where else name, f"unknown field; {hint}"))
    return problems


def _needs_one_of(error: jsonschema.ValidationError) -> str | None:
    """An anyOf of ``required`` alternatives (a policy's windows) said in words."""
    options = error.validator_value if error.validator == "anyOf" else None
    if not isinstance(options, list) or not all(isinstance(o, dict) and set(o) == {"required"} for o in options):
        return None
    names = [name for option in options for name in option["required"]]
    return "needs at least one of " + ", ".join(names) + "."


def check_shape(data: Any, source: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(
            source, [Problem("", "the document must be a mapping with 'format' and sections such as 'apis'.")]
        )
    problems = []
    for error in sorted(_VALIDATOR.iter_errors(data), key=lambda e: [str(p) for p in e.absolute_path]):
        if error.validator == "additionalProperties":
            problems.extend(_unknown_field_problems(data, error))
            continue
        where = _where(data, error.absolute_path)
        message = _needs_one_of(error) or error.message
        if error.validator == "const" and list(error.absolute_path) == ["format"]:
            message = f"format must be {FORMAT!r}."
        problems.append(Problem(where, message))
    if problems:
        raise ConfigError(source, problems)


def _model_default(model: type[Any], field: str) -> Any:
    return model._meta.get_field(field).get_default()


def _sorted_keys(value: Any) -> Any:
    """Free-form JSON (OpenAPI documents, policy configs) with keys sorted at every level: a stable export."""
    if isinstance(value, dict):
        return {k: _sorted_keys(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_sorted_keys(v) for v in value]
    return value


def format_datetime(value: datetime | None) -> str | None:
    """A moment as the document writes it: UTC, ISO 8601, ``Z``."""
    return None if value is None else value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def canonical_policy(item: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "name": item["name"],
        "description": item.get("description", ""),
        "policy_type": item["policy_type"],
        "mode": item.get("mode", _model_default(Policy, "mode")),
        "on_store_error": item.get("on_store_error", _model_default(Policy, "on_store_error")),
        "config": _sorted_keys(item["config"]),
    }


def canonical_jwt_issuer(item: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in JWT_ISSUER_FIELDS:
        value = item[name] if name in item else _model_default(JwtIssuer, name)
        out[name] = _sorted_keys(value) if name == "public_keys" else value
    return out


def canonical_plan(item: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "name": item["name"],
        "description": item.get("description", ""),
        "approval": item.get("approval", _model_default(Plan, "approval")),
        "archived": item.get("archived", False),
        "policies": sorted(item.get("policies", [])),
        "websocket_max_connections": item.get("websocket_max_connections"),
    }


def canonical_api(item: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field in API_FIELDS:
        if field in API_REFERENCES:
            out[field] = sorted(item.get(field, []))
        elif field == "targets":
            targets = [{"url": t["url"], "weight": t.get("weight", 1)} for t in item.get("targets", [])]
            out[field] = sorted(targets, key=lambda t: (t["url"], t["weight"]))
        elif field == "openapi_spec":
            spec = item.get("openapi_spec")
            if spec is not None:
                out[field] = _sorted_keys(spec)
        elif field in item:
            out[field] = item[field]
        else:
            out[field] = _model_default(Api, API_MODEL_FIELD.get(field, field))
        if field in _API_FLOATS and out[field] is not None:
            out[field] = float(out[field])
    return out


def canonical_consumer(item: Mapping[str, Any]) -> dict[str, Any]:
    subscriptions = [
        {"api": s["api"], "plan": s.get("plan"), "status": s.get("status", "active")}
        for s in item.get("subscriptions", [])
    ]
    identities = [{"issuer": i["issuer"], "external_id": i["external_id"]} for i in item.get("identities", [])]
    return {
        "name": item["name"],
        "owner": item.get("owner"),
        "description": item.get("description", ""),
        "status": item.get("status", _model_default(Consumer, "status")),
        "ip_allow": list(item.get("ip_allow", [])),
        "ip_deny": list(item.get("ip_deny", [])),
        "identities": sorted(identities, key=lambda i: (i["issuer"], i["external_id"])),
        "subscriptions": sorted(subscriptions, key=lambda s: s["api"]),
    }


def consumer_key(item: Mapping[str, Any]) -> str:
    """A consumer's key in the document: its name, prefixed by its owner's user name when it has one."""
    return f"{item['owner']}/{item['name']}" if item.get("owner") else str(item["name"])


def canonical_document(data: Mapping[str, Any]) -> dict[str, Any]:
    """Sections in dependency order, objects sorted by their keys."""
    document: dict[str, Any] = {"format": FORMAT}
    document["policies"] = sorted((canonical_policy(p) for p in data.get("policies", [])), key=lambda p: p["name"])
    issuers = (canonical_jwt_issuer(i) for i in data.get("jwt_issuers", []))
    document["jwt_issuers"] = sorted(issuers, key=lambda i: i["name"])
    document["plans"] = sorted((canonical_plan(p) for p in data.get("plans", [])), key=lambda p: p["name"])
    document["apis"] = sorted((canonical_api(a) for a in data.get("apis", [])), key=lambda a: a["name"])
    if "consumers" in data:
        consumers = [canonical_consumer(c) for c in data["consumers"]]
        document["consumers"] = sorted(consumers, key=lambda c: (c["owner"] or "", c["name"]))
    return document


def _check_meaning(document: Mapping[str, Any]) -> list[Problem]:
    """What the schema cannot say: unique keys, references by name, values the services would normalise or refuse."""
    problems: list[Problem] = []

    def unique(section: str, keys: list[str], what: str) -> None:
        seen: set[str] = set()
        for key in keys:
            if key in seen:
                problems.append(Problem(f"{section}[{key}]", f"two {what} are named {key!r}; names must be unique."))
            seen.add(key)

    policies = {p["name"]: p for p in document["policies"]}
    issuers = {i["name"]: i for i in document["jwt_issuers"]}
    plans = {p["name"]: p for p in document["plans"]}
    apis = {a["name"]: a for a in document["apis"]}
    unique("policies", [p["name"] for p in document["policies"]], "policies")
    unique("jwt_issuers", [i["name"] for i in document["jwt_issuers"]], "JWT issuers")
    unique("plans", [p["name"] for p in document["plans"]], "plans")
    unique("apis", [a["name"] for a in document["apis"]], "APIs")

    def refs(where: str, names: list[str], known: Mapping[str, Any], what: str) -> None:
        for name in names:
            if name not in known:
                problems.append(Problem(where, f"no {what} named {name!r} in this document."))

    for policy in document["policies"]:
        try:
            policy["config"] = _sorted_keys(validation.validate_policy_config(policy["policy_type"], policy["config"]))
        except ValidationError as exc:
            problems.extend(Problem(f"policies[{policy['name']}].config", m) for m in exc.messages)
    for issuer in document["jwt_issuers"]:
        problems.extend(_check_issuer(issuer))
    for plan in document["plans"]:
        refs(f"plans[{plan['name']}].policies", plan["policies"], policies, "policy")
    routes: dict[tuple[str, str], str] = {}
    for api in document["apis"]:
        where = f"apis[{api['name']}]"
        refs(f"{where}.policies", api["policies"], policies, "policy")
        refs(f"{where}.plans", api["plans"], plans, "plan")
        refs(f"{where}.jwt_issuers", api["jwt_issuers"], issuers, "JWT issuer")
        if api["auth_method"] != Api.AuthMethod.KEY and not api["jwt_issuers"]:
            problems.append(
                Problem(
                    f"{where}.jwt_issuers",
                    f"auth_method {api['auth_method']!r} needs at least one JWT issuer (jwt_issuers).",
                )
            )
        for field, check in (
            ("base_path", validation.validate_base_path),
            ("host", validation.validate_host),
            ("key_header", validation.validate_header_name),
            ("key_query_param", validation.validate_query_param),
        ):
            try:
                api[field] = check(api[field])
            except ValidationError as exc:
                problems.extend(Problem(f"{where}.{field}", m) for m in exc.messages)
        route = (api["host"], api["base_path"])
        if route in routes:
            problems.append(
                Problem(f"{where}.base_path", f"API {routes[route]!r} already uses this base path and host.")
            )
        routes.setdefault(route, api["name"])
        if api["total_timeout"] < api["connect_timeout"]:
            problems.append(Problem(f"{where}.total_timeout", "total_timeout must be at least connect_timeout."))
        for moment in sorted(API_MOMENTS):
            if api[moment] is None:
                continue
            parsed = parse_datetime(api[moment])
            if parsed is None or parsed.tzinfo is None:
                problems.append(
                    Problem(
                        f"{where}.{moment}",
                        f"{moment} must be a date and time with a time zone, e.g. 2027-01-01T00:00:00Z.",
                    )
                )
            else:
                api[moment] = format_datetime(parsed)
    if "consumers" in document:
        unique("consumers", [consumer_key(c) for c in document["consumers"]], "consumers")
        holders: dict[tuple[str, str], str] = {}
        for consumer in document["consumers"]:
            where = f"consumers[{consumer_key(consumer)}]"
            unique(f"{where}.subscriptions", [s["api"] for s in consumer["subscriptions"]], "subscriptions")
            for name in ("ip_allow", "ip_deny"):
                try:
                    consumer[name] = validation.validate_cidr_list(consumer[name], name)
                except ValidationError as exc:
                    problems.extend(Problem(f"{where}.{name}", m) for m in exc.messages)
            for identity in consumer["identities"]:
                at = f"{where}.identities[{identity['issuer']}:{identity['external_id']}]"
                if identity["issuer"] not in issuers:
                    problems.append(
                        Problem(f"{at}.issuer", f"no JWT issuer named {identity['issuer']!r} in this document.")
                    )
                pair = (identity["issuer"], identity["external_id"])
                if pair in holders:
                    problems.append(
                        Problem(
                            f"{at}.external_id",
                            f"consumer {holders[pair]!r} has this external ID at this issuer already; one consumer per "
                            "external ID.",
                        )
                    )
                holders.setdefault(pair, consumer_key(consumer))
            for sub in consumer["subscriptions"]:
                if sub["api"] not in apis:
                    problems.append(
                        Problem(
                            f"{where}.subscriptions[{sub['api']}].api", f"no API named {sub['api']!r} in this document."
                        )
                    )
                if sub["plan"] is not None and sub["plan"] not in plans:
                    problems.append(
                        Problem(
                            f"{where}.subscriptions[{sub['api']}].plan",
                            f"no plan named {sub['plan']!r} in this document.",
                        )
                    )
    return problems


def _check_issuer(issuer: dict[str, Any]) -> list[Problem]:
    """A JWT issuer's settings checked and normalised as the services will (validation.jwt_issuer_errors)."""
    cleaned, errors = validation.jwt_issuer_errors(
        **{name: issuer[name] for name in JWT_ISSUER_FIELDS if name not in ("name", "auto_provision")}
    )
    for name, value in cleaned.items():
        issuer[name] = _sorted_keys(value) if name == "public_keys" else value
    where = f"jwt_issuers[{issuer['name']}]"
    return [Problem(f"{where}.{name}", message) for name, messages in errors.items() for message in messages]


def read_document(text: str, source: str, variables: Mapping[str, str]) -> dict[str, Any]:
    """Text → canonical document, or ConfigError listing every problem (file, object, field)."""
    data = clean_values(parse_text(text, source), source)
    references = references_in(data)
    data = expand_variables(data, variables, source)
    check_shape(data, source)
    document = canonical_document(data)
    problems = _check_meaning(document)
    if problems:
        raise ConfigError(source, problems)
    if references:
        # Which policy config values came from a variable: apply records them, so export writes them back.
        document[REFERENCES] = references
    return document
