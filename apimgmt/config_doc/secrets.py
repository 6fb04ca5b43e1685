"""Secrets in configuration documents: export writes a policy's ``${VARIABLE}`` back, never the value it stood for.

Reading a document expands ``${NAME}``; the policy config values that held a reference are remembered at apply
(``Policy.config_references``: the JSON pointer, the document's text, an HMAC of the value). Export writes the
document's text again while the stored value still has that HMAC, so export → apply → export keeps the bytes and
the secret stays in the environment. A header transform's value that looks like a credential (``Authorization``,
``Cookie``, a name with ``token``, ``secret``, ``password`` or ``key``…) and has no such reference is exported as a
``${…}`` placeholder with a generated name, and a warning names the variable to set: nothing secret reaches git.
"""

from __future__ import annotations

import copy
import hmac
import re
from collections.abc import Iterable, Mapping
from typing import Any

from django.utils.crypto import salted_hmac

from apimgmt.models import Policy

# Key of the canonical document (``read_document``) holding {policy name: {JSON pointer into config: text}}.
REFERENCES = "variable_references"

_REFERENCE = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "x-api-key"})
_SECRET_WORDS = ("token", "secret", "password", "key", "cookie")
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


def _digest(value: str) -> str:
    # Keyed (SECRET_KEY): the digest of a short secret in the database must not let anyone guess the secret.
    return salted_hmac("apimgmt.config_doc.secrets.reference", value, algorithm="sha256").hexdigest()


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
    lower = name.lower()
    return lower in _SECRET_HEADERS or any(word in lower for word in _SECRET_WORDS)


def _variable_name(policy: str, header: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Z0-9]+", "_", f"{policy}_{header}".upper()).strip("_")
    base = base if base and not base[0].isdigit() else f"SECRET_{base}"
    name, n = base, 2
    while name in taken:
        name, n = f"{base}_{n}", n + 1
    taken.add(name)
    return name


def exported_policies(
    items: list[dict[str, Any]], rows: Mapping[str, Policy], warnings: list[str] | None
) -> list[dict[str, Any]]:
    """The policies as export writes them: recorded references in place of the values they stood for, and a
    generated ``${…}`` for any other secret-shaped header value (each named in ``warnings``)."""
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
            if (
                isinstance(reference, dict)
                and isinstance(value, str)
                and hmac.compare_digest(str(reference.get("digest", "")), _digest(value))
            ):
                _set_at(config, at, Reference(reference["reference"]))
        if item["policy_type"] == Policy.Type.HEADERS:
            for side in ("request", "response"):
                for operation in ("add", "set"):
                    values = (config.get(side) or {}).get(operation) or {}
                    for header, value in sorted(values.items()):
                        if isinstance(value, Reference) or not is_secret_header(header) or not value:
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


def _secret_values(config: Any) -> dict[tuple[str, str, str], str]:
    found = {}
    for side in ("request", "response"):
        for operation in ("add", "set"):
            values = (config.get(side) or {}).get(operation) if isinstance(config, dict) else None
            for header, value in (values or {}).items() if isinstance(values, dict) else ():
                if is_secret_header(header) and isinstance(value, str):
                    found[(side, operation, header)] = value
    return found


def masked_configs(old: Any, new: Any) -> tuple[Any, Any]:
    """A policy config change as a plan shows it (a pull-request comment, the management API's answer): a
    secret-shaped header value is ``(secret)``, or ``(secret, changed)`` on the new side when it differs."""
    old_secrets, new_secrets = _secret_values(old), _secret_values(new)
    if not old_secrets and not new_secrets:
        return old, new
    old, new = copy.deepcopy(old), copy.deepcopy(new)
    for side, operation, header in old_secrets:
        old[side][operation][header] = "(secret)"
    for (side, operation, header), value in new_secrets.items():
        changed = old_secrets.get((side, operation, header)) != value
        new[side][operation][header] = "(secret, changed)" if changed else "(secret)"
    return old, new
