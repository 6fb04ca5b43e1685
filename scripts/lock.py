"""Lock files: `lock.py compile` regenerates requirements.txt and requirements-dev.txt; `lock.py check` fails when they
are stale (offline: each lock records a digest of the inputs it was resolved from)."""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# One resolution for every supported platform and Python (3.11 and 3.12: markers where they differ), with the
# hashes of every published file of each pinned release.
UV_OPTIONS = ("--universal", "--python-version", "3.11", "--generate-hashes", "--custom-compile-command", "make lock")
DIGEST_LINE = "# inputs-sha256: "


@dataclass(frozen=True)
class Lock:
    output: str
    source: str
    # Files whose content decides the result: the input and everything it includes or is constrained by.
    inputs: tuple[str, ...]


RUNTIME = Lock("requirements.txt", "requirements.in", ("requirements.in",))
# The dev set is resolved on top of the runtime lock (`-c requirements.txt`), so it depends on that lock too.
DEV = Lock(
    "requirements-dev.txt", "requirements-dev.in", ("requirements.in", "requirements-dev.in", "requirements.txt")
)
LOCKS = (RUNTIME, DEV)


def _body(text: str) -> str:
    """The lock without its digest line (the digest of requirements.txt as an input must not cover itself)."""
    return "".join(line for line in text.splitlines(keepends=True) if not line.startswith(DIGEST_LINE))


def inputs_digest(lock: Lock) -> str:
    digest = hashlib.sha256(" ".join(UV_OPTIONS).encode())
    for name in lock.inputs:
        digest.update(b"\0" + name.encode() + b"\0" + _body((ROOT / name).read_text()).encode())
    return digest.hexdigest()


def recorded_digest(lock: Lock) -> str | None:
    path = ROOT / lock.output
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        if line.startswith(DIGEST_LINE):
            return line[len(DIGEST_LINE) :].strip()
    return None


def pins(text: str) -> dict[str, str]:
    """name → version for every `name==version` line of a lock (names normalised as PEP 503 does)."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)", line)
        if match:
            found[re.sub(r"[-_.]+", "-", match.group(1)).lower()] = match.group(2)
    return found


def _uv() -> str:
    for candidate in (ROOT / ".venv" / "bin" / "uv", shutil.which("uv")):
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    sys.exit("uv not found: run `make install` (requirements-dev.txt brings it) or put uv on PATH")


def compile_lock(lock: Lock, *, upgrade: bool) -> None:
    # uv writes the output file only when it succeeds, and keeps the versions it finds there unless told to upgrade.
    command = [_uv(), "pip", "compile", "--quiet", *UV_OPTIONS, lock.source, "-o", lock.output]
    if upgrade:
        command.append("--upgrade")
    subprocess.run(command, cwd=ROOT, check=True)  # noqa: S603 (uv with fixed arguments)
    output = ROOT / lock.output
    lines = output.read_text().splitlines(keepends=True)
    # The digest goes right after uv's header comment block.
    at = next((i for i, line in enumerate(lines) if not line.startswith("#")), len(lines))
    lines.insert(at, f"{DIGEST_LINE}{inputs_digest(lock)}\n")
    output.write_text("".join(lines))
    print(f"wrote {lock.output}")


def check() -> list[str]:
    problems = []
    for lock in LOCKS:
        recorded = recorded_digest(lock)
        if recorded is None:
            problems.append(f"{lock.output} has no '{DIGEST_LINE.strip()}' line: run `make lock`")
        elif recorded != inputs_digest(lock):
            names = ", ".join(lock.inputs)
            problems.append(f"{lock.output} is stale (one of {names} changed since it was resolved): run `make lock`")
    runtime, dev = pins((ROOT / RUNTIME.output).read_text()), pins((ROOT / DEV.output).read_text())
    for name, version in sorted(runtime.items()):
        if dev.get(name) != version:
            problems.append(f"{DEV.output} has {name}=={dev.get(name)}, {RUNTIME.output} {name}=={version}")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    compile_parser = sub.add_parser("compile", help="regenerate both lock files")
    compile_parser.add_argument("--upgrade", action="store_true", help="move every pin to the newest release")
    sub.add_parser("check", help="fail when a lock file is stale")
    args = parser.parse_args()
    if args.command == "compile":
        for lock in LOCKS:
            compile_lock(lock, upgrade=args.upgrade)
        return
    problems = check()
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        sys.exit(1)
    print("lock files are up to date")


if __name__ == "__main__":
    main()
