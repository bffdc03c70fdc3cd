"""The grace-period and liveness rules, and that their numbers come from the server itself."""

from __future__ import annotations

from app.__main__ import EXIT_GRACE_S
from deploy.checks import shutdown


def test_the_exit_margin_is_the_servers_exit_grace_plus_slack():
    assert shutdown.EXIT_MARGIN_S == EXIT_GRACE_S + shutdown.TEARDOWN_SLACK_S == 10


def test_grace_covers_pre_stop_drain_and_exit():
    assert shutdown.grace_problems("grace", 50, drain_s=30, pre_stop_s=10) == []
    [problem] = shutdown.grace_problems("grace", 49.5, drain_s=30, pre_stop_s=10)
    assert problem.startswith("grace (49.5) must be >= preStop sleep (10) + PALIGEMMA_DRAIN_TIMEOUT_S (30) + 10 s")
    [problem] = shutdown.grace_problems("stop_grace_period", 39, drain_s=30)
    assert problem.startswith("stop_grace_period (39) must be >= PALIGEMMA_DRAIN_TIMEOUT_S (30) + 10 s")


def test_liveness_rides_out_one_slow_answer():
    assert shutdown.liveness_problems(period_s=10, timeout_s=5, failures=3) == []
    assert shutdown.liveness_problems(period_s=10, timeout_s=10, failures=2) == []
    assert [p.split(":")[0] for p in shutdown.liveness_problems(period_s=5, timeout_s=6, failures=1)] == [
        "failureThreshold/retries is 1", "timeout (6 s) is longer than the period (5 s)"]


def test_a_stall_limit_longer_than_a_request_may_wait_is_refused():
    assert shutdown.stall_problems(60, 60) == []
    [problem] = shutdown.stall_problems(61, 60)
    assert "PALIGEMMA_LIVENESS_STALL_S (61) must be <= PALIGEMMA_REQUEST_TIMEOUT_S (60)" in problem
    assert shutdown.restart_after_s(60, 10, 3) == 90
