"""Every deployment file through the field's tool for its format, and the command line deploy/check.sh
runs (deploy/validate.py)."""

from __future__ import annotations

import os
import sys

import yaml

from deploy.checks import dockerfile, kubernetes, prometheus, tools
from deploy.checks.files import DOCKERFILE, K8S_EXAMPLES, KUBERNETES, ROOT, SHELL_SCRIPTS, load_yaml_docs
from tests.deployment.tooling import require_tool, run


def test_hadolint_passes_the_dockerfiles():
    require_tool("hadolint")
    assert dockerfile.hadolint_problems() == []


def test_hadolint_catches_a_root_image(tmp_path):
    # The tool is really looking: a Dockerfile that ends as root is refused.
    broken = tmp_path / "Dockerfile"
    broken.write_text(DOCKERFILE.read_text().replace("USER 10001:10001", "USER root"))
    code, out = tools.run([require_tool("hadolint"), "--config", ROOT / ".hadolint.yaml", broken])
    assert code != 0 and "DL3002" in out


def test_shellcheck_passes_the_scripts():
    require_tool("shellcheck")
    assert tools.shellcheck_problems() == []


def test_a_missing_checker_is_a_problem_not_a_pass():
    [problem] = tools.checker_problems("no-such-checker-here", [], "complains")
    assert problem.startswith("no-such-checker-here is not installed")


def test_promtool_checks_configs_rules_and_alert_unit_tests(promtool):
    assert prometheus.promtool_problems(promtool) == []


def test_compose_renders_with_podman_compose():
    from deploy.checks.compose import podman_compose_problems
    from deploy.checks.files import COMPOSE, COMPOSE_GPU, COMPOSE_LOCAL

    require_tool("podman")
    for files in ([COMPOSE], [COMPOSE, COMPOSE_GPU], [COMPOSE, COMPOSE_LOCAL]):
        assert podman_compose_problems(*files) == []


def test_kubernetes_schemas_strict(kubectl, tmp_path):
    require_tool("kubernetes-validate")
    base = tmp_path / "base.yaml"
    base.write_text(kubernetes.render_kustomize(KUBERNETES, kubectl))
    assert kubernetes.kubernetes_validate_problems([base, *K8S_EXAMPLES]) == []
    broken = tmp_path / "broken.yaml"
    broken.write_text(base.read_text().replace("automountServiceAccountToken", "automountServiceAcountToken"))
    assert any("automountServiceAcountToken" in p for p in kubernetes.kubernetes_validate_problems([broken]))


def test_persistent_volumes_example_applies_on_the_base(kubectl, tmp_path):
    kubernetes.write_example_overlay(tmp_path / "overlay")
    docs = load_yaml_docs(kubernetes.render_kustomize(tmp_path / "overlay", kubectl))
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["hf-cache"] == {"name": "hf-cache",
                                   "persistentVolumeClaim": {"claimName": "paligemma-hf-cache"}}
    assert sorted(d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim") == [
        "paligemma-hf-cache", "paligemma-models"]
    (tmp_path / "overlay.yaml").write_text(yaml.safe_dump_all(docs))
    assert kubernetes.kubernetes_validate_problems([tmp_path / "overlay.yaml"]) == []


def test_scripts_are_executable():
    for script in SHELL_SCRIPTS:
        assert os.access(script, os.X_OK), f"{script} is not executable"


def test_the_command_line_that_check_sh_runs(kubectl, promtool):
    # deploy/check.sh calls these two first; both must pass on the files as committed.
    for command in ("tools", "invariants"):
        result = run(sys.executable, "deploy/validate.py", command)
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.strip().startswith("ok:"), result.stdout
    unknown = run(sys.executable, "deploy/validate.py", "no-such-command")
    assert unknown.returncode == 2 and "deploy/validate.py invariants" in unknown.stderr
