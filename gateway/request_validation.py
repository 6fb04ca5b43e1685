"""request_validation: requests checked against the API's OpenAPI document before the upstream hears of them.

Not a policy type: the API's own ``validation`` setting (off, shadow, enforce) asks for it, and the step is built only
when that is not off and the API has an OpenAPI document with paths. The document is compiled once per route-table
load: every operation's parameters and JSON request body become ready validators (openapi-schema-validator's OAS 3.0
or 3.1 dialect on jsonschema, ``$ref``s resolved inside the document). A request then costs one operation match and
the validators of its own operation. A JSON body or parameter schema also gets a compiled jsonschema-rs check where
it can mean exactly the same (3.1: plain JSON Schema keywords; 3.0: a translation, see _Oas30Translation): it is
asked first and only trusted to say "valid"; anything else goes to openapi-schema-validator, which decides and words
the errors.

The step runs in ``access`` (after authentication: an anonymous caller never makes the gateway read or parse a body)
and checks:

- path, query and header parameters: required ones present, values converted from text by their schema's type
  (integer, number, boolean, array: repeated query parameters or comma-separated values) and validated;
- the request body: present when the document says it is required; its Content-Type one the operation lists; a JSON
  body parsed and validated against its schema.

A request for a path or method the document does not list is not checked here (restrict_to_spec refuses those).

enforce: 400 problem+json whose ``errors`` list each failure with where it is (``in``: path, query, header or body),
the parameter's ``name`` or the body's JSON ``pointer``, and the ``message``. shadow: the request goes on; the
failure is counted (``api_request_validation_failures_total{mode="shadow"}``) and logged with the same list.

A JSON body is read whole to be checked, up to MAX_VALIDATED_BODY bytes with a Content-Length; a larger or chunked
JSON body cannot be checked: enforce refuses it with 413, shadow lets it through (logged). The body read here is
handed to the proxy unchanged.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import math
import re
from collections.abc import Callable, Iterator
from itertools import islice
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, unquote

import jsonschema_rs
from jsonschema.exceptions import ValidationError as SchemaError
from openapi_schema_validator import OAS30WriteValidator, OAS31Validator, oas30_format_checker, oas31_format_checker
from prometheus_client import Counter
from referencing import Registry
from referencing.jsonschema import DRAFT4, DRAFT202012

from apimgmt.selectors import PolicySpec
from apimgmt.spec_operations import ALLOWED, METHODS, OperationTable
from gateway.chain import ACCESS, Exchange, Result, Step
from gateway.problems import problem
from gateway.proxy import ClientBodyError, RequestBody

if TYPE_CHECKING:
    from gateway.routing import Route

logger = logging.getLogger(__name__)

MAX_VALIDATED_BODY = 1024 * 1024
MAX_ERRORS = 20  # listed in one answer; a request with more is refused with the first ones
MAX_MESSAGE = 300  # characters of one error's message (jsonschema's may quote a whole instance)
_DOCUMENT_URI = "urn:apimgmt:openapi-document"
_TEMPLATE = re.compile(r"\{([^{}/]+)\}")
_TEMPLATE_SPLIT = re.compile(r"\{[^{}/]+\}")
_INTEGER = re.compile(r"-?[0-9]+")
_NUMBER = re.compile(r"-?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")
# The keywords whose meaning is the same to openapi-schema-validator's OAS 3.1 dialect and to jsonschema-rs's Draft
# 2020-12 (no OpenAPI vocabulary): a 3.1 body schema made of these alone (and formats below) gets a compiled fast check.
_FAST_KEYWORDS = frozenset(
    {
        "$ref", "type", "properties", "required", "additionalProperties", "items", "prefixItems", "enum", "const",
        "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "minLength", "maxLength",
        "pattern", "minItems", "maxItems", "uniqueItems", "minProperties", "maxProperties", "patternProperties",
        "allOf", "anyOf", "oneOf", "not", "title", "description", "default", "examples", "example", "deprecated",
    }
)  # fmt: skip
# Formats jsonschema-rs checks at least as strictly as openapi-schema-validator (a stricter "invalid" only sends the
# body on to openapi-schema-validator, which decides).
_FAST_FORMATS = frozenset({"email", "date", "date-time", "uuid", "ipv4", "ipv6"})
# OpenAPI 3.0 bodies get a compiled check too, from a translation of their Schema Objects into draft 4 JSON Schema
# for jsonschema-rs (whose draft 4, like openapi-schema-validator's OAS 3.0 dialect, holds 1.0 not an integer):
# nullable becomes a type union; a readOnly schema refuses (a request writes); required leaves out readOnly
# properties; $ref siblings still apply; formats and patterns are checked by the very functions
# openapi-schema-validator calls. Keywords that dialect does not know are left out (it ignores them); anything that
# cannot be carried over exactly leaves the schema without a compiled check.
_OAS30_TYPES = frozenset({"string", "number", "integer", "boolean", "array", "object"})
_OAS30_SIZES = frozenset({"minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties"})
_OAS30_STRING_FORMATS = frozenset(
    {
        "byte", "date", "date-time", "email", "idn-email", "hostname", "idn-hostname", "ipv4", "ipv6", "regex",
        "time", "uuid", "uri", "uri-reference", "iri", "iri-reference", "json-pointer", "relative-json-pointer",
        "uri-template", "duration",
    }
)  # fmt: skip
_OAS30_PASSING_FORMATS = frozenset({"float", "double", "binary", "password"})  # true of every JSON value
_OAS30_INTEGER_FORMATS = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}
# With the regress package installed, openapi-schema-validator matches patterns as ECMA 262 regexes, not with re.
_PYTHON_PATTERNS = importlib.util.find_spec("regress") is None
_SCHEMA_LISTS = frozenset({"allOf", "anyOf", "oneOf", "prefixItems"})
_SCHEMA_MAPS = frozenset({"properties", "patternProperties"})
_SCHEMA_VALUES = frozenset({"additionalProperties", "items", "not"})
# Header parameters OpenAPI says to ignore: the request's own mechanics describe them.
_IGNORED_HEADERS = frozenset({"accept", "content-type", "authorization"})

failures_total = Counter(
    "api_request_validation_failures_total",
    "Requests that did not match their API's OpenAPI document (mode=shadow: let through, mode=enforce: 400 or 413).",
    ["api", "mode"],
)

Error = dict[str, str]
Resolve = Callable[[Any], tuple[Any, str]]


class _NonFinite(ValueError):
    """A JSON number Python reads as infinite or NaN (jsonschema-rs cannot hold one: never given to it)."""


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NonFinite(text)
    return value


def _no_constant(text: str) -> float:
    raise _NonFinite(text)


def _format_check(name: str) -> Callable[[str], bool]:
    def check(text: str) -> bool:
        return bool(oas30_format_checker.conforms(text, name))

    return check


def _pattern_check(pattern: re.Pattern[str]) -> Callable[[str], bool]:
    def check(text: str) -> bool:
        return pattern.search(text) is not None

    return check


class _Untranslatable(Exception):
    """A 3.0 schema that jsonschema-rs cannot be made to check exactly as openapi-schema-validator does."""


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _finite_numbers(value: Any) -> bool:
    """No infinite or NaN number anywhere in the value (an enum's, a parameter's): jsonschema-rs cannot hold one."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_finite_numbers(v) for v in value)
    if isinstance(value, dict):
        return all(_finite_numbers(v) for v in value.values())
    return True


