"""The CI recipe in docs/config-as-code.md, run as GitHub runs it (``bash -e``) with kubectl and gh stand-ins.

kubectl and gh are the only things faked: they are what the runner would reach over the network. The stand-in
kubectl records its arguments and standard input and exits with the code the command would have; gh answers
``--jq`` with the real jq over a recorded answer, so the recipe's jq expressions are run too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "config-as-code.md"
DOCUMENT = "format: apimgmt/config/v1\napis: []\n"
FINGERPRINT = "sha256:" + "ab12" * 16

pytestmark = pytest.mark.skipif(shutil.which("jq") is None, reason="the gh stand-in needs jq")


def _workflow() -> dict[str, Any]:
    section = GUIDE.read_text().split("## CI: plan on pull request, apply on merge", 1)[1]
    text = section.split("```yaml\n", 1)[1].split("\n```\n", 1)[0]
    workflow: dict[str, Any] = yaml.safe_load(text)
    return workflow


def _steps() -> dict[str, dict[str, Any]]:
    (job,) = _workflow()["jobs"].values()
    return {step["name"]: step for step in job["steps"] if "name" in step}


KUBECTL = """#!/bin/sh
printf '%s\\n' "$@" > "$RECORD/kubectl.args"
cat > "$RECORD/kubectl.stdin"
echo "Plan for tenant acme from <stdin>: 1 to create."
echo "fingerprint: $FINGERPRINT"
exit "$KUBECTL_CODE"
"""

# gh api …/pulls and gh pr view --json comments: the recorded answer through the real jq (gh's --jq prints strings
# raw, as jq -r does).
GH = """#!/bin/sh
for last; do :; done
if [ "$1" = api ]; then answer="$RECORD/pulls.json"; else answer="$RECORD/comments.json"; fi
jq -r "$last" "$answer"
"""


def _run(tmp_path: Path, step: str, *, kubectl_code: int, comments: list[str] | None = None) -> tuple[int, str]:
    bin_dir, record = tmp_path / "bin", tmp_path / "record"
    bin_dir.mkdir(exist_ok=True)
    record.mkdir(exist_ok=True)
    for name, script in (("kubectl", KUBECTL), ("gh", GH)):
        (bin_dir / name).write_text(script)
        (bin_dir / name).chmod(0o755)
    (record / "pulls.json").write_text(json.dumps([{"number": 7}]))
    bodies = comments if comments is not None else [f"~~~text\nPlan …\nfingerprint: {FINGERPRINT}\n~~~"]
    (record / "comments.json").write_text(json.dumps({"comments": [{"body": b} for b in bodies]}))
    (tmp_path / "config").mkdir(exist_ok=True)
    (tmp_path / "config" / "acme.yaml").write_text(DOCUMENT)
    script = _steps()[step]["run"].replace("${{ github.event.pull_request.number }}", "7")
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "RECORD": str(record),
        "FINGERPRINT": FINGERPRINT,
        "KUBECTL_CODE": str(kubectl_code),
        "GITHUB_OUTPUT": str(tmp_path / "github_output"),
        "GITHUB_REPOSITORY": "example/gateway-config",
        "GITHUB_SHA": "0123abcd",
        "USERS_UPSTREAM": "https://users.staging.example.com",
    }
    # What GitHub runs for a step without a shell: bash -e {0}.
    (tmp_path / "step.sh").write_text(script)
    done = subprocess.run(
        ["bash", "-e", str(tmp_path / "step.sh")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30
    )
    return done.returncode, done.stdout + done.stderr


def _kubectl_call(tmp_path: Path) -> tuple[list[str], str]:
    record = tmp_path / "record"
    return (record / "kubectl.args").read_text().splitlines(), (record / "kubectl.stdin").read_text()


def test_every_command_gets_the_file_and_the_variables() -> None:
    commands = [step["run"] for step in _steps().values() if "kubectl exec" in step.get("run", "")]
    assert len(commands) == 2
    for run in commands:
        assert "kubectl exec -i " in run
        assert "set +e" in run.splitlines()[0]
        assert 'env USERS_UPSTREAM="$USERS_UPSTREAM"' in run
    workflow = _workflow()
    (job,) = workflow["jobs"].values()
    assert job["environment"] == "staging"  # plan and apply against the same tenant; production by promotion
    assert workflow["permissions"]["pull-requests"] == "write"


@pytest.mark.parametrize(("code", "expected"), [(0, 0), (2, 0), (1, 0)])
def test_plan_step_always_gets_to_post_the_plan(tmp_path: Path, code: int, expected: int) -> None:
    returncode, output = _run(tmp_path, "Plan", kubectl_code=code)
    assert returncode == expected, output
    args, stdin = _kubectl_call(tmp_path)
    assert stdin == DOCUMENT
    assert args[:4] == ["exec", "-i", "deploy/apimgmt-control", "--"]
    assert "USERS_UPSTREAM=https://users.staging.example.com" in args
    assert (tmp_path / "github_output").read_text() == f"code={code}\n"
    assert f"fingerprint: {FINGERPRINT}" in (tmp_path / "plan.txt").read_text()


def test_posted_plan_and_the_failing_check(tmp_path: Path) -> None:
    steps = _steps()
    assert "gh pr comment" in steps["Post the plan"]["run"]
    condition = steps["Fail on an invalid document, refused deletes or no plan"]["if"]
    assert "steps.plan.outputs.code != '0' && steps.plan.outputs.code != '2'" in condition
    assert steps["Plan"]["id"] == "plan"


@pytest.mark.parametrize(("code", "expected"), [(0, 0), (2, 0), (1, 1), (137, 1)])
def test_apply_step_passes_the_reviewed_fingerprint(tmp_path: Path, code: int, expected: int) -> None:
    returncode, output = _run(tmp_path, "Apply the reviewed plan", kubectl_code=code)
    assert returncode == expected, output
    args, stdin = _kubectl_call(tmp_path)
    assert stdin == DOCUMENT
    assert args[:2] == ["exec", "-i"]
    assert args[args.index("--fingerprint") + 1] == FINGERPRINT


def test_apply_step_takes_the_last_plan_posted(tmp_path: Path) -> None:
    older = "~~~text\nfingerprint: sha256:" + "00" * 32 + "\n~~~"
    comments = [older, "looks good", f"~~~text\nfingerprint: {FINGERPRINT}\n~~~", "ship it"]
    returncode, output = _run(tmp_path, "Apply the reviewed plan", kubectl_code=2, comments=comments)
    assert returncode == 0, output
    args, _stdin = _kubectl_call(tmp_path)
    assert args[args.index("--fingerprint") + 1] == FINGERPRINT


def test_apply_step_refuses_without_a_reviewed_plan(tmp_path: Path) -> None:
    returncode, output = _run(tmp_path, "Apply the reviewed plan", kubectl_code=2, comments=["no plan here"])
    assert returncode == 1
    assert "no plan was posted on pull request 7" in output
    assert not (tmp_path / "record" / "kubectl.args").exists()
