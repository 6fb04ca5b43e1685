"""Secrets in configuration documents: export writes a policy's ``${VARIABLE}`` back, never the value it stood for.

Reading a document expands ``${NAME}``; the policy config values that held a reference are remembered at apply
(``Policy.config_references``: the JSON pointer, the document's text, an HMAC of the value). Export writes the
document's text again while the stored value still has that HMAC, so export → apply → export keeps the bytes and
the secret stays in the environment. A recorded value whose HMAC no longer matches (changed in the admin or the
API since the apply, or recorded under another ``SECRET_KEY``) is still a secret: it is exported as a ``${…}``
placeholder with a generated name and a warning, never in clear. So is a header transform's value that looks like a
credential (``Authorization``, ``Cookie``, a name with ``token``, ``secret``, ``password`` or ``key``…, unless the
value is only per-request templates such as ``{consumer_id}``) and has no reference. Plans hide the same values:
those the document or the stored policy takes from a variable, and the credential-shaped ones.
"""

from __future__ import annotations

import copy
import hmac
import re
from collections.abc import Collection, Iterable, Mapping
from typing import Any

from django.conf import settings
from django.utils.crypto import salted_hmac

from apimgmt.models import Policy
from apimgmt.policy_types.headers import TEMPLATES

# Key of the canonical document (``read_document``) holding {policy name: {JSON pointer into config: text}}.
REFERENCES = "variable_references"

_REFERENCE = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "x-api-key"})
_SECRET_WORDS = ("token", "secret", "password", "key", "cookie")
# A header value's per-request templates, as the gateway reads them (gateway/policies/headers.py): "{{" is a brace.
_TEMPLATE_PART = re.compile(r"\{\{|\}\}|\{([^{}]*)\}")
# The words a value of templates may have beside them and still send no stored credential: authentication schemes.
_SCHEME_WORDS = frozenset({"bearer", "basic", "digest", "token"})
_MISSING = object()


class Reference(str):
    """A document's own text with its ``${VARIABLE}``: written as it is (``dump_text`` escapes other ``${``)."""

    __slots__ = ()


def pointer(path: Iterable[str]) -> str:
    """A JSON pointer (RFC 6901) into a policy's config: /request/set/X-Upstream-Token."""
    return "".join("/" + part.replace("~", "~0").replace("/", "~1") for part in path)


def _parts(at: str) -> list[str]:
    return [part.replace("~1", "/").replace("~0", "~") for part in at.split("/")[1:]]


def _value_at(config: Any, at: str) -> Any:
    node = config
    for part in _parts(at):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _set_at(config: dict[str, Any], at: str, value: Any) -> None:
    *parents, last = _parts(at)
    node = config
    for part in parents:
        node = node[part]
    node[last] = value


def _digest(value: str, secret: str | None = None) -> str:
    # Keyed (SECRET_KEY): the digest of a short secret in the database must not let anyone guess the secret.
    return salted_hmac("apimgmt.config_doc.secrets.reference", value, secret=secret, algorithm="sha256").hexdigest()


def has_reference(text: str) -> bool:
    """Whether the text names a variable (``$${`` is a literal ``${``, not one)."""
    return any(match.group(1) for match in _REFERENCE.finditer(text))


def references_in(data: Any) -> dict[str, dict[str, str]]:
    """The raw document's policy config strings that name a variable, before expansion: {policy: {pointer: text}}.
    Tolerant of any shape (the shape is checked after expansion)."""
    found: dict[str, dict[str, str]] = {}
    policies = data.get("policies") if isinstance(data, dict) else None

    def walk(node: Any, path: list[str], into: dict[str, str]) -> None:
        if isinstance(node, str) and has_reference(node):
            into[pointer(path)] = node
        elif isinstance(node, dict):
            for key, value in node.items():
                walk(value, [*path, str(key)], into)

    for item in policies if isinstance(policies, list) else []:
        if isinstance(item, dict) and isinstance(item.get("name"), str) and isinstance(item.get("config"), dict):
            references: dict[str, str] = {}
            walk(item["config"], [], references)
            if references:
                found[item["name"]] = references
    return found