# -- compiling a document --------------------------------------------------------------------------------------------


class _Oas30Translation:
    """OpenAPI 3.0 Schema Objects of one document as draft 4 JSON Schema meaning the same to jsonschema-rs as they
    do to openapi-schema-validator's OAS30WriteValidator. Each schema a $ref reaches is translated once, as a
    definition (so recursive schemas stay finite); formats and patterns become named jsonschema-rs formats that call
    what openapi-schema-validator calls. Raises _Untranslatable where that cannot be exact."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self.names: dict[str, str] = {}  # document pointer → definition name
        self.definitions: dict[str, Any] = {}
        self.formats: dict[str, Callable[[str], bool]] = {}
        self.patterns: dict[str, str] = {}

    def validator(self, schema: Any) -> Any:
        """A jsonschema-rs validator of this (body) schema, with the definitions its $refs reach."""
        self.names, self.definitions = {}, {}
        root: dict[str, Any] = {"allOf": [self.schema(schema)]}
        if self.definitions:
            root["definitions"] = self.definitions
        return jsonschema_rs.Draft4Validator(root, formats=dict(self.formats), validate_formats=True)

    def ref(self, ref: Any) -> dict[str, Any]:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise _Untranslatable("a $ref outside the document")
        pointer = unquote(ref[1:])
        name = self.names.get(pointer)
        if name is None:
            target: Any = self.document
            for part in pointer.split("/")[1:]:
                key = part.replace("~1", "/").replace("~0", "~")
                if isinstance(target, list) and key.isdigit() and int(key) < len(target):
                    target = target[int(key)]
                elif isinstance(target, dict) and key in target:
                    target = target[key]
                else:
                    raise _Untranslatable(f"$ref {ref!r} names nothing in the document")
            name = self.names[pointer] = f"s{len(self.names)}"
            self.definitions[name] = self.schema(target)
        return {"$ref": f"#/definitions/{name}"}

    def schema(self, node: Any) -> dict[str, Any]:
        if not isinstance(node, dict):
            raise _Untranslatable("a schema that is not an object")
        if "$schema" in node or "id" in node:
            raise _Untranslatable("$schema or id in a schema")  # another dialect, or another base for its $refs
        if node.get("readOnly"):
            return {"not": {}}  # the write validator refuses any value of a read-only schema
        out: dict[str, Any] = {}
        also: list[dict[str, Any]] = []  # checks that need a schema of their own (all of them must pass)
        discriminated = False
        for key, value in node.items():
            if key == "$ref":
                also.append(self.ref(value))  # its siblings still count in this dialect, unlike draft 4
            elif key == "type":
                if not isinstance(value, str) or value not in _OAS30_TYPES:
                    raise _Untranslatable(f"type {value!r}")
                out["type"] = [value, "null"] if node.get("nullable") is True else value
            elif key == "properties":
                if not isinstance(value, dict):
                    raise _Untranslatable("properties that are not an object")
                out["properties"] = {name: self.schema(sub) for name, sub in value.items()}
            elif key == "additionalProperties":
                if "patternProperties" in node and value is not True:
                    raise _Untranslatable("patternProperties (matched by Python's re) next to additionalProperties")
                if isinstance(value, bool):
                    out[key] = value
                elif isinstance(value, dict):
                    out[key] = self.schema(value)
            elif key == "items":
                out["items"] = self.schema(value)
            elif key in ("allOf", "anyOf", "oneOf"):
                if "discriminator" in node:  # the discriminator alone decides then, once or for each combinator
                    if not discriminated:
                        also.append(self.discriminated(node))
                        discriminated = True
                    continue
                if not isinstance(value, list) or not value:
                    raise _Untranslatable(f"{key} that is not a list of schemas")
                out[key] = [self.schema(sub) for sub in value]
            elif key == "not":
                out["not"] = self.schema(value)
            elif key == "required":
                out.update(self.required(value, node.get("properties", {})))
            elif key == "enum":
                if not isinstance(value, list) or not value or not _finite_numbers(value):
                    raise _Untranslatable("enum")
                out["enum"] = value
            elif key in ("minimum", "maximum"):
                exclusive_key = "exclusive" + key[0].upper() + key[1:]
                exclusive = node.get(exclusive_key, False)
                if not _is_number(value) or not isinstance(exclusive, bool):
                    raise _Untranslatable(key)
                out[key] = value
                if exclusive:
                    out[exclusive_key] = True
            elif key == "multipleOf":
                # Python divides a float divisor in floating point, and a float value by an integer one with
                # %; jsonschema-rs does neither: only integer values of an integer divisor are checked here.
                if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                    raise _Untranslatable("multipleOf that is not a positive integer")
                also.append({"anyOf": [{"not": {"type": "number"}}, {"type": "integer", "multipleOf": value}]})
            elif key in _OAS30_SIZES:
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise _Untranslatable(key)
                out[key] = value
            elif key == "uniqueItems":
                if not isinstance(value, bool):
                    raise _Untranslatable(key)
                if value:
                    out[key] = True
            elif key == "pattern":
                also.append({"format": self.pattern(value)})
            elif key == "format":
                also.extend(self.format(value))
            # Any other keyword (nullable, exclusiveMinimum alone, discriminator alone, example, xml, writeOnly,
            # keywords of later drafts...) asserts nothing in the OAS 3.0 dialect.
        if not also:
            return out
        if out:
            also.insert(0, out)  # properties and additionalProperties stay in one schema
        return also[0] if len(also) == 1 else {"allOf": also}

    def discriminated(self, node: dict[str, Any]) -> dict[str, Any]:
        """A discriminator next to allOf/anyOf/oneOf, as openapi-schema-validator applies it: the combinator's list is
        not asked; the object's discriminating property must name a schema (by the mapping, else
        #/components/schemas/<value>) that the object then passes. Only the names the mapping or the list give get a
        branch here: a value naming any other component is left to openapi-schema-validator."""
        discriminator = node["discriminator"]
        if not isinstance(discriminator, dict) or not isinstance(discriminator.get("propertyName"), str):
            raise _Untranslatable("discriminator")
        name = discriminator["propertyName"]
        mapping = discriminator.get("mapping", {})
        if not isinstance(mapping, dict):
            raise _Untranslatable("discriminator mapping")
        refs: dict[str, str] = {}
        for key in ("allOf", "anyOf", "oneOf"):
            listed = node.get(key)
            for sub in listed if isinstance(listed, list) else []:
                ref = sub.get("$ref") if isinstance(sub, dict) else None
                implicit = ref.removeprefix("#/components/schemas/") if isinstance(ref, str) else ""
                if implicit and implicit != ref and not any(c in implicit for c in "/~%"):
                    refs[implicit] = f"#/components/schemas/{implicit}"
        for value, ref in mapping.items():
            if not ref:
                continue  # a value mapped to nothing falls back to the component of its name
            if isinstance(ref, str) and ref.startswith("#") and "%" not in ref:
                refs[value] = ref
            else:
                refs.pop(value, None)  # a mapping openapi-schema-validator cannot follow: it refuses the value
        branches = [
            {"properties": {name: {"enum": [value]}}, "allOf": [self.ref(ref)]}
            for value, ref in refs.items()
            if isinstance(value, str) and value
        ]
        if not branches:
            return {"not": {}}
        return {"type": "object", "required": [name], "anyOf": branches}

    def required(self, names: Any, properties: Any) -> dict[str, Any]:
        if (
            not isinstance(names, list)
            or not all(isinstance(n, str) for n in names)
            or not isinstance(properties, dict)
        ):
            raise _Untranslatable("required")
        kept = []
        for name in dict.fromkeys(names):
            declared = properties.get(name)
            if declared and not isinstance(declared, dict):
                raise _Untranslatable("a required property whose schema is not an object")
            if not (declared and declared.get("readOnly")):
                kept.append(name)  # a read-only property is never required of a request
        return {"required": kept} if kept else {}

    def pattern(self, pattern: Any) -> str:
        if not isinstance(pattern, str) or not _PYTHON_PATTERNS:
            raise _Untranslatable("pattern")
        name = self.patterns.get(pattern)
        if name is None:
            try:
                compiled = re.compile(pattern)
            except re.error as exc:
                raise _Untranslatable("a pattern Python's re does not take") from exc
            name = self.patterns[pattern] = f"oas30-pattern-{len(self.patterns)}"
            self.formats[name] = _pattern_check(compiled)
        return name

    def format(self, name: Any) -> list[dict[str, Any]]:
        if not isinstance(name, str):
            raise _Untranslatable("format")
        if name not in oas30_format_checker.checkers or name in _OAS30_PASSING_FORMATS:
            return []  # unknown to openapi-schema-validator (so not checked), or true of every JSON value
        if name in _OAS30_INTEGER_FORMATS:
            low, high = _OAS30_INTEGER_FORMATS[name]
            return [{"anyOf": [{"not": {"type": "integer"}}, {"minimum": low, "maximum": high}]}]
        if name not in _OAS30_STRING_FORMATS:
            raise _Untranslatable(f"format {name!r}")
        formatted = f"oas30-{name}"
        if formatted not in self.formats:
            self.formats[formatted] = _format_check(name)
        return [{"format": formatted}]


def _pointer(*parts: str | int) -> str:
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


class _Param:
    __slots__ = ("environ_key", "explode", "fast", "item_kind", "kind", "location", "name", "required", "validator")

    def __init__(
        self, name: str, location: str, required: bool, validator: Any, kind: str | None, item_kind: str | None
    ) -> None:
        self.name = name
        self.location = location
        self.required = required
        self.validator = validator
        self.fast: Any = None  # a compiled check that may only say "valid", as a body's (see _fast_check)
        self.kind = kind
        self.item_kind = item_kind
        self.explode = True
        self.environ_key = "HTTP_" + name.upper().replace("-", "_") if location == "header" else ""

    def value(self, texts: list[str]) -> Any:
        """The parameter's text (all of a repeated query parameter's) as its schema's type, where it converts."""
        if self.kind == "array":
            items = texts if self.location == "query" and self.explode else texts[0].split(",")
            return [_convert(item, self.item_kind) for item in items]
        return _convert(texts[0], self.kind)


