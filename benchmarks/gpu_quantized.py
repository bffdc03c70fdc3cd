r"""PaliGemma 2 10B at 448 px on one GPU, quantized (nf4, int8): the engine's ceiling, the served server, and
the decode step against the bandwidth floor of the quantized weights.

    python -m benchmarks.gpu --quantized              # one H100 or H200: about 8 min
    python -m benchmarks.gpu --quantized --dry-run    # the same code on the CPU with `tiny`, about 1 min

(or `python -m benchmarks.gpu_quantized [--dry-run]`). On a lent GPU machine, as for benchmarks.gpu
(its docstring has the device tool's call), with `python3 -m benchmarks.gpu --quantized` as the command.

For each quantization, on the `paligemma2-10b-448` preset (the exact PaliGemma 2 10B 448 px architecture,
random weights, built in bfloat16 on the GPU then quantized in place; 1024 image tokens), every request
generating 32 tokens:
1. In-process: the server's engine (`benchmarks.ceiling.EngineDriver`) over 32 KV-cache rows, its decode
   steps captured as CUDA graphs where the layers allow (the log says when not), at 1 and 32 in flight.
2. The decode step at 1 and 32 rows, replayed alone (CUDA events), against its floor: the bytes a step
   must read (the language model's weights as quantized, the tied head once, every row's live KV cache)
   over the GPU's memory bandwidth.
3. Served: `python -m app` with PALIGEMMA_QUANTIZATION, 32 in flight: req/s and p50.
Each stage's results are written as it ends; a stage that would pass the budget is skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks import gpu_report, procs
from benchmarks.gpu import NEW_TOKENS, Budget, replay_ms
from benchmarks.report import fmt, update_section
from benchmarks.systems import SYSTEMS, Config
from benchmarks.workload import TASKS, build_mix, skimage_available

ROOT = Path(__file__).resolve().parent
SECTION = "gpu-quantized"


@dataclass(frozen=True)
class Plan:
    preset: str
    device: str
    methods: tuple[str, ...]
    rows: int
    in_flight: tuple[int, ...]
    served: int
    warmup_s: float
    window_s: float
    startup_s: float  # what one load (build, quantize, capture graphs, warm up) is budgeted at
    variants: int


FULL = Plan("paligemma2-10b-448", "cuda", ("nf4", "int8"), 32, (1, 32), 32, 5.0, 15.0, 120.0, 4)
DRY = Plan("tiny", "cpu", ("nf4", "int8"), 4, (1, 4), 4, 2.0, 6.0, 20.0, 1)


def decode_floor_bytes(loaded, rows: int, position: int) -> dict[str, int]:
    """Bytes one decode step over `rows` rows at `position` must read: the language model's weights as they
    are stored (quantized layers at their size), the output head once (tied: the embedding matrix, whose
    lookup reads a few rows only), and the keys and values of every position of every row."""
    from app.model.quantization import weight_bytes

    model = loaded.model
    text = model.model.language_model
    tied = model.lm_head.weight is text.embed_tokens.weight
    weights = weight_bytes(text) + (0 if tied else weight_bytes(model.lm_head))
    config = model.config.text_config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 2
    return {"weights": weights, "kv": rows * position * per_token}


def in_process(plan: Plan, method: str, photos: str) -> dict[str, Any]:
    import torch

    from app.model.loader import load_model
    from app.settings import Settings
    from benchmarks.ceiling import EngineDriver, prepare, steady_state

    settings = Settings(
        model=plan.preset, device=plan.device, max_batch_size=plan.rows, quantization=method, dtype="bfloat16"
    )
    started = time.perf_counter()
    loaded = load_model(settings)
    load_s = time.perf_counter() - started
    items = prepare(loaded, build_mix(plan.variants, tokens=dict.fromkeys(TASKS, NEW_TOKENS), photos=photos))
    driver = EngineDriver(loaded, settings)
    graphs = driver.runner.graphs.captured
    print(
        f"[{method}] built and quantized in {load_s:.0f} s, weights {loaded.weight_bytes / 1e9:.2f} GB; "
        f"decode graphs {graphs or 'none: eager'} ({driver.capture_s:.0f} s)",
        flush=True,
    )
    levels, index = [], 0
    for n in plan.in_flight:
        row = steady_state(driver, items, n, plan.warmup_s, plan.window_s, index)
        index = row.pop("next_index")
        levels.append(row)
        print(
            f"[{method}] {n} in flight: {row['requests_per_s']:.2f} req/s, {row['tokens_per_s']:.0f} "
            f"tokens/s, decode step {fmt(row['decode']['ms_median'])} ms over "
            f"{fmt(row['decode']['rows_mean'], 1)} rows",
            flush=True,
        )
    prompt = sum(len(item.row.input_ids) for item in items) // len(items)
    position = prompt + NEW_TOKENS // 2
    gpu = torch.cuda.get_device_name() if plan.device == "cuda" else None
    rate, source = gpu_report.bandwidth(gpu)
    steps = {}
    for width in sorted({1, plan.rows}):
        measured = replay_ms(driver, width, position)
        floor = decode_floor_bytes(loaded, width, position)
        floor_ms = (floor["weights"] + floor["kv"]) / rate * 1000 if rate else None
        steps[str(width)] = {
            "replay_ms": measured,
            "floor_bytes": floor,
            "floor_ms": floor_ms,
            "x_floor": measured / floor_ms if floor_ms else None,
        }
        print(
            f"[{method}] decode step at {width} rows: {measured:.2f} ms, floor {fmt(floor_ms)} ms "
            f"({(floor['weights'] + floor['kv']) / 1e9:.2f} GB at {source})",
            flush=True,
        )
    memory = torch.cuda.max_memory_allocated() / 1e9 if plan.device == "cuda" else None
    result = {
        "load_s": load_s,
        "weight_bytes": loaded.weight_bytes,
        "quantization": loaded.quantization.value,
        "graphs": graphs,
        "capture_s": driver.capture_s,
        "levels": levels,
        "decode": steps,
        "position": position,
        "gpu": gpu,
        "bandwidth": rate,
        "max_memory_allocated_gb": memory,
    }
    del driver, loaded
    gc.collect()
    if plan.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return result


def served(plan: Plan, method: str, photos: str, budget: Budget, logs: Path) -> dict[str, Any]:
    from benchmarks.run import measure_level

    port = procs.free_port()
    command, env = SYSTEMS["ours"].command(port, Config(model=plan.preset, rows=plan.rows))
    env.update(PALIGEMMA_DEVICE=plan.device, PALIGEMMA_QUANTIZATION=method, PALIGEMMA_DTYPE="bfloat16")
    mix = build_mix(plan.variants, tokens=dict.fromkeys(TASKS, NEW_TOKENS), photos=photos)
    started = time.perf_counter()
    with procs.running(
        f"ours-{method}", command, env, "/readyz", logs / f"gpu-{method}.log", port, timeout_s=budget.left
    ) as server:
        startup_s = time.perf_counter() - started
        level = asyncio.run(measure_level(server, True, mix, plan.served, plan.warmup_s, plan.window_s, 0))
    level.pop("sent")
    level.pop("samples")
    print(
        f"[{method}] served, {plan.served} in flight: {level['requests_per_s']:.2f} req/s, p50 "
        f"{level['latency_ms']['p50']:.0f} ms, errors {level['errors'] or 0}",
        flush=True,
    )
    return {"startup_s": startup_s, **level}


def render(results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [
        f"## GPU, quantized: {meta['preset']} (`{meta['command']}`)",
        "",
        f"{meta['date']}, {meta.get('gpu') or 'CPU (dry run)'}; every request 32 new tokens, "
        f"{meta['rows']} KV-cache rows.",
        "",
        "| quantization | weights GB | decode graphs | req/s at 1 / 32 in flight (in-process) | "
        "decode step ms at 1 / 32 rows | floor ms | x floor | served req/s at 32 | served p50 ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, entry in results["methods"].items():
        local = entry.get("in_process") or {}
        levels = {row["concurrency"]: row for row in local.get("levels", [])}
        rps = " / ".join(fmt(levels[n]["requests_per_s"]) if n in levels else "n/a" for n in sorted(levels))
        steps = local.get("decode", {})
        step = " / ".join(fmt(steps[k]["replay_ms"]) for k in sorted(steps, key=int))
        floor = " / ".join(fmt(steps[k]["floor_ms"]) for k in sorted(steps, key=int))
        x = " / ".join(fmt(steps[k]["x_floor"], 1) for k in sorted(steps, key=int))
        serve = entry.get("served") or {}
        lines.append(
            f"| {method} | {fmt(local.get('weight_bytes', 0) / 1e9)} | "
            f"{local.get('graphs') or 'eager'} | {rps} | {step} | {floor} | {x} | "
            f"{fmt(serve.get('requests_per_s'))} | {fmt((serve.get('latency_ms') or {}).get('p50'), 0)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny preset, short windows")
    parser.add_argument("--budget-s", type=float, default=540.0)
    parser.add_argument("--results", type=Path, help="Markdown file whose `gpu-quantized` section to rewrite")
    args = parser.parse_args(argv)
    plan = DRY if args.dry_run else FULL
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            parser.error("no CUDA device: run on a GPU host, or use --dry-run")
    photos = "skimage" if skimage_available() else "synthetic"
    budget = Budget(args.budget_s)
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "out"
    logs = out_dir if os.environ.get("OUT") else out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    name = "gpu-quantized-dry-run" if args.dry_run else "gpu-quantized"
    results: dict[str, Any] = {
        "meta": {
            "date": f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}",
            "dry_run": args.dry_run,
            "preset": plan.preset,
            "rows": plan.rows,
            "plan": asdict(plan),
            "photos": photos,
            "command": "python -m benchmarks.gpu --quantized" + (" --dry-run" if args.dry_run else ""),
        },
        "methods": {},
    }

    def save() -> str:
        markdown = render(results)
        (out_dir / f"{name}.json").write_text(json.dumps(results, indent=2, default=str))
        (out_dir / f"{name}.md").write_text(markdown + "\n")
        return markdown

    for method in plan.methods:
        entry = results["methods"][method] = {}
        if budget.allows(
            f"{method} in-process", plan.startup_s + len(plan.in_flight) * (plan.warmup_s + plan.window_s)
        ):
            try:
                entry["in_process"] = in_process(plan, method, photos)
                results["meta"]["gpu"] = entry["in_process"]["gpu"]
            except Exception as exc:  # keep what the other stages measured
                print(f"[{method}] in-process FAILED: {type(exc).__name__}: {exc}", flush=True)
                entry["in_process"] = {"error": f"{type(exc).__name__}: {exc}"}
            save()
        if budget.allows(f"{method} served", plan.startup_s + plan.warmup_s + plan.window_s + 20):
            try:
                entry["served"] = served(plan, method, photos, budget, logs)
            except Exception as exc:
                print(f"[{method}] served FAILED: {type(exc).__name__}: {exc}", flush=True)
                entry["served"] = {"error": f"{type(exc).__name__}: {exc}"}
            save()
    markdown = save()
    print("\n" + markdown + f"\n\n(total {budget.elapsed:.0f} s)")
    default = ROOT / "out" / "RESULTS-gpu-quantized-dry-run.md" if args.dry_run else ROOT / "RESULTS.md"
    update_section(args.results or default, SECTION, markdown)
    return results


if __name__ == "__main__":
    main()
