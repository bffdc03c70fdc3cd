"""The server's shutdown and liveness promises, from their one source (app/), and the rules that the
deployment files' grace periods and liveness probes follow.

After SIGTERM the server answers every admitted request until PALIGEMMA_DRAIN_TIMEOUT_S, gives whatever
is unfinished a 503 at that deadline, and exits within `EXIT_GRACE_S` (app/__main__.py) more. A grace
period must cover, in order: the preStop sleep (Kubernetes), the drain, that exit, and some slack for
the interpreter's and the GPU's teardown on a busy node.

/healthz fails (503) only when one model step has run longer than PALIGEMMA_LIVENESS_STALL_S, so a long
queue never restarts the server; the probe around it only has to ride out a lost or slow answer. Readiness
(/readyz) does not see a stall, so a stuck pod keeps getting traffic until liveness restarts it: the stall
limit must not be longer than a request may wait (PALIGEMMA_REQUEST_TIMEOUT_S).
"""

from __future__ import annotations

from app.__main__ import EXIT_GRACE_S

# Measured on the CPU image (deploy/check.sh --build, 2 cores): SIGTERM under overload to exit took the
# drain + 1.3 s. The rest is room for releasing a GPU and for a node under load.
TEARDOWN_SLACK_S = 7.0
EXIT_MARGIN_S = EXIT_GRACE_S + TEARDOWN_SLACK_S
# One failed probe (a GC pause, a node under load) must never restart a healthy server.
MIN_LIVENESS_FAILURES = 2


def grace_problems(where: str, grace_s: float, drain_s: float, pre_stop_s: float = 0.0) -> list[str]:
    """The grace period covers the preStop sleep + the drain + the exit margin."""
    need = pre_stop_s + drain_s + EXIT_MARGIN_S
    if grace_s >= need:
        return []
    pre_stop = f"preStop sleep ({pre_stop_s:g}) + " if pre_stop_s else ""
    return [f"{where} ({grace_s:g}) must be >= {pre_stop}PALIGEMMA_DRAIN_TIMEOUT_S ({drain_s:g}) + "
            f"{EXIT_MARGIN_S:g} s to exit ({EXIT_GRACE_S:g} s, app/__main__.py, + {TEARDOWN_SLACK_S:g} s of "
            "slack), or the kill lands on requests the server admitted"]


def liveness_problems(period_s: float, timeout_s: float, failures: int) -> list[str]:
    """A liveness check restarts only a server that keeps failing, never one slow answer."""
    problems = []
    if failures < MIN_LIVENESS_FAILURES:
        problems.append(f"failureThreshold/retries is {failures}: at least {MIN_LIVENESS_FAILURES}, so "
                        "that one slow answer does not restart the server (/healthz already waits for "
                        "PALIGEMMA_LIVENESS_STALL_S)")
    if timeout_s > period_s:
        problems.append(f"timeout ({timeout_s:g} s) is longer than the period ({period_s:g} s)")
    return problems


def stall_problems(stall_s: float, request_timeout_s: float) -> list[str]:
    """A step is called stuck no later than the point where every request in it has timed out."""
    if stall_s <= request_timeout_s:
        return []
    return [f"PALIGEMMA_LIVENESS_STALL_S ({stall_s:g}) must be <= PALIGEMMA_REQUEST_TIMEOUT_S "
            f"({request_timeout_s:g}): a step that outlasts what a request may wait has already failed every "
            "request in it, and the pod stays ready (and gets traffic) until liveness restarts it"]


def restart_after_s(stall_s: float, period_s: float, failures: int) -> float:
    """The longest a stuck worker goes unrestarted: the stall limit, then `failures` failed probes."""
    return stall_s + period_s * failures