def _convert(text: str, kind: str | None) -> Any:
    if kind == "integer" and _INTEGER.fullmatch(text):
        return int(text)
    if kind == "number" and _NUMBER.fullmatch(text):
        return float(text) if any(c in text for c in ".eE") else int(text)
    if kind == "boolean" and text in ("true", "false"):
        return text == "true"
    return text  # as sent: the schema says what is wrong with it


class _Operation:
    __slots__ = ("body_fast", "body_required", "body_validator", "json_types", "media_types", "params", "path_names")

    def __init__(self) -> None:
        self.params: list[_Param] = []
        self.path_names: tuple[str, ...] = ()
        self.media_types: tuple[str, ...] = ()  # what the requestBody lists ("" entries never; lower case)
        self.json_types: tuple[str, ...] = ()  # those of them that are JSON, with a schema
        self.body_validator: Any = None
        self.body_fast: Any = None  # a jsonschema-rs validator that may only say "valid" (see _fast_check)
        self.body_required = False


class _Compiled:
    """A document's operations, each with its ready validators, keyed by (spec path, METHOD)."""

    def __init__(self, document: dict[str, Any]) -> None:
        version = str(document.get("openapi", "3.0"))
        self.fast = version.startswith("3.1")
        if self.fast:
            self.validator_class: Any = OAS31Validator
            self.format_checker = oas31_format_checker
            specification = DRAFT202012
        else:
            self.validator_class = OAS30WriteValidator  # a request writes: readOnly properties have no place in it
            self.format_checker = oas30_format_checker
            specification = DRAFT4
        self.document = document
        self.translation = None if self.fast else _Oas30Translation(document)
        self.translated: dict[str, Any] = {}  # a schema's compiled check (or None), by the schema's place
        self.registry: Registry[Any] = Registry().with_resource(_DOCUMENT_URI, specification.create_resource(document))
        paths = document.get("paths") or {}
        self.table = OperationTable({"paths": paths})
        self.operations: dict[tuple[str, str], _Operation] = {}
        self.templates: dict[str, list[tuple[int, list[str], list[str]]]] = {}
        for path, item in paths.items():
            if not isinstance(path, str) or not isinstance(item, dict):
                continue
            item, item_at = self._resolve(item, _pointer("paths", path))
            listed = item.get("parameters")
            shared: list[Any] = listed if isinstance(listed, list) else []
            self.templates[path] = _template_segments(path)
            for method in METHODS:
                operation = item.get(method)
                if isinstance(operation, dict):
                    at = f"{item_at}{_pointer(method)}"
                    self.operations[(path, method.upper())] = self._operation(
                        operation, at, shared, f"{item_at}{_pointer('parameters')}"
                    )

    def _resolve(self, node: Any, at: str) -> tuple[Any, str]:
        """A Reference Object followed (within the document) to what it names, with that place's pointer."""
        for _hop in range(32):
            if not (isinstance(node, dict) and isinstance(node.get("$ref"), str) and node["$ref"].startswith("#")):
                return node, at
            at = unquote(node["$ref"][1:])
            node = self.document
            for part in at.split("/")[1:]:
                key = part.replace("~1", "/").replace("~0", "~")
                if isinstance(node, list) and key.isdigit() and int(key) < len(node):
                    node = node[int(key)]
                elif isinstance(node, dict) and key in node:
                    node = node[key]
                else:
                    raise ValueError(f"$ref {at!r} names nothing in the document")
        raise ValueError(f"$ref chain at {at!r} is too long")

    def _validator(self, at: str) -> Any:
        """A validator of the schema at this place of the document (its $refs resolve in the document)."""
        schema = {"$ref": f"{_DOCUMENT_URI}#{quote(at, safe='/~')}"}
        return self.validator_class(schema, registry=self.registry, format_checker=self.format_checker)

    def _types(self, schema: Any, at: str) -> tuple[str | None, str | None]:
        """The schema's type and (for arrays) its items' type, for converting a parameter's text."""
        schema, at = self._resolve(schema, at)
        if not isinstance(schema, dict):
            return None, None
        kind = _first_type(schema)
        if kind == "array":
            items, _at = self._resolve(schema.get("items"), f"{at}/items")
            return kind, _first_type(items) if isinstance(items, dict) else None
        return kind, None

    def _operation(self, operation: dict[str, Any], at: str, shared: list[Any], shared_at: str) -> _Operation:
        compiled = _Operation()
        by_key: dict[tuple[str, str], tuple[dict[str, Any], str]] = {}
        listed = operation.get("parameters")
        own: list[Any] = listed if isinstance(listed, list) else []
        for index, raw in enumerate(shared):
            param, param_at = self._resolve(raw, f"{shared_at}/{index}")
            if isinstance(param, dict):
                by_key[(str(param.get("name")), str(param.get("in")))] = (param, param_at)
        for index, raw in enumerate(own):
            param, param_at = self._resolve(raw, f"{at}/parameters/{index}")
            if isinstance(param, dict):
                by_key[(str(param.get("name")), str(param.get("in")))] = (param, param_at)  # the operation's wins
        for (name, location), (param, param_at) in by_key.items():
            if location not in ("path", "query", "header") or (
                location == "header" and name.lower() in _IGNORED_HEADERS
            ):
                continue
            schema = param.get("schema")
            validator = self._validator(f"{param_at}/schema") if isinstance(schema, dict) else None
            kind, item_kind = self._types(schema, f"{param_at}/schema") if validator is not None else (None, None)
            compiled_param = _Param(
                name, location, bool(param.get("required")) or location == "path", validator, kind, item_kind
            )
            if validator is not None:
                compiled_param.fast = self._fast_check(schema, f"{param_at}/schema")
            style = param.get("style", "form" if location == "query" else "simple")
            compiled_param.explode = bool(param.get("explode", style == "form"))
            compiled.params.append(compiled_param)
        compiled.params.sort(key=lambda p: ("path", "query", "header").index(p.location))
        body, body_at = self._resolve(operation.get("requestBody"), f"{at}/requestBody")
        if isinstance(body, dict):
            compiled.body_required = bool(body.get("required"))
            declared = body.get("content")
            content: dict[str, Any] = declared if isinstance(declared, dict) else {}
            compiled.media_types = tuple(str(t).lower() for t in content)
            for media_type, media in content.items():
                if _is_json(str(media_type).lower()) and isinstance(media, dict) and "schema" in media:
                    compiled.json_types += (str(media_type).lower(),)
                    if compiled.body_validator is None:
                        media_at = f"{body_at}{_pointer('content', media_type)}"
                        compiled.body_validator = self._validator(f"{media_at}/schema")
                        compiled.body_fast = self._fast_check(media["schema"], f"{media_at}/schema")
        return compiled

    def _fast_check(self, schema: Any, at: str) -> Any:
        """A compiled (jsonschema-rs) check of a body or parameter schema where it can mean exactly what the schema
        means to openapi-schema-validator; else None. One per schema: operations that $ref the same one share it.
        It is asked first: "valid" lets the value through at once, anything else goes to openapi-schema-validator,
        which decides and words the errors."""
        ref = schema.get("$ref") if isinstance(schema, dict) and len(schema) == 1 else None
        key = ref if isinstance(ref, str) else at
        if key not in self.translated:
            if self.translation is not None:
                self.translated[key] = self._fast_check_30(schema, at)
            else:
                self.translated[key] = self._fast_check_31(schema, at)
        return self.translated[key]

    def _fast_check_31(self, schema: Any, at: str) -> Any:
        """3.1: when every schema it reaches uses only keywords that mean the same to jsonschema-rs and to
        openapi-schema-validator."""
        reached: dict[str, Any] = {}
        pending: list[tuple[Any, str]] = [(schema, at)]
        while pending:
            node, where = pending.pop()
            if isinstance(node, bool):
                continue
            if not isinstance(node, dict) or not set(node) - {"format"} <= _FAST_KEYWORDS:
                return None
            if "format" in node and node["format"] not in _FAST_FORMATS:
                return None
            ref = node.get("$ref")
            if ref is not None:
                if not isinstance(ref, str) or not ref.startswith("#/components/"):
                    return None
                if ref not in reached:
                    target, _where = self._resolve({"$ref": ref}, where)
                    reached[ref] = target
                    pending.append((target, ref[1:]))
            for key, value in node.items():
                if key in _SCHEMA_VALUES:
                    pending.append((value, f"{where}/{key}"))
                elif key in _SCHEMA_LISTS:
                    if not isinstance(value, list):
                        return None
                    pending.extend((item, f"{where}/{key}") for item in value)
                elif key in _SCHEMA_MAPS:
                    if not isinstance(value, dict):
                        return None
                    pending.extend((item, f"{where}/{key}") for item in value.values())
        # Only the components the schema reaches, at their own pointers.
        root: dict[str, Any] = {"allOf": [schema]}
        for ref, target in reached.items():
            node = root
            parts = [p.replace("~1", "/").replace("~0", "~") for p in unquote(ref[2:]).split("/")]
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = target
        try:
            return jsonschema_rs.Draft202012Validator(root, validate_formats=True)
        except Exception:  # a pattern its regex engine does not take, and the like: no fast check
            return None

    def _fast_check_30(self, schema: Any, at: str) -> Any:
        """3.0: by a translation (see _Oas30Translation), where it can be exact."""
        assert self.translation is not None
        try:
            return self.translation.validator(schema)
        except (_Untranslatable, RecursionError):
            return None
        except Exception:  # jsonschema-rs refuses the translation (a draft 4 rule it holds to): no fast check
            logger.debug("no compiled check of the 3.0 schema at %s", at, exc_info=True)
            return None


