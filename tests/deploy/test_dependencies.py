"""The lock files and the import rule, as `make check` sees them: stale locks and forbidden imports fail it."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LOCK_FILES = ("requirements.in", "requirements-dev.in", "requirements.txt", "requirements-dev.txt")
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lock_check(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(root / "scripts" / "lock.py"), "check"], capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def lock_copy(tmp_path: Path) -> Path:
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "lock.py", tmp_path / "scripts" / "lock.py")
    for name in LOCK_FILES:
        shutil.copy(ROOT / name, tmp_path / name)
    return tmp_path


def test_lock_files_are_up_to_date() -> None:
    checked = _lock_check(ROOT)
    assert checked.returncode == 0, checked.stderr


def test_every_runtime_pin_has_hashes_and_the_dev_set_holds_it() -> None:
    runtime = (ROOT / "requirements.txt").read_text()
    dev = (ROOT / "requirements-dev.txt").read_text()
    entries = re.findall(r"^([A-Za-z0-9][\w.-]*==\S+)(.*?)(?=^\S|\Z)", runtime, re.M | re.S)
    assert len(entries) > 20
    for pin, rest in entries:
        assert "--hash=sha256:" in rest, f"{pin} has no hash"
        assert re.search(rf"^{re.escape(pin)}\b", dev, re.M), f"requirements-dev.txt lacks {pin}"
    # What broke the production gateway once: gunicorn's gevent worker imports packaging.
    assert re.search(r"^packaging==", runtime, re.M)


def test_a_changed_input_makes_the_check_fail(lock_copy: Path) -> None:
    with (lock_copy / "requirements.in").open("a") as fh:
        fh.write("rich\n")

    checked = _lock_check(lock_copy)

    assert checked.returncode == 1
    assert "requirements.txt is stale" in checked.stderr and "make lock" in checked.stderr
    # The dev set is resolved on top of the runtime set, so it is stale too.
    assert "requirements-dev.txt is stale" in checked.stderr


def test_a_hand_edited_runtime_pin_makes_the_check_fail(lock_copy: Path) -> None:
    lock = lock_copy / "requirements.txt"
    lock.write_text(re.sub(r"^urllib3==\S+", "urllib3==2.0.0", lock.read_text(), flags=re.M))

    checked = _lock_check(lock_copy)

    assert checked.returncode == 1
    assert "requirements-dev.txt is stale" in checked.stderr
    assert "urllib3" in checked.stderr


def _lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(LINT_IMPORTS)], cwd=root, capture_output=True, text=True, timeout=120)


def test_import_rule_holds() -> None:
    linted = _lint_imports(ROOT)
    assert linted.returncode == 0, linted.stdout + linted.stderr
    assert "2 kept, 0 broken" in linted.stdout


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        ("portal/views.py", "from gateway import metrics", "portal.views -> gateway.metrics"),
        ("gateway/auth.py", "import portal.forms", "gateway.auth -> portal.forms"),
        ("apimgmt/services.py", "from gateway import problems", "apimgmt.services -> gateway.problems"),
    ],
)
def test_import_rule_catches_a_forbidden_import(tmp_path: Path, module: str, line: str, broken: str) -> None:
    for name in ("apimgmt", "gateway", "portal"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "static"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with (tmp_path / module).open("a") as fh:
        fh.write(f"\n{line}  # noqa\n")

    linted = _lint_imports(tmp_path)

    assert linted.returncode == 1
    assert broken in linted.stdout


def _top_level_imports(paths: list[Path]) -> set[str]:
    import ast

    found: set[str] = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
    return found


def test_every_package_the_product_imports_is_a_direct_runtime_dependency() -> None:
    """Not only somewhere in the closure: a package reached only through another's dependencies disappears when that
    one stops needing it."""
    from importlib.metadata import packages_distributions

    sources = [p for package in ("apimgmt", "gateway", "portal") for p in (ROOT / package).rglob("*.py")]
    sources.append(ROOT / "gunicorn.conf.py")
    modules = _top_level_imports(sources) - set(sys.stdlib_module_names) - {"apimgmt", "gateway", "portal"}
    distributions = packages_distributions()
    direct = {
        re.sub(r"[-_.]+", "-", match.group(1)).lower()
        for match in re.finditer(r"^([A-Za-z0-9][\w.-]*)", (ROOT / "requirements.in").read_text(), re.M)
    }
    missing = {}
    for module in sorted(modules):
        names = {re.sub(r"[-_.]+", "-", d).lower() for d in distributions.get(module, [module])}
        if not names & direct:
            missing[module] = sorted(names)
    assert not missing, f"imported by the product but not named in requirements.in: {missing}"
