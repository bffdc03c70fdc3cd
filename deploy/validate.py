"""Checks of the deployment files, shared by deploy/check.sh and tests/deployment/: the command line.

Syntax and schemas are checked by the field's tools (run here, from the project's virtualenv or PATH):
hadolint (Dockerfiles), shellcheck (scripts), Docker Compose and podman-compose (`config` renders the
Compose files), kubernetes-validate --strict (Kubernetes schemas), promtool (Prometheus configuration,
rules, alert unit tests). The project's own invariants, which no tool knows, live in deploy/checks/, one
module per format (its __init__ lists them): grace periods that cover the drain, liveness probes, the
server settings each file sets, what Prometheus scrapes and the job its alerts match, and the metric
contract between the server, the dashboard and the alerts. Nothing here touches the network except
`promql-smoke`, which talks to a Prometheus on loopback that deploy/check.sh started.

    python deploy/validate.py tools                  # every tool above on every deployment file
    python deploy/validate.py invariants             # the project's own rules (needs kubectl, docker compose)
    python deploy/validate.py promql-rules OUT       # dashboard queries as a rules file for promtool
    python deploy/validate.py exposition FILE        # a /metrics scrape of the running server
    python deploy/validate.py make-png OUT           # a small test image, without Pillow
    python deploy/validate.py png-size FILE          # WIDTHxHEIGHT of a PNG; exit 1 when it is not one
    python deploy/validate.py promql-smoke URL       # run the dashboard queries on a live Prometheus
    python deploy/validate.py drain-outcome DIR REQUESTS EXIT_CODE EXIT_SECONDS DRAIN_SECONDS
                                                     # what clients got from a stop under load
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # deploy.checks, and app/ for its contract
from deploy.checks import (
    compose,
    dashboard,
    dockerfile,
    kubernetes,
    kubernetes_extras,
    live,
    prometheus,
    tools,
)
from deploy.checks.files import (
    COMPOSE,
    COMPOSE_GPU,
    COMPOSE_LOCAL,
    K8S_EXAMPLES,
    KUBERNETES,
    load_yaml_docs,
)

COMPOSE_SETS = ([COMPOSE], [COMPOSE, COMPOSE_GPU], [COMPOSE, COMPOSE_LOCAL])


def tool_problems(kubectl: str = "kubectl") -> list[str]:
    """Every deployment file through the tool that knows its format."""
    problems = dockerfile.hadolint_problems() + tools.shellcheck_problems() + prometheus.promtool_problems()
    for files in COMPOSE_SETS:
        try:
            compose.compose_model(*files)
        except RuntimeError as exc:
            problems.append(str(exc))
        problems += compose.podman_compose_problems(*files)
    with tempfile.TemporaryDirectory() as tmp:
        rendered = Path(tmp) / "base.yaml"
        rendered.write_text(kubernetes.render_kustomize(KUBERNETES, kubectl))
        overlay = Path(tmp) / "overlay"
        kubernetes.write_example_overlay(overlay)
        (Path(tmp) / "overlay.yaml").write_text(kubernetes.render_kustomize(overlay, kubectl))
        problems += kubernetes.kubernetes_validate_problems([rendered, Path(tmp) / "overlay.yaml",
                                                             *K8S_EXAMPLES])
    return problems


def invariant_problems(kubectl: str = "kubectl") -> list[str]:
    """The project's own rules, on the files as the tools render them."""
    base, gpu, local = (compose.compose_model(*files) for files in COMPOSE_SETS)
    docs = load_yaml_docs(kubernetes.render_kustomize(KUBERNETES, kubectl))
    problems = dockerfile.check_dockerfile() + compose.check_compose(base, gpu, local)
    problems += dashboard.check_grafana_provisioning(base) + prometheus.check_prometheus_config(base)
    problems += dashboard.check_dashboard() + kubernetes.check_kubernetes(docs)
    return problems + kubernetes_extras.check_kubernetes_extras(docs)


def _report(problems: list[str], what: str) -> int:
    for problem in problems:
        print(f"  FAIL {problem}")
    print(f"  {'ok' if not problems else f'{len(problems)} problem(s)'}: {what}")
    return 1 if problems else 0


def main(argv: list[str]) -> int:
    command, args = (argv[0], argv[1:]) if argv else ("invariants", [])
    if command == "tools":
        return _report(tool_problems(), "hadolint, shellcheck, promtool, docker compose, podman-compose, "
                                        "kubernetes-validate --strict")
    if command == "invariants":
        return _report(invariant_problems(), "grace periods, probes, server settings, scraping, job names, "
                                             "metric contract")
    if command == "promql-rules":
        Path(args[0]).write_text(dashboard.promql_rules())
        return 0
    if command == "exposition":
        return _report(live.check_exposition(Path(args[0]).read_text()), "/metrics declares every metric")
    if command == "make-png":
        Path(args[0]).write_bytes(live.make_png())
        return 0
    if command == "png-size":
        size = live.png_size(Path(args[0]).read_bytes())
        print(f"{size[0]}x{size[1]}" if size else "not a PNG")
        return 0 if size else 1
    if command == "promql-smoke":
        return _report(prometheus.promql_smoke(args[0]), "dashboard queries on a live Prometheus")
    if command == "drain-outcome":
        directory, requests, exit_code, exit_s, drain_s = args
        summary, problems = live.drain_problems(live.read_answers(Path(directory)), int(requests),
                                                int(exit_code), float(exit_s), float(drain_s))
        print(summary)
        return _report(problems, "every request answered 200 or 503 shutting_down; exit 0 in time")
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