def _first_type(schema: dict[str, Any]) -> str | None:
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), None)
    return kind if isinstance(kind, str) else None


def _is_json(media_type: str) -> bool:
    return media_type == "application/json" or media_type.endswith("+json") or media_type == "*/*"


def _template_segments(path: str) -> list[tuple[int, list[str], list[str]]]:
    """Per templated segment of a spec path: its index, its literal parts and its parameter names."""
    found = []
    for index, segment in enumerate(path[1:].split("/")):
        names = _TEMPLATE.findall(segment)
        if names:
            found.append((index, _TEMPLATE_SPLIT.split(segment), names))
    return found


def _path_values(templates: list[tuple[int, list[str], list[str]]], path: str) -> dict[str, str]:
    """The path parameters' values: each template's text between its segment's literal parts (placed as
    apimgmt.spec_operations matches them: each literal at its earliest place, the last one at the end),
    percent-decoded."""
    segments = path[1:].split("/") if path.startswith("/") else [path]
    values: dict[str, str] = {}
    for index, parts, names in templates:
        if index >= len(segments):
            continue
        segment = segments[index]
        position = len(parts[0])
        for number, (name, literal) in enumerate(zip(names, parts[1:], strict=True)):
            last = number == len(names) - 1
            end = len(segment) - len(literal) if last else segment.find(literal, position + 1)
            if end <= position:
                break
            values[name] = unquote(segment[position:end])
            position = end + len(literal)
    return values


