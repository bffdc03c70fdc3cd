"""The engine's own cost per step, with a model that costs nothing: what the GPU would wait on Python for.

    python -m benchmarks.step_overhead [--rows 32] [--steps 5000] [--results benchmarks/RESULTS.md]

The server's worker core (`EngineCore.step_once`: plan, decode, record, post) and scheduler, observed by
the server's own `Metrics`, over a runner that returns its tokens at once. Three loads on 32 rows:
- steady: every row decoding, nobody finishing (long requests);
- churn: requests of 8 tokens, so about 4 rows finish and 4 newcomers are admitted each step;
- streamed: steady, every request streamed (each step posts every row's token to the event loop).
Each is timed as the mean over many steps, the three in turn, several rounds; the median round is shown.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from datetime import datetime, timezone
from typing import Any

from benchmarks import report

TARGET_MS = 0.3  # the issue's: per step at 32 rows


class InstantRunner:
    """A `StepRunner` whose model takes no time: token 7 for everyone (never a stop token)."""

    feature_cache_hits = 0

    def __init__(self, rows: int):
        self.rows = rows

    def prefill(self, seqs: list[Any]) -> list[int]:
        return [7] * len(seqs)

    def decode(self, seqs: list[Any], width: int) -> list[int]:
        return [7] * len(seqs)

    def decode_alone(self, seq: Any) -> int:
        return 7

    def release(self, seq: Any) -> None:
        pass

    def recover_memory(self) -> None:
        pass


def measure(load: str, rows: int, steps: int) -> float:
    """Mean ms per step over `steps` steps of `load`, the rows kept full."""
    from app.engine.core import EngineCore
    from app.engine.scheduler import Scheduler, Sequence
    from app.metrics import Metrics

    scheduler = Scheduler(rows, prefill_token_budget=1_000_000)
    posted: list[object] = []
    core = EngineCore(scheduler, InstantRunner(rows), posted.append, Metrics(), lambda exc: False,
                      lambda exc: False)
    length = 8 if load == "churn" else 10**9

    def fill() -> None:
        for _ in range(rows - len(scheduler.running) - len(scheduler.waiting)):
            core.submit(Sequence(300, length, frozenset({1}), None, "/v1/caption", time.monotonic(),
                                 streams=load == "streamed"))

    fill()
    core.step_once()
    started = time.perf_counter()
    for _ in range(steps):
        if load == "churn":
            fill()
        core.step_once()
        posted.clear()
    return (time.perf_counter() - started) / steps * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    report.add_section_arguments(parser, "step_overhead", quiet_wait_s=60.0)
    args = parser.parse_args()
    report.wait_if_asked(args)
    from benchmarks.procs import CpuMeter

    meter = CpuMeter()
    loads = ("steady", "churn", "streamed")
    times: dict[str, list[float]] = {load: [] for load in loads}
    for _ in range(args.rounds):
        for load in loads:
            times[load].append(measure(load, args.rows, args.steps))
    cpu = meter.stop()
    result = {load: statistics.median(values) for load, values in times.items()}
    for load, ms in result.items():
        print(f"[step_overhead] {load}: {ms:.3f} ms per step at {args.rows} rows", flush=True)
    report.save_raw("step_overhead", {"rows": args.rows, "steps": args.steps, "cpu": cpu, "rounds": times,
                                      "median": result})
    lines = [
        "## The engine's own cost per step (`python -m benchmarks.step_overhead`)",
        "",
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}: the worker core, scheduler and `Metrics` "
        f"observer over a runner that returns at once, {args.rows} rows, mean over {args.steps} steps, "
        f"median of {args.rounds} rounds. Other processes took {cpu['other_cores']:.2f} of the 2 cores "
        f"(load average {os.getloadavg()[0]:.1f} at the end).",
        "",
        "| load | ms per step | target | verdict |",
        "|---|---|---|---|",
    ]
    what = {"steady": "steady: 32 rows decoding", "churn": "churn: ~4 finish and ~4 join each step",
            "streamed": "streamed: every row's token posted each step"}
    for load, ms in result.items():
        verdict = "**met**" if report.check(ms, TARGET_MS, at_most=True)["met"] else "**not met**"
        lines.append(f"| {what[load]} | {ms:.3f} | <= {TARGET_MS} | {verdict} |")
    report.publish(args, "step_overhead", "\n".join(lines))


if __name__ == "__main__":
    main()
