"""The deployment files agree with the server and with each other (Dockerfile, Compose, Prometheus,
Grafana, Kubernetes). Fast and offline: the checks live in deploy/validate.py (deploy/check.sh runs
the same ones, plus an image build with --build).

kubectl and promtool are required, not optional: a missing one fails with the command that installs
it (scripts/install-system-deps.sh), so that CI never passes by silently checking less.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("deploy_validate", ROOT / "deploy" / "validate.py")
assert _spec and _spec.loader
validate = importlib.util.module_from_spec(_spec)
sys.modules["deploy_validate"] = validate
_spec.loader.exec_module(validate)

INSTALL_HINT = "run `sudo scripts/install-system-deps.sh` (it installs kubectl and promtool from apt)"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not on PATH: {INSTALL_HINT}", pytrace=False)
    return path


@pytest.fixture(scope="module")
def kubectl() -> str:
    return _tool("kubectl")


@pytest.fixture(scope="module")
def promtool() -> str:
    return _tool("promtool")


@pytest.fixture(scope="module")
def rendered(kubectl: str) -> list[dict]:
    return validate.load_yaml_docs(validate.render_kustomize(validate.KUBERNETES, kubectl))


def _run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=60, check=False)


# ------------------------------------------------------------------------------------------- Docker
def test_dockerfile_and_dockerignore():
    assert validate.check_dockerfile() == []


def test_entrypoint_execs_the_command():
    # exec keeps the server as the container's main process, so SIGTERM reaches it.
    script = (ROOT / "deploy/docker/entrypoint.sh").read_text()
    assert 'exec "$@"' in script
    assert os.access(ROOT / "deploy/docker/entrypoint.sh", os.X_OK)


def test_entrypoint_enables_masks_only_when_the_file_exists(tmp_path):
    # The entrypoint's logic, run on the host with /models replaced by a temporary folder.
    script = (ROOT / "deploy/docker/entrypoint.sh").read_text().replace("/models/", f"{tmp_path}/")
    entry = tmp_path / "entrypoint.sh"
    entry.write_text(script)
    env = {k: v for k, v in os.environ.items() if k != "PALIGEMMA_MASK_DECODER"}
    show = ["sh", str(entry), "sh", "-c", 'echo "[${PALIGEMMA_MASK_DECODER:-}]"']
    assert subprocess.run(show, env=env, capture_output=True, text=True, check=True).stdout.strip() == "[]"
    (tmp_path / "vae-oid.npz").write_bytes(b"")
    out = subprocess.run(show, env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert out == f"[{tmp_path}/vae-oid.npz]"
    explicit = subprocess.run(show, env={**env, "PALIGEMMA_MASK_DECODER": "/elsewhere.npz"},
                              capture_output=True, text=True, check=True).stdout.strip()
    assert explicit == "[/elsewhere.npz]"


# ------------------------------------------------------------------------------------------ Compose
def test_compose_files():
    assert validate.check_compose() == []


def test_compose_cpu_override_drops_gpu_and_builds_cpu():
    cpu = validate.load_yaml(validate.COMPOSE_CPU)["services"]["paligemma"]
    assert isinstance(cpu["deploy"], validate.Reset)
    assert cpu["build"]["args"]["VARIANT"] == "cpu"


def test_compose_check_catches_a_short_stop_grace_period(tmp_path):
    text = validate.COMPOSE.read_text().replace("stop_grace_period: 45s", "stop_grace_period: 10s")
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(text)
    assert any("stop_grace_period" in p for p in validate.check_compose(broken))


# --------------------------------------------------------------------------------------- Prometheus
def test_prometheus_scrapes_the_compose_service():
    assert validate.check_prometheus_config() == []


def test_promtool_accepts_prometheus_config(promtool):
    result = _run(promtool, "check", "config", validate.PROMETHEUS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_accepts_kubernetes_scrape_example(promtool, tmp_path):
    # Debian's promtool lacks Kubernetes service discovery; the rest is checked with a static target.
    text, problems = validate.k8s_scrape_config_for_promtool()
    assert problems == []
    config = tmp_path / "prometheus.yml"
    config.write_text(text)
    result = _run(promtool, "check", "config", config)
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------------------------------------ Grafana
def test_dashboard_uses_exactly_the_server_metrics():
    assert validate.check_dashboard() == []


def test_dashboard_queries_are_valid_promql(promtool, tmp_path):
    rules = tmp_path / "rules.yml"
    rules.write_text(validate.promql_rules())
    result = _run(promtool, "check", "rules", rules)
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_provisioning_matches_compose_mounts():
    assert validate.check_grafana_provisioning() == []
    datasource = validate.load_yaml(validate.DATASOURCES)["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090"


def test_dashboard_check_catches_an_unknown_metric(tmp_path):
    dashboard = json.loads(validate.DASHBOARD.read_text())
    dashboard["panels"][1]["targets"][0]["expr"] = "sum(paligemma_request_total)"
    broken = tmp_path / "dashboard.json"
    broken.write_text(json.dumps(dashboard))
    assert any("unknown metric 'paligemma_request_total'" in p for p in validate.check_dashboard(broken))


def test_metric_contract_matches_the_server():
    # The names the dashboard and alerts rely on are the ones app/metrics.py exposes.
    from app.metrics import Metrics

    text = Metrics().render().decode()
    assert validate.check_exposition(text) == []


def test_metric_name_extraction_ignores_strings_and_labels():
    expr = 'sum by (endpoint) (rate(paligemma_requests_total{job="paligemma_x", status=~"5.."}[5m]))'
    assert validate.metric_names(expr) == {"paligemma_requests_total"}
    assert validate.label_names(expr) == {"endpoint", "job", "status"}


# --------------------------------------------------------------------------------------- Kubernetes
def test_kustomize_renders_the_base(rendered):
    kinds = sorted(doc["kind"] for doc in rendered)
    assert kinds == ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service"]


def test_kubernetes_base_is_consistent(rendered):
    assert validate.check_kubernetes(rendered) == []


def test_kubernetes_files_outside_the_base_agree_with_it(rendered):
    assert validate.check_kubernetes_extras(rendered) == []


def test_probes_and_grace_period(rendered):
    deployment = next(d for d in rendered if d["kind"] == "Deployment")
    config = next(d for d in rendered if d["kind"] == "ConfigMap")["data"]
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["ports"][0] == {"name": "http", "containerPort": 8000, "protocol": "TCP"}
    assert container["startupProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    assert pod["terminationGracePeriodSeconds"] > float(config["PALIGEMMA_DRAIN_TIMEOUT_S"])


def test_secret_example_is_not_rendered(rendered):
    assert "Secret" not in {doc["kind"] for doc in rendered}
    kustomization = validate.load_yaml(validate.KUBERNETES / "kustomization.yaml")
    assert "secret.example.yaml" not in kustomization["resources"]


def test_kubernetes_check_catches_a_short_grace_period(rendered):
    broken = copy.deepcopy(rendered)
    deployment = next(d for d in broken if d["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 30
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["path"] = "/readyz"
    problems = validate.check_kubernetes(broken)
    assert any("terminationGracePeriodSeconds" in p for p in problems)
    assert any("livenessProbe must GET /healthz" in p for p in problems)


def test_persistent_volumes_example_applies_on_the_base(kubectl, tmp_path):
    validate.write_example_overlay(tmp_path, kubectl)
    docs = validate.load_yaml_docs(validate.render_kustomize(tmp_path, kubectl))
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["hf-cache"] == {"name": "hf-cache",
                                   "persistentVolumeClaim": {"claimName": "paligemma-hf-cache"}}
    assert "emptyDir" not in volumes["models"]
    assert sorted(d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim") == [
        "paligemma-hf-cache", "paligemma-models"]
    assert validate.check_kubernetes([d for d in docs if d["kind"] != "PersistentVolumeClaim"]) == []


# ------------------------------------------------------------------------------------------- misc
def test_scripts_are_executable_and_parse():
    for script in ("deploy/check.sh", "scripts/install-system-deps.sh", "deploy/docker/entrypoint.sh"):
        path = ROOT / script
        assert os.access(path, os.X_OK), f"{script} is not executable"
        result = _run("bash", "-n", path)
        assert result.returncode == 0, result.stderr


def test_test_png_is_a_valid_image():
    png = validate.make_png(8, 4)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    image_module = pytest.importorskip("PIL.Image")
    import io

    image = image_module.open(io.BytesIO(png))
    image.load()
    assert image.size == (8, 4)