# -- the step ----------------------------------------------------------------------------------------------------------


class RequestValidation(Step):
    name = "request_validation"
    phase = ACCESS

    def __init__(self, compiled: _Compiled, *, shadow: bool) -> None:
        self.compiled = compiled
        self.shadow = shadow
        self.mode = "shadow" if shadow else "enforce"

    def request(self, ex: Exchange) -> Result | None:
        route = ex.route
        method = "GET" if ex.method == "HEAD" else ex.method
        relative = ex.path[len(route.spec.base_path) :]
        match = self.compiled.table.match(method, relative)
        if match.status != ALLOWED:
            return None  # not an operation of the document: restrict_to_spec's concern
        operation = self.compiled.operations.get((match.template, method))
        if operation is None:
            return None
        errors = list(islice(self._parameter_errors(ex, operation, match.template, relative), MAX_ERRORS))
        refusal = self._body(ex, operation, errors)
        if refusal is not None:
            return refusal
        if not errors:
            return None
        failures_total.labels(route.api_id, self.mode).inc()
        if self.shadow:
            logger.info(
                "request does not match the OpenAPI document (shadow: let through)",
                extra={"api_id": route.api_id, "request_id": ex.request_id, "errors": errors},
            )
            return None
        first = errors[0]
        where = first.get("name") or first.get("pointer") or ""
        detail = (
            f"The request does not match the API's OpenAPI document ({len(errors)} problem(s)); first: "
            f"{first['in']} {where!r}: {first['message']}"
        )
        return ex.fail(
            problem(
                400,
                "request-invalid",
                "Request does not match the API",
                detail,
                ex.request_id,
                extra={"errors": errors},
            )
        )

    def _parameter_errors(self, ex: Exchange, operation: _Operation, template: str, relative: str) -> Iterator[Error]:
        if not operation.params:
            return
        path_values: dict[str, str] | None = None
        query: dict[str, list[str]] | None = None
        environ = ex.environ
        for param in operation.params:
            texts: list[str] | None
            if param.location == "path":
                if path_values is None:
                    path_values = _path_values(self.compiled.templates.get(template, []), relative)
                text = path_values.get(param.name)
                texts = None if text is None else [text]
            elif param.location == "query":
                if query is None:
                    query = parse_qs(ex.query, keep_blank_values=True) if ex.query else {}
                texts = query.get(param.name)
            else:
                header = environ.get(param.environ_key)
                texts = None if header is None else [header]
            if texts is None:
                if param.required:
                    yield {
                        "in": param.location,
                        "name": param.name,
                        "message": f"required {param.location} parameter is missing.",
                    }
                continue
            if param.validator is None:
                continue
            value = param.value(texts)
            if param.fast is not None and _finite_numbers(value) and _fast_valid(param.fast, value):
                continue
            for error in _errors(param.validator, value, ex):
                message = error.message if not error.absolute_path else f"{_json_pointer(error)}: {error.message}"
                yield {"in": param.location, "name": param.name, "message": message[:MAX_MESSAGE]}

    def _body(self, ex: Exchange, operation: _Operation, errors: list[Error]) -> Result | None:
        """Add the body's errors; a Result when the body cannot be read or checked (enforce) or arrived badly."""
        environ = ex.environ
        length_text = environ.get("CONTENT_LENGTH") or ""
        chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
        try:
            length = int(length_text) if length_text else 0
        except ValueError:
            return None  # the proxy answers 400 for a length that is no number
        if not length and not chunked:
            if operation.body_required:
                errors.append({"in": "body", "pointer": "", "message": "a request body is required."})
            return None
        if not operation.media_types:
            return None  # the document says nothing about a body here
        media_type = environ.get("CONTENT_TYPE", "").split(";", 1)[0].strip().lower()
        if not _listed(media_type, operation.media_types):
            errors.append(
                {
                    "in": "header",
                    "name": "Content-Type",
                    "message": f"{media_type or 'no Content-Type'} is not one of {', '.join(operation.media_types)}.",
                }
            )
            return None
        if operation.body_validator is None or not _listed(media_type, operation.json_types):
            return None
        if length > ex.gateway.max_body:
            return None  # the proxy step refuses it (413) without reading it
        if chunked or length > MAX_VALIDATED_BODY:
            if self.shadow:
                logger.info("JSON body too large (or chunked) to validate", extra={"api_id": ex.route.api_id})
                return None
            failures_total.labels(ex.route.api_id, self.mode).inc()
            detail = (
                f"This API validates JSON request bodies, which must come with a Content-Length of at most "
                f"{MAX_VALIDATED_BODY} bytes."
            )
            return ex.fail(problem(413, "body-too-large", "Request body too large", detail, ex.request_id))
        body = RequestBody(
            environ["wsgi.input"],
            length,
            length,
            client_socket=environ.get("gunicorn.socket"),
            reaper=ex.gateway.upstreams.reaper,
            read_timeout=ex.gateway.body_read_timeout,
        )
        try:
            body.buffer()
        except ClientBodyError as exc:
            slug, title = ("body-timeout", "Request timeout") if exc.status == 408 else ("bad-body", "Bad request")
            return ex.fail(problem(exc.status, slug, title, exc.detail, ex.request_id))
        data = body.buffered or b""
        environ["wsgi.input"] = io.BytesIO(data)  # the proxy sends what was read, as it was
        finite = True  # jsonschema-rs cannot hold an infinite or NaN number: such a body is not asked
        try:
            try:
                document = json.loads(data, parse_float=_finite_float, parse_constant=_no_constant)
            except _NonFinite:
                finite = False
                document = json.loads(data)
        except (ValueError, RecursionError) as exc:
            errors.append({"in": "body", "pointer": "", "message": f"not valid JSON: {exc}"[:MAX_MESSAGE]})
            return None
        if finite and operation.body_fast is not None and _fast_valid(operation.body_fast, document):
            return None
        room = MAX_ERRORS - len(errors)
        for error in islice(_errors(operation.body_validator, document, ex), max(room, 0)):
            errors.append({"in": "body", "pointer": _json_pointer(error), "message": error.message[:MAX_MESSAGE]})
        return None


