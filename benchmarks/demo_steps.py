"""Demo training's cost per step, by the attention it trains with: what a 90-minute run is spent on.

    python -m benchmarks.demo_steps [--tower-steps 200] [--whole-steps 60] [--rounds 2]
                                    [--attention sdpa eager] [--results benchmarks/RESULTS.md]

`app.demo.train.train_model` as `python -m app.demo.train` runs it (the recipe's `TrainConfig`, one torch
thread, its batches drawn ahead in a second process), cut to a few steps: the vision tower's phase alone
(`--tower-steps`, no whole-model steps), then the whole model's alone (`--whole-steps`, no tower phase).
A cell is the wall time of the call over its steps, so the model's build and the batch worker's start
(about a second) are in it. The attentions take turns, round after round, so that a machine whose speed
drifts (this one's moves by up to a fifth from hour to hour) treats them alike; the median round is shown.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from datetime import datetime, timezone

from benchmarks import report


def seconds_per_step(attention: str, tower_steps: int, whole_steps: int) -> float:
    """Wall seconds per step of one phase of the recipe, cut short (the other phase's steps 0)."""
    import torch

    from app.demo import MASK_DECODER_FILE, WEIGHTS_DIR
    from app.demo.mask_vqvae import MaskTokenizer
    from app.demo.train import TrainConfig, train_model

    config = TrainConfig(vision_steps=tower_steps, steps=whole_steps, warmup=min(10, whole_steps),
                         eval_every=0, attention=attention)
    torch.set_num_threads(config.threads)
    started = time.perf_counter()
    train_model(config, MaskTokenizer(WEIGHTS_DIR / MASK_DECODER_FILE))
    return (time.perf_counter() - started) / max(tower_steps, whole_steps)


def main() -> None:
    from app.demo.train import ATTENTIONS, TrainConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tower-steps", type=int, default=200)
    parser.add_argument("--whole-steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--attention", nargs="+", default=list(ATTENTIONS), choices=ATTENTIONS)
    report.add_section_arguments(parser, "demo_steps", quiet_wait_s=60.0)
    args = parser.parse_args()
    report.wait_if_asked(args)
    from benchmarks.procs import CpuMeter

    meter = CpuMeter()
    phases = {"tower": (args.tower_steps, 0), "whole": (0, args.whole_steps)}
    times: dict[str, dict[str, list[float]]] = {a: {p: [] for p in phases} for a in args.attention}
    for _ in range(args.rounds):
        for phase, (tower, whole) in phases.items():
            for attention in args.attention:
                times[attention][phase].append(seconds_per_step(attention, tower, whole))
                print(f"[demo_steps] {attention} {phase}: {times[attention][phase][-1]:.3f} s a step",
                      flush=True)
    cpu = meter.stop()
    recipe = TrainConfig()
    median = {a: {p: statistics.median(v) for p, v in by.items()} for a, by in times.items()}
    report.save_raw("demo_steps", {"args": vars(args), "cpu": cpu, "rounds": times, "median": median})
    lines = [
        "## Demo training's cost per step (`python -m benchmarks.demo_steps`)",
        "",
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}: the recipe's `TrainConfig` cut to "
        f"{args.tower_steps} tower steps, then {args.whole_steps} whole-model steps, one thread, batches "
        f"drawn ahead; wall time of each call over its steps (the model's build and the batch worker's start "
        f"included), median of {args.rounds} rounds taken in turns. Other processes, the batch workers among "
        f"them, took {cpu['other_cores']:.2f} of the 2 cores (load average {os.getloadavg()[0]:.1f} at the "
        f"end).",
        "",
        f"| attention | s a tower step | s a whole-model step | the recipe's {recipe.vision_steps} + "
        f"{recipe.steps} steps at that speed |",
        "|---|---|---|---|",
    ]
    for attention, by in median.items():
        minutes = (recipe.vision_steps * by["tower"] + recipe.steps * by["whole"]) / 60
        lines.append(f"| {attention} | {by['tower']:.3f} | {by['whole']:.3f} | {minutes:.0f} min |")
    report.publish(args, "demo_steps", "\n".join(lines))


if __name__ == "__main__":
    main()
