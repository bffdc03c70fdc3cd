"""Checks of the deployment files, one module per format; deploy/validate.py is their command line.

Syntax and schemas are the field's tools' job (run through `tools`); what these modules add are the
project's own invariants, which no tool knows. Each `check_*` / `*_problems` function returns a list of
problems (empty when all is well), so that one run reports every mistake at once.

    files               where each deployment file lives, the YAML readers, duration and quantity units
    tools               finding and running a checker (virtualenv or PATH); shellcheck
    dockerfile          hadolint, and what the image promises (liveness HEALTHCHECK, the locked CUDA line)
    shutdown            the server's drain and liveness facts, and the grace-period and probe rules
    compose             Docker Compose / podman-compose rendering, and compose.yaml's invariants
    kubernetes          kustomize, kubernetes-validate, and the rendered base's invariants
    kubernetes_extras   files outside the base agree with it (adapter, ServiceMonitor, Ingress, policy)
    promql              the metric contract as Prometheus sees it, and the names an expression uses
    dashboard           the Grafana dashboard and its provisioning
    prometheus          promtool, the scrape configurations, the dashboard on a live Prometheus
    live                a running server: its /metrics, a test PNG, the answers of a drain under load
"""