def _fast_valid(validator: Any, instance: Any) -> bool:
    """The compiled check's "valid"; anything it cannot take (a string with a lone surrogate, a format check that
    raised) is left to openapi-schema-validator."""
    try:
        return bool(validator.is_valid(instance))
    except Exception:
        return False


def _errors(validator: Any, instance: Any, ex: Exchange) -> Iterator[SchemaError]:
    """The validator's errors; a schema that cannot be used (a $ref to nowhere in it) checks nothing, logged."""
    try:
        yield from validator.iter_errors(instance)
    except Exception:
        logger.exception("request validation of API %s: a schema of its document cannot be used", ex.route.api_id)


def _listed(media_type: str, listed: tuple[str, ...]) -> bool:
    for entry in listed:
        if entry == media_type or entry == "*/*":
            return True
        if entry.endswith("/*") and media_type.startswith(entry[:-1]):
            return True
    return False


def _json_pointer(error: SchemaError) -> str:
    """Where in the instance the error is; for a missing required property, the property's own place."""
    path = list(error.absolute_path)
    if error.validator == "required" and isinstance(error.instance, dict):
        missing = next((name for name in error.validator_value if name not in error.instance), None)
        if missing is not None:
            path.append(missing)
    return _pointer(*path)


def build(route: Route, policies: list[PolicySpec], plan_policies: dict[str, list[PolicySpec]]) -> list[Step]:
    """A step when the API validates requests (shadow or enforce) and has an OpenAPI document with paths."""
    spec = route.spec
    document = spec.openapi_spec
    if spec.validation == "off" or not isinstance(document, dict) or not document.get("paths"):
        return []
    try:
        compiled = _Compiled(document)
    except Exception:  # a document the validators cannot compile: logged, and the API is served unchecked
        logger.exception("request validation of API %s could not compile its OpenAPI document", route.api_id)
        return []
    return [RequestValidation(compiled, shadow=spec.validation == "shadow")]
