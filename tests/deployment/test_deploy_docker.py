"""docker/: the Dockerfile's promises, the entrypoint, and Compose's invariants."""

from __future__ import annotations

import copy
import os
import subprocess

from deploy.checks import compose as compose_checks
from deploy.checks import dockerfile
from deploy.checks.files import COMPOSE, DOCKERFILE, ENTRYPOINT, REQUIREMENTS


def test_dockerfile_liveness_gpu_line_and_extras():
    assert dockerfile.check_dockerfile() == []


def test_healthcheck_timings_are_read_and_held_to_the_liveness_rule(tmp_path):
    [(_, arguments)] = [i for i in dockerfile.dockerfile_instructions() if i[0] == "HEALTHCHECK"]
    assert dockerfile.healthcheck_options(arguments) == {"interval": 30.0, "timeout": 5.0, "start-period": 30.0,
                                                         "retries": 3.0}
    broken = tmp_path / "Dockerfile"
    broken.write_text(DOCKERFILE.read_text().replace("--retries=3", "--retries=1")
                      .replace("--timeout=5s", "--timeout=1m"))
    problems = dockerfile.check_dockerfile(broken)
    assert any("HEALTHCHECK failureThreshold/retries is 1: at least 2" in p for p in problems), problems
    assert any("HEALTHCHECK timeout (60 s) is longer than the period (30 s)" in p for p in problems), problems


def test_the_image_includes_the_render_and_quantization_extras_by_default_from_their_locks(tmp_path):
    assert dockerfile.dockerfile_args()["EXTRAS"] == "render,quantization"
    assert (REQUIREMENTS / "render.lock").is_file() and (REQUIREMENTS / "quantization.lock").is_file()
    broken = tmp_path / "Dockerfile"
    broken.write_text(DOCKERFILE.read_text().replace("ARG EXTRAS=render,quantization",
                                                     "ARG EXTRAS=render,quantization,otel"))
    assert dockerfile.check_dockerfile(broken) == [
        "docker/Dockerfile: EXTRAS defaults to otel, which has no requirements/otel.lock (scripts/lock.py)"]


def test_compose_invariants(compose):
    from deploy.checks.dashboard import check_grafana_provisioning

    assert compose_checks.check_compose(compose["base"], compose["gpu"], compose["local"]) == []
    assert check_grafana_provisioning(compose["base"]) == []


def test_compose_binds_to_loopback_unless_told_otherwise(compose):
    [port] = compose["base"]["services"]["paligemma"]["ports"]
    assert (port["host_ip"], port["target"]) == ("127.0.0.1", 8000)
    exposed = compose_checks.compose_model(COMPOSE, env={"PALIGEMMA_PUBLISH": "0.0.0.0"})
    assert exposed["services"]["paligemma"]["ports"][0]["host_ip"] == "0.0.0.0"
    problems = compose_checks.check_compose(exposed, compose["gpu"], compose["local"])
    assert problems == ["compose: paligemma publishes 8000 on 0.0.0.0 unless told otherwise"]


def test_compose_check_catches_a_short_stop_grace_period(compose):
    broken = copy.deepcopy(compose["base"])
    broken["services"]["paligemma"]["stop_grace_period"] = "35s"
    [problem] = compose_checks.check_compose(broken, compose["gpu"], compose["local"])
    assert problem.startswith("compose.yaml: stop_grace_period (35) must be >= PALIGEMMA_DRAIN_TIMEOUT_S (30) + "
                              "10 s to exit (3 s, app/__main__.py, + 7 s of slack)")


def test_compose_grace_follows_the_drain_the_file_sets(compose):
    # The drain comes from the service's environment, read as the server reads it.
    longer = copy.deepcopy(compose["gpu"])
    longer["services"]["paligemma"]["environment"]["PALIGEMMA_DRAIN_TIMEOUT_S"] = "40"
    [problem] = compose_checks.check_compose(compose["base"], longer, compose["local"])
    assert "docker/compose.gpu.yaml: stop_grace_period (45) must be >= PALIGEMMA_DRAIN_TIMEOUT_S (40)" in problem


def test_compose_environment_is_read_by_the_server_settings(compose):
    broken = copy.deepcopy(compose["base"])
    env = broken["services"]["paligemma"]["environment"]
    env |= {"PALIGEMMA_MAX_BATCH_WAIT_MS": "5", "PALIGEMMA_MAX_BATCHSIZE": "4", "PALIGEMMA_MAX_QUEUE": "0"}
    problems = compose_checks.check_compose(broken, compose["gpu"], compose["local"])
    assert any("PALIGEMMA_MAX_BATCH_WAIT_MS is no longer read by the server" in p for p in problems), problems
    assert any("PALIGEMMA_MAX_BATCHSIZE is not a setting of the server" in p for p in problems), problems
    assert any("the server would refuse to start" in p and "PALIGEMMA_MAX_QUEUE" in p for p in problems), problems


def test_compose_gpu_file_asks_for_a_gpu_and_the_locked_cuda_line(compose):
    server = compose["gpu"]["services"]["paligemma"]
    assert server["build"]["args"]["VARIANT"] == "gpu"
    assert (REQUIREMENTS / f"torch-{server['build']['args']['TORCH_CUDA']}.lock").is_file()
    assert server["environment"]["PALIGEMMA_DEVICE"] == "cuda"


def test_entrypoint_execs_the_command():
    # exec keeps the server as the container's main process, so SIGTERM reaches it.
    assert 'exec "$@"' in ENTRYPOINT.read_text()
    assert os.access(ENTRYPOINT, os.X_OK)


def test_entrypoint_enables_masks_only_when_the_file_exists(tmp_path):
    # The entrypoint's logic, run on the host with /models replaced by a temporary folder.
    entry = tmp_path / "entrypoint.sh"
    entry.write_text(ENTRYPOINT.read_text().replace("/models/", f"{tmp_path}/"))
    env = {k: v for k, v in os.environ.items() if k != "PALIGEMMA_MASK_DECODER"}
    show = ["sh", str(entry), "sh", "-c", 'echo "[${PALIGEMMA_MASK_DECODER:-}]"']
    assert subprocess.run(show, env=env, capture_output=True, text=True, check=True).stdout.strip() == "[]"
    (tmp_path / "vae-oid.npz").write_bytes(b"")
    out = subprocess.run(show, env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert out == f"[{tmp_path}/vae-oid.npz]"
    explicit = subprocess.run(show, env={**env, "PALIGEMMA_MASK_DECODER": "/elsewhere.npz"},
                              capture_output=True, text=True, check=True).stdout.strip()
    assert explicit == "[/elsewhere.npz]"
