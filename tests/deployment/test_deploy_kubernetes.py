"""deploy/kubernetes: the rendered base's invariants and the files outside it."""

from __future__ import annotations

import copy

from deploy.checks import kubernetes, shutdown
from deploy.checks.files import KUBERNETES, load_yaml
from deploy.checks.kubernetes_extras import check_kubernetes_extras


def _parts(docs: list[dict]) -> tuple[dict, dict, dict]:
    """(pod spec, container, ConfigMap data) of rendered manifests."""
    pod = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    return pod, pod["containers"][0], config


def test_kubernetes_base_is_consistent(rendered):
    assert kubernetes.check_kubernetes(rendered) == []


def test_kubernetes_files_outside_the_base_agree_with_it(rendered):
    assert check_kubernetes_extras(rendered) == []


def test_probes_grace_period_and_pod_settings(rendered):
    pod, container, config = _parts(rendered)
    assert container["startupProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    drain = float(config["PALIGEMMA_DRAIN_TIMEOUT_S"])
    assert pod["terminationGracePeriodSeconds"] >= (kubernetes.pre_stop_seconds(container) + drain
                                                    + shutdown.EXIT_MARGIN_S)
    assert pod["automountServiceAccountToken"] is False
    assert container["resources"]["requests"]["ephemeral-storage"] == "42Gi"


def test_a_hung_pod_is_restarted_before_long(rendered):
    # The stall limit the ConfigMap sets, then three failed probes 10 s apart.
    _, container, config = _parts(rendered)
    liveness = container["livenessProbe"]
    stall = float(config["PALIGEMMA_LIVENESS_STALL_S"])
    assert stall <= float(config["PALIGEMMA_REQUEST_TIMEOUT_S"])
    assert shutdown.restart_after_s(stall, liveness["periodSeconds"], liveness["failureThreshold"]) == 90


def test_kubernetes_check_catches_broken_invariants(rendered):
    broken = copy.deepcopy(rendered)
    pod, container, _ = _parts(broken)
    pod["terminationGracePeriodSeconds"] = 45
    container["livenessProbe"]["httpGet"]["path"] = "/readyz"
    container["resources"]["requests"]["ephemeral-storage"] = "1Gi"
    del pod["automountServiceAccountToken"]
    problems = kubernetes.check_kubernetes(broken)
    assert any("terminationGracePeriodSeconds (45) must be >= preStop sleep (10) + " in p for p in problems)
    assert any("livenessProbe must GET /healthz" in p for p in problems)
    assert any("ephemeral-storage (1 Gi) is below" in p for p in problems)
    assert any("automountServiceAccountToken must be false" in p for p in problems)


def test_the_grace_period_follows_the_configmap_drain(rendered):
    # 60 s covers preStop 10 + drain 30 + 10; raising the drain in the ConfigMap alone breaks it.
    broken = copy.deepcopy(rendered)
    _, _, config = _parts(broken)
    config["PALIGEMMA_DRAIN_TIMEOUT_S"] = "45"
    [problem] = kubernetes.check_kubernetes(broken)
    assert problem.startswith("terminationGracePeriodSeconds (60) must be >= preStop sleep (10) + "
                              "PALIGEMMA_DRAIN_TIMEOUT_S (45) + 10 s to exit")


def test_the_liveness_probe_and_stall_limit_are_checked(rendered):
    broken = copy.deepcopy(rendered)
    _, container, config = _parts(broken)
    container["livenessProbe"]["failureThreshold"] = 1
    config["PALIGEMMA_LIVENESS_STALL_S"] = "90"
    problems = kubernetes.check_kubernetes(broken)
    assert any(p.startswith("livenessProbe: failureThreshold/retries is 1") for p in problems), problems
    assert any(p.startswith("PALIGEMMA_LIVENESS_STALL_S (90) must be <= PALIGEMMA_REQUEST_TIMEOUT_S (60)")
               for p in problems), problems
    # Without the ConfigMap's value, the server's default (120 s) is what the pod would run with.
    del config["PALIGEMMA_LIVENESS_STALL_S"]
    assert any(p.startswith("PALIGEMMA_LIVENESS_STALL_S (120)") for p in kubernetes.check_kubernetes(broken))


def test_the_configmap_is_read_by_the_server_settings(rendered):
    broken = copy.deepcopy(rendered)
    _, _, config = _parts(broken)
    config |= {"PALIGEMMA_MAX_BATCH_WAIT_MS": "5", "PALIGEMMA_DTYPE": "fp8"}
    problems = kubernetes.check_kubernetes(broken)
    assert any(p.startswith("ConfigMap: PALIGEMMA_MAX_BATCH_WAIT_MS is no longer read") for p in problems)
    assert any("the server would refuse to start" in p and "PALIGEMMA_DTYPE" in p for p in problems), problems


def test_secret_example_is_not_rendered(rendered):
    assert "Secret" not in {doc["kind"] for doc in rendered}
    assert "secret.example.yaml" not in load_yaml(KUBERNETES / "kustomization.yaml")["resources"]
