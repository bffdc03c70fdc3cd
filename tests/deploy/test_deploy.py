"""The deployment files, checked by the field's tools and against the project's own invariants.

The tools (hadolint, shellcheck, Docker Compose, podman-compose, kubernetes-validate, promtool, kubectl)
are required, not optional: a missing one fails with the command that installs it, so that CI never
passes by silently checking less. The checks live in deploy/validate.py, which deploy/check.sh runs too
(plus an image build and a Compose run with --build / --compose).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.served import free_port

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("deploy_validate", ROOT / "deploy" / "validate.py")
assert _spec and _spec.loader
validate = importlib.util.module_from_spec(_spec)
sys.modules["deploy_validate"] = validate
_spec.loader.exec_module(validate)

INSTALL_HINT = "run `sudo scripts/install-system-deps.sh` (kubectl, promtool, prometheus, podman from apt)"


def _tool(name: str) -> str:
    path = validate.tool(name)
    if path is None:
        pytest.fail(f"{name} is not installed: {INSTALL_HINT}, or `make install` for the Python ones",
                    pytrace=False)
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


@pytest.fixture(scope="module")
def compose() -> dict[str, dict]:
    _tool("docker-compose")
    return {"base": validate.compose_model(validate.COMPOSE),
            "gpu": validate.compose_model(validate.COMPOSE, validate.COMPOSE_GPU),
            "local": validate.compose_model(validate.COMPOSE, validate.COMPOSE_LOCAL)}


def _run(*args: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120, check=False,
                          cwd=cwd)


# ----------------------------------------------------------------------------------- locked builds
def test_locks_match_pyproject():
    result = _run(sys.executable, "scripts/lock.py", "check")
    assert result.returncode == 0, result.stderr


def test_lock_check_names_a_dependency_added_without_make_lock(tmp_path):
    # A copy of the inputs, as after a merge that added a dependency but not the lock.
    for part in ("pyproject.toml", "requirements", "scripts/lock.py"):
        source, target = ROOT / part, tmp_path / part
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copy)(source, target)
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('    "pytest>=8",', '    "pytest>=8",\n    "openai>=1.0",'))
    result = _run(sys.executable, tmp_path / "scripts/lock.py", "check")
    assert result.returncode == 1
    assert "new in pyproject.toml / torch.in:  extra dev: openai>=1.0" in result.stderr
    assert "Run `make lock`" in result.stderr


def test_every_lock_is_hash_checked_and_torch_builds_are_the_pinned_release():
    version = next(line.split("==")[1] for line in (ROOT / "requirements/torch.in").read_text().splitlines()
                   if line.startswith("torch=="))
    for lock in sorted((ROOT / "requirements").glob("*.lock")):
        pins = [line for line in lock.read_text().splitlines() if line and not line[0].isspace()
                and not line.startswith("#")]
        assert pins, lock
        assert all("==" in pin and pin.endswith("\\") for pin in pins), f"{lock.name}: a pin without hashes"
    assert "torch==" + version + "+cpu \\" in (ROOT / "requirements/torch-cpu.lock").read_text()
    cuda = (ROOT / f"requirements/torch-{validate.dockerfile_args()['TORCH_CUDA']}.lock").read_text()
    assert f"torch=={version} \\" in cuda and "needs an NVIDIA driver >= " in cuda


# ------------------------------------------------------------------------------------------- tools
def test_hadolint_passes_the_dockerfiles():
    _tool("hadolint")
    assert validate.hadolint_problems() == []


def test_hadolint_catches_a_root_image(tmp_path):
    # The tool is really looking: a Dockerfile that ends as root is refused.
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text(validate.DOCKERFILE.read_text().replace("USER 10001:10001", "USER root"))
    code, out = validate.run([_tool("hadolint"), "--config", ROOT / ".hadolint.yaml", dockerfile])
    assert code != 0 and "DL3002" in out


def test_shellcheck_passes_the_scripts():
    _tool("shellcheck")
    assert validate.shellcheck_problems() == []


def test_promtool_checks_configs_rules_and_alert_unit_tests(promtool):
    assert validate.promtool_problems(promtool) == []


def test_compose_renders_with_podman_compose():
    _tool("podman")
    for files in ([validate.COMPOSE], [validate.COMPOSE, validate.COMPOSE_GPU],
                  [validate.COMPOSE, validate.COMPOSE_LOCAL]):
        assert validate.podman_compose_problems(*files) == []


def test_kubernetes_schemas_strict(kubectl, tmp_path):
    _tool("kubernetes-validate")
    base = tmp_path / "base.yaml"
    base.write_text(validate.render_kustomize(validate.KUBERNETES, kubectl))
    assert validate.kubernetes_validate_problems([base, *validate.K8S_EXAMPLES]) == []
    broken = tmp_path / "broken.yaml"
    broken.write_text(base.read_text().replace("automountServiceAccountToken", "automountServiceAcountToken"))
    assert any("automountServiceAcountToken" in p for p in validate.kubernetes_validate_problems([broken]))


def test_persistent_volumes_example_applies_on_the_base(kubectl, tmp_path):
    validate.write_example_overlay(tmp_path / "overlay")
    docs = validate.load_yaml_docs(validate.render_kustomize(tmp_path / "overlay", kubectl))
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert volumes["hf-cache"] == {"name": "hf-cache",
                                   "persistentVolumeClaim": {"claimName": "paligemma-hf-cache"}}
    assert sorted(d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim") == [
        "paligemma-hf-cache", "paligemma-models"]
    (tmp_path / "overlay.yaml").write_text(yaml.safe_dump_all(docs))
    assert validate.kubernetes_validate_problems([tmp_path / "overlay.yaml"]) == []


# ---------------------------------------------------------------------- invariants: Docker, Compose
def test_dockerfile_liveness_and_gpu_line():
    assert validate.check_dockerfile() == []


def test_compose_invariants(compose):
    assert validate.check_compose(compose["base"], compose["gpu"], compose["local"]) == []
    assert validate.check_grafana_provisioning(compose["base"]) == []


def test_compose_binds_to_loopback_unless_told_otherwise(compose):
    [port] = compose["base"]["services"]["paligemma"]["ports"]
    assert (port["host_ip"], port["target"]) == ("127.0.0.1", 8000)
    exposed = validate.compose_model(validate.COMPOSE, env={"PALIGEMMA_PUBLISH": "0.0.0.0"})
    assert exposed["services"]["paligemma"]["ports"][0]["host_ip"] == "0.0.0.0"
    problems = validate.check_compose(exposed, compose["gpu"], compose["local"])
    assert problems == ["compose: paligemma publishes 8000 on 0.0.0.0 unless told otherwise"]


def test_compose_check_catches_a_short_stop_grace_period(compose):
    broken = copy.deepcopy(compose["base"])
    broken["services"]["paligemma"]["stop_grace_period"] = "35s"
    [problem] = validate.check_compose(broken, compose["gpu"], compose["local"])
    assert "stop_grace_period (35 s) must be >= PALIGEMMA_DRAIN_TIMEOUT_S (30 s) + 10 s" in problem


def test_compose_gpu_file_asks_for_a_gpu_and_the_locked_cuda_line(compose):
    server = compose["gpu"]["services"]["paligemma"]
    assert server["build"]["args"]["VARIANT"] == "gpu"
    assert (ROOT / f"requirements/torch-{server['build']['args']['TORCH_CUDA']}.lock").is_file()
    assert server["environment"]["PALIGEMMA_DEVICE"] == "cuda"


def test_prometheus_scrapes_the_compose_service_as_the_alerts_job(compose):
    assert validate.check_prometheus_config(compose["base"]) == []


def test_entrypoint_execs_the_command():
    # exec keeps the server as the container's main process, so SIGTERM reaches it.
    script = (ROOT / "docker/entrypoint.sh").read_text()
    assert 'exec "$@"' in script
    assert os.access(ROOT / "docker/entrypoint.sh", os.X_OK)


def test_entrypoint_enables_masks_only_when_the_file_exists(tmp_path):
    # The entrypoint's logic, run on the host with /models replaced by a temporary folder.
    script = (ROOT / "docker/entrypoint.sh").read_text().replace("/models/", f"{tmp_path}/")
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



# ------------------------------------------------------------------------ invariants: metric contract
def test_dashboard_uses_exactly_the_server_metrics():
    assert validate.check_dashboard() == []


def test_dashboard_queries_are_valid_promql(promtool, tmp_path):
    rules = tmp_path / "rules.yml"
    rules.write_text(validate.promql_rules())
    result = _run(promtool, "check", "rules", rules)
    assert result.returncode == 0, result.stdout + result.stderr


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


def test_the_standard_process_series_are_checked_beside_the_contract(tmp_path):
    from app.metrics import Metrics

    assert "process_resident_memory_bytes" in validate.STANDARD and "python_info" in validate.STANDARD
    text = Metrics().render().decode()
    without = "\n".join(line for line in text.splitlines() if "process_resident_memory_bytes" not in line)
    assert validate.check_exposition(without) == ["/metrics does not declare process_resident_memory_bytes"]
    # Queries may use them; a misspelt one is caught like a misspelt paligemma_* one.
    assert validate.check_expressions([("q", "rate(process_cpu_seconds_total[1m]) + on(instance) python_info")]) == []
    dashboard = json.loads(validate.DASHBOARD.read_text())
    panel = next(p for p in dashboard["panels"] if p["title"] == "Resident memory")
    panel["targets"][0]["expr"] = "process_resident_memory_byte"
    broken = tmp_path / "dashboard.json"
    broken.write_text(json.dumps(dashboard))
    assert any("unknown metric 'process_resident_memory_byte'" in p for p in validate.check_dashboard(broken))


def test_metric_name_extraction_ignores_strings_and_labels():
    expr = 'sum by (endpoint) (rate(paligemma_requests_total{job="paligemma_x", status=~"5.."}[5m]))'
    assert validate.metric_names(expr) == {"paligemma_requests_total"}
    assert validate.label_names(expr) == {"endpoint", "job", "status"}



# ------------------------------------------------------------------------------ alerts per scrape set-up
def _prometheus_up_labels(tmp_path: Path, config_text: str) -> dict[str, str]:
    """Run a real Prometheus on `config_text` and return the labels of the `up` series it makes."""
    config = tmp_path / "prometheus.yml"
    config.write_text(config_text)
    port = free_port()
    log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - closed in finally
    process = subprocess.Popen([_tool("prometheus"), f"--config.file={config}",
                                f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                               stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                result = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": "up"}, timeout=5)
                series = result.json()["data"]["result"]
                if series:
                    return series[0]["metric"]
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise AssertionError((tmp_path / "prometheus.log").read_text())
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def _alert_fires_for(promtool: str, tmp_path: Path, labels: dict[str, str]) -> tuple[int, str]:
    """promtool: does PaligemmaDown fire for a target with these labels that stops answering?"""
    selector = ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()) if k != "__name__")
    test = {"rule_files": [str(validate.ALERTS)], "evaluation_interval": "1m", "tests": [{
        "interval": "1m", "input_series": [{"series": f"up{{{selector}}}", "values": "0x6"}],
        "alert_rule_test": [{"eval_time": "5m", "alertname": "PaligemmaDown", "exp_alerts": [{
            "exp_labels": {**{k: v for k, v in labels.items() if k != "__name__"}, "severity": "critical"},
            "exp_annotations": {"summary": f"PaliGemma server {labels['instance']} cannot be scraped"}}]}]}]}
    path = tmp_path / "down.test.yml"
    path.write_text(yaml.safe_dump(test))
    code, out = validate.run([promtool, "test", "rules", path])
    return code, out


def test_down_alert_fires_under_the_kubernetes_scrape_example(promtool, rendered, tmp_path):
    # What kubernetes_sd would attach to the Deployment's pod, from the rendered manifests; a real
    # Prometheus applies the example's relabelling to it (the target, on loopback, is down).
    pod = next(d for d in rendered if d["kind"] == "Deployment")["spec"]["template"]["metadata"]
    meta = {"__meta_kubernetes_namespace": "paligemma", "__meta_kubernetes_pod_name": "paligemma-server-0"}
    meta |= {"__meta_kubernetes_pod_annotation_" + k.replace(".", "_").replace("/", "_"): v
             for k, v in pod["annotations"].items()}
    meta |= {"__meta_kubernetes_pod_label_" + k.replace(".", "_").replace("/", "_"): v
             for k, v in pod["labels"].items()}
    text, problems = validate.k8s_scrape_config_for_promtool(target="127.0.0.2:1", meta=meta)
    assert problems == []
    labels = _prometheus_up_labels(tmp_path, text.replace("scrape_interval: 15s", "scrape_interval: 1s"))
    assert labels["job"] == validate.JOB and labels["instance"] == "127.0.0.2:8000"
    code, out = _alert_fires_for(promtool, tmp_path, labels)
    assert code == 0, out


def test_down_alert_fires_under_the_servicemonitor_and_compose(promtool, rendered, tmp_path):
    service = next(d for d in rendered if d["kind"] == "Service")
    monitor = validate.load_yaml(validate.SERVICE_MONITOR)
    job = validate.servicemonitor_job(monitor, service)
    code, out = _alert_fires_for(promtool, tmp_path, {"job": job, "instance": "10.0.0.7:8000",
                                                      "namespace": "paligemma", "pod": "paligemma-server-0"})
    assert code == 0, out
    compose_job = validate.load_yaml(validate.PROMETHEUS)["scrape_configs"][0]["job_name"]
    code, out = _alert_fires_for(promtool, tmp_path, {"job": compose_job, "instance": "paligemma:8000"})
    assert code == 0, out
    code, out = _alert_fires_for(promtool, tmp_path, {"job": "paligemma", "instance": "paligemma:8000"})
    assert code != 0, "a job the alerts do not match must not pass"


# ----------------------------------------------------------------------------- invariants: Kubernetes
def test_kubernetes_base_is_consistent(rendered):
    assert validate.check_kubernetes(rendered) == []


def test_kubernetes_files_outside_the_base_agree_with_it(rendered):
    assert validate.check_kubernetes_extras(rendered) == []


def test_probes_grace_period_and_pod_settings(rendered):
    deployment = next(d for d in rendered if d["kind"] == "Deployment")
    config = next(d for d in rendered if d["kind"] == "ConfigMap")["data"]
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["startupProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    drain = float(config["PALIGEMMA_DRAIN_TIMEOUT_S"])
    assert pod["terminationGracePeriodSeconds"] >= (validate.pre_stop_seconds(container) + drain
                                                    + validate.EXIT_MARGIN_S)
    assert pod["automountServiceAccountToken"] is False
    assert container["resources"]["requests"]["ephemeral-storage"] == "42Gi"


def test_kubernetes_check_catches_broken_invariants(rendered):
    broken = copy.deepcopy(rendered)
    pod = next(d for d in broken if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    pod["terminationGracePeriodSeconds"] = 45
    pod["containers"][0]["livenessProbe"]["httpGet"]["path"] = "/readyz"
    pod["containers"][0]["resources"]["requests"]["ephemeral-storage"] = "1Gi"
    del pod["automountServiceAccountToken"]
    problems = validate.check_kubernetes(broken)
    assert any("terminationGracePeriodSeconds (45) must be >= preStop sleep (10) + " in p for p in problems)
    assert any("livenessProbe must GET /healthz" in p for p in problems)
    assert any("ephemeral-storage (1 Gi) is below" in p for p in problems)
    assert any("automountServiceAccountToken must be false" in p for p in problems)


def test_secret_example_is_not_rendered(rendered):
    assert "Secret" not in {doc["kind"] for doc in rendered}
    kustomization = validate.load_yaml(validate.KUBERNETES / "kustomization.yaml")
    assert "secret.example.yaml" not in kustomization["resources"]


# -------------------------------------------------------------------------------------------- misc
def test_scripts_are_executable():
    for script in validate.SHELL_SCRIPTS:
        assert os.access(script, os.X_OK), f"{script} is not executable"


def test_test_png_is_a_valid_image():
    png = validate.make_png(8, 4)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    image_module = pytest.importorskip("PIL.Image")
    import io

    image = image_module.open(io.BytesIO(png))
    image.load()
    assert image.size == (8, 4)