def recorded_references(config: Mapping[str, Any], references: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """What ``Policy.config_references`` holds for a document's references, given the config as stored."""
    recorded = {}
    for at, text in sorted(references.items()):
        value = _value_at(config, at)
        if isinstance(value, str):
            recorded[at] = {"reference": text, "digest": _digest(value)}
    return recorded


def is_secret_header(name: str) -> bool:
    """Whether a header's name says it carries a credential (a guess: a value from a variable needs no guessing)."""
    lower = name.lower()
    return lower in _SECRET_HEADERS or any(word in lower for word in _SECRET_WORDS)


def only_templates(value: str) -> bool:
    """Whether a header value is made of per-request templates (``{consumer_id}``, ``{jwt.sub}``…) with nothing
    beside them but punctuation and an authentication scheme's name (``Bearer {jwt.sub}``): what it sends comes
    from the request, so it is no stored credential (``X-Cache-Key: {consumer_id}``)."""
    literal: list[str] = []
    templates, start = 0, 0
    for match in _TEMPLATE_PART.finditer(value):
        literal.append(value[start : match.start()])
        start = match.end()
        name = match.group(1)
        if name is None:  # "{{" or "}}": a literal brace
            continue
        if name not in TEMPLATES and not name.startswith("jwt."):
            return False
        templates += 1
    literal.append(value[start:])
    words = re.findall(r"[A-Za-z0-9]+", "".join(literal))
    return templates > 0 and all(word.lower() in _SCHEME_WORDS for word in words)


def is_secret_value(header: str, value: Any) -> bool:
    """Whether a header transform's value is credential-shaped: a secret-looking name and a value that is not only
    templates."""
    return is_secret_header(header) and not (isinstance(value, str) and only_templates(value))


def _variable_name(policy: str, header: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Z0-9]+", "_", f"{policy}_{header}".upper()).strip("_")
    base = base if base and not base[0].isdigit() else f"SECRET_{base}"
    name, n = base, 2
    while name in taken:
        name, n = f"{base}_{n}", n + 1
    taken.add(name)
    return name


def _matches(reference: dict[str, Any], value: Any) -> bool:
    """Whether the stored value is still the one recorded, under SECRET_KEY or one of SECRET_KEY_FALLBACKS (a key
    rotated the way Django rotates keys keeps the references; the next apply records them under the new key)."""
    if not isinstance(value, str):
        return False
    recorded = str(reference.get("digest", ""))
    keys = [settings.SECRET_KEY, *getattr(settings, "SECRET_KEY_FALLBACKS", [])]
    return any(hmac.compare_digest(recorded, _digest(value, key)) for key in keys)


def exported_policies(
    items: list[dict[str, Any]], rows: Mapping[str, Policy], warnings: list[str] | None
) -> list[dict[str, Any]]:
    """The policies as export writes them: recorded references in place of the values they stood for, a generated
    ``${…}`` for a recorded value that changed since (its HMAC no longer matches) and for any other secret-shaped
    header value, each named in ``warnings``. A value once taken from a variable stays a secret whatever its name:
    it is never written in clear."""
    taken = {
        match.group(1)
        for row in rows.values()
        for reference in (row.config_references or {}).values()
        if isinstance(reference, dict)
        for match in _REFERENCE.finditer(str(reference.get("reference", "")))
        if match.group(1)
    }
    exported = []
    for item in items:
        row = rows[item["name"]]
        config = copy.deepcopy(item["config"])
        for at, reference in sorted((row.config_references or {}).items()):
            value = _value_at(config, at)
            if not isinstance(reference, dict) or not at or value is _MISSING:
                continue  # a value since removed has nothing left to hide
            if _matches(reference, value):
                _set_at(config, at, Reference(reference["reference"]))
                continue
            # Changed in the admin or the API since the apply, or recorded under another SECRET_KEY: a new name,
            # not the old reference, so an apply with the old variable cannot silently undo the change.
            variable = _variable_name(item["name"], _parts(at)[-1], taken)
            _set_at(config, at, Reference(f"${{{variable}}}"))
            if warnings is not None:
                warnings.append(
                    f"policies[{item['name']}].config.{'.'.join(_parts(at))} was applied from "
                    f"{reference.get('reference')} and its value changed outside the file since (in the admin or the "
                    f"API, or SECRET_KEY changed): it is written as ${{{variable}}}, not in clear: set {variable} when "
                    "applying this file, or write the old reference back once its variable holds the current value."
                )
        if item["policy_type"] == Policy.Type.HEADERS:
            for side in ("request", "response"):
                for operation in ("add", "set"):
                    values = (config.get(side) or {}).get(operation) or {}
                    for header, value in sorted(values.items()):
                        if isinstance(value, Reference) or not value or not is_secret_value(header, value):
                            continue
                        variable = _variable_name(item["name"], header, taken)
                        values[header] = Reference(f"${{{variable}}}")
                        if warnings is not None:
                            warnings.append(
                                f"policies[{item['name']}].config.{side}.{operation}.{header} is written as "
                                f"${{{variable}}}, not in clear: set {variable} when applying this file."
                            )
        exported.append({**item, "config": config})
    return exported


def _secret_values(config: Any) -> dict[str, Any]:
    """The credential-shaped header values of a headers config, by JSON pointer."""
    found = {}
    for side in ("request", "response"):
        for operation in ("add", "set"):
            values = (config.get(side) or {}).get(operation) if isinstance(config, dict) else None
            for header, value in (values or {}).items() if isinstance(values, dict) else ():
                if isinstance(value, str) and is_secret_value(header, value):
                    found[pointer([side, operation, header])] = value
    return found


def _hidden(config: Any, pointers: Collection[str]) -> dict[str, Any]:
    found = _secret_values(config)
    for at in pointers:
        value = _value_at(config, at) if at else _MISSING
        if value is not _MISSING:
            found[at] = value
    return found


def _mask_at(config: Any, at: str, text: str) -> None:
    *parents, last = _parts(at)
    node = config
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict) and last in node:
        node[last] = text


def masked_configs(old: Any, new: Any, references: Collection[str] = ()) -> tuple[Any, Any]:
    """A policy config change as a plan shows it (a pull-request comment, the management API's answer): a value at
    one of ``references`` (pointers the document or the stored policy takes from a variable) and a credential-shaped
    header value are ``(secret)``, or ``(secret, changed)`` on the new side when it differs."""
    old_secrets, new_secrets = _hidden(old, references), _hidden(new, references)
    if not old_secrets and not new_secrets:
        return old, new
    shown_old, shown_new = copy.deepcopy(old), copy.deepcopy(new)
    for at in old_secrets:
        _mask_at(shown_old, at, "(secret)")
    for at, value in new_secrets.items():
        _mask_at(shown_new, at, "(secret, changed)" if _value_at(old, at) != value else "(secret)")
    return shown_old, shown_new
