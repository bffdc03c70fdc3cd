r"""PaliGemma-3B (224 px) on one GPU: the step engine's ceiling, the served server, and the physical limits.

    python -m benchmarks.gpu              # one H100 or H200: about 6 min, stops starting stages at 8
    python -m benchmarks.gpu --dry-run    # the same code on the CPU with the `tiny` preset, about 1 min
    python -m benchmarks.gpu --quantized  # PaliGemma 2 10B at 448 px in nf4 and int8 instead
                                          # (benchmarks/gpu_quantized.py; with --dry-run on the CPU)
    python -m benchmarks.gpu --adapters   # LoRA adapters instead (below): about 6 min; --dry-run too

On a lent GPU machine of this workplace (the device tool: Python 3.12, torch with CUDA, transformers
5.17, no FastAPI stack, no network), first run `bash benchmarks/gpu_wheels.sh` (the server's
dependencies that image lacks, as wheels in the git-ignored .whl/, at the lock's versions) in the
checkout the device tool sends (the session's own, not a helper's worktree: the code to measure must be
checked out there; `--quantization` adds torchao and bitsandbytes for `--quantized`), then make one
call of the device tool's `run`:

    timeout_s: 600, carry: [".whl"], command:
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; \
        PYTHONUNBUFFERED=1 python3 -m benchmarks.gpu

(`python3 -m benchmarks.gpu --adapters` in its place for the adapter run, below.) With OUT set (the
device tool sets it), gpu.json, gpu.md and the servers' logs are also written there.

For the `paligemma-3b-224` preset (the exact PaliGemma-3B architecture, random weights) in bfloat16;
every request generates 32 tokens unless said otherwise (random weights never emit <eos>):
1. In-process ceiling: the server's engine loop, scheduler and runner (`benchmarks.ceiling.EngineDriver`)
   over 32 KV-cache rows, its decode steps captured as CUDA graphs as the server's warm-up captures them
   (timed), N = 1, 8, 32 requests always in flight: req/s, tokens/s, step times by phase and rows.
2. Decode step at 1 and 32 rows, by the engine's own step timer during (1) and as the captured graph
   replayed alone (CUDA events), next to the bandwidth floor: the bytes a step must read (the language
   model's weights, a tied head once, plus every row's live KV cache) over the GPU's memory bandwidth
   (H100 SXM 3.35 TB/s or H200 4.8 TB/s, from torch.cuda.get_device_name()).
3. Served: `python -m app` on the same preset and its default rows, at 1, 8, 32 and 64 in flight, with
   decode-step rows and times from its /metrics and the graph-capture time from its log.
4. Mixed lengths, same server, 64 in flight: max_new_tokens cycling over 8, 16, ..., 64; the p50 of the
   8-token and of the 64-token requests reported apart.
5. Sampled, same server, 32 in flight: the workload at temperature 1, with top_k 50 and with top_p 0.9
   (a seed per request), against the greedy level at 32. In-process, the sampler alone at 32 rows x
   257,216 bf16 logits per mode (`benchmarks.sampling`, peaked logits), and whether the decode graphs
   passed their warm-up check against the eager step (in-process and in the server's /v1/models).
6. The tutorial server (`benchmarks/peers/tutorial.py`, one `generate` per request) on the same GPU.
The issue's targets are checked at the end.

With --adapters, instead: 4 PEFT LoRA adapters of rank 16 made for the preset (benchmarks/adapters.py),
then (a) the decode step over the server's rows as the captured CUDA graph replays it, on the model with
no adapters configured, with adapters configured and every row on the base, and with the rows mixed over
the 4 adapters, and a prefill of 8 base against 8 mixed; (b) the served throughput of the base alone
against the same server with the 4 adapters loaded and every request naming one in turn, at 32 and 64
in flight (target: >= 0.8 of the base's). Written to gpu-adapters.json/.md and the `gpu_adapters`
section of RESULTS.md. Each stage's results are written as soon as it ends, and a
stage is not started once the time budget (--budget-s) would be passed, so a run cut short keeps what
it measured.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks import gpu_report, procs
from benchmarks.run import measure_level
from benchmarks.served_sampling import with_sampling
from benchmarks.systems import SERVER_ROWS, SYSTEMS, Config
from benchmarks.workload import TASKS, build_mix, skimage_available, spread_new_tokens

ROOT = Path(__file__).resolve().parent
NEW_TOKENS = 32
STARTUP_S = 60.0  # what a server start is budgeted at (the 3B preset: build, graph capture, warm-up)
MIXED_LENGTHS = (8, 16, 24, 32, 40, 48, 56, 64)


@dataclass(frozen=True)
class Plan:
    preset: str
    device: str
    rows: int  # KV-cache rows, in-process and served: the server's default
    ceiling: tuple[int, ...]  # requests in flight in-process
    served: tuple[int, ...]  # requests in flight against the server
    mixed: int  # requests in flight for the mixed-length workload
    sampled: int  # requests in flight for the sampled workloads
    tutorial: tuple[int, ...]
    ceiling_warmup_s: float
    ceiling_s: float
    warmup_s: float
    window_s: float
    mixed_warmup_s: float
    mixed_s: float
    tutorial_warmup_s: float
    tutorial_s: float
    variants: int
    adapter_served: tuple[int, ...] = (32, 64)  # requests in flight, base against 4 adapters
    adapter_rounds: int = 3  # alternated rounds of the in-process step timing


FULL = Plan("paligemma-3b-224", "cuda", SERVER_ROWS, (1, 8, 32), (1, 8, 32, 64), 64, 32, (1, 8),
            5.0, 15.0, 5.0, 15.0, 10.0, 30.0, 3.0, 10.0, 4)
DRY = Plan("tiny", "cpu", SERVER_ROWS, (1, 2, 4), (1, 2, 4, 8), 8, 4, (1, 2),
           1.0, 2.0, 1.0, 2.0, 1.0, 3.0, 1.0, 3.0, 1, adapter_served=(4,), adapter_rounds=1)
# The sampled workloads (form fields added to every request; a seed each).
SAMPLED = {"temperature 1": {"temperature": "1.0"}, "top_k 50": {"temperature": "1.0", "top_k": "50"},
           "top_p 0.9": {"temperature": "1.0", "top_p": "0.9"}}


class Budget:
    """Wall time since the start; a stage is skipped when it would end past the budget."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.started = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    @property
    def left(self) -> float:
        return max(0.0, self.seconds - self.elapsed)

    def allows(self, stage: str, estimate_s: float) -> bool:
        if self.elapsed + estimate_s <= self.seconds:
            return True
        print(f"[{stage}] SKIPPED: {self.elapsed:.0f} s spent, about {estimate_s:.0f} s more would pass the "
              f"{self.seconds:.0f} s budget", flush=True)
        return False


# In-process ----------------------------------------------------------------------------------------
def in_process(plan: Plan, photos: str) -> dict[str, Any]:
    """The ceiling and the step timings, then free the model: the server about to start needs the GPU."""
    import torch

    result = _in_process(plan, photos)
    gc.collect()
    if plan.device == "cuda":
        torch.cuda.empty_cache()
    return result


def _in_process(plan: Plan, photos: str) -> dict[str, Any]:
    import torch

    from app.model.loader import load_model
    from app.settings import Settings
    from benchmarks.ceiling import EngineDriver, prepare, steady_state

    settings = Settings(model=plan.preset, device=plan.device, max_batch_size=plan.rows)
    started = time.perf_counter()
    loaded = load_model(settings)
    load_s = time.perf_counter() - started
    gpu = torch.cuda.get_device_name() if plan.device == "cuda" else None
    items = prepare(loaded, build_mix(plan.variants, tokens=dict.fromkeys(TASKS, NEW_TOKENS), photos=photos))
    prompt_tokens = round(statistics.mean(len(item.row.input_ids) for item in items))
    limits = gpu_report.physical_limits(loaded, prompt_tokens, gpu)
    driver = EngineDriver(loaded, settings)
    print(f"[in-process] {plan.preset} built in {load_s:.0f} s; decode graphs captured in "
          f"{driver.capture_s:.1f} s ({_graphs(driver)})", flush=True)
    rows, index = [], 0
    for n in plan.ceiling:
        row = steady_state(driver, items, n, plan.ceiling_warmup_s, plan.ceiling_s, index)
        index = row.pop("next_index")
        rows.append(row)
        print(f"[in-process] {n} in flight: {row['requests_per_s']:.2f} req/s, {row['tokens_per_s']:.0f} "
              f"tokens/s, decode step {_ms(row['decode']['ms_median'])} ms over "
              f"{_ms(row['decode']['rows_mean'])} rows, prefill step {_ms(row['prefill']['ms_median'])} ms",
              flush=True)
    position = prompt_tokens + NEW_TOKENS // 2  # a row's mean length over its decode steps
    replay = {str(width): replay_ms(driver, width, position) for width in sorted({1, plan.rows})}
    memory = torch.cuda.max_memory_allocated() / 1e9 if plan.device == "cuda" else None
    from benchmarks.sampling import device_ms

    sampler = device_ms(plan.device, loaded.dtype, plan.rows, rounds=10 if plan.device == "cuda" else 2)
    print(f"[in-process] sampler at {plan.rows} rows x 257,216 ({loaded.dtype}): "
          + ", ".join(f"{mode} {ms:.2f} ms" for mode, ms in sampler.items()), flush=True)
    return {"load_s": load_s, "dtype": str(loaded.dtype), "device": str(loaded.device), "gpu": gpu,
            "rows": plan.rows, "cache_length": driver.runner.shape.length,
            "cache_gb": driver.runner.cache_bytes / 1e9, "capture_s": driver.capture_s,
            "graphs": driver.runner.graphs.captured, "graphs_failure": driver.runner.graphs.failure,
            "max_memory_allocated_gb": memory, "limits": limits, "ceiling": rows, "replay_ms": replay,
            "replay_position": position, "sampler_ms": sampler}


def _graphs(driver) -> str:
    captured = driver.runner.graphs.captured
    return f"buckets {captured}" if captured else "none: eager decode"


def replay_ms(driver, width: int, position: int, repeats: int = 50) -> float:
    """One decode step over rows 0..width-1 as the runner runs it (the captured graph on CUDA, eager
    otherwise), without sampling: mean of `repeats` back-to-back steps, timed with CUDA events on a GPU.
    The driver must hold no request: the steps write keys and values into rows nobody reads, and the rows
    are idle again afterwards."""
    import torch

    runner = driver.runner
    rows = list(range(width))
    for row in rows:
        runner.table.write(row, token=driver.loaded.pad_token_id, position=position)
    try:
        with torch.inference_mode():
            runner.graphs.run(width, position + 1)
            if runner.device.type != "cuda":
                started = time.perf_counter()
                for _ in range(repeats):
                    runner.graphs.run(width, position + 1)
                return (time.perf_counter() - started) / repeats * 1000
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            for _ in range(repeats):
                runner.graphs.run(width, position + 1)
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / repeats
    finally:
        runner.table.release(rows)


# Served --------------------------------------------------------------------------------------------
def served(plan: Plan, photos: str, budget: Budget, logs: Path, result: dict[str, Any],
           save: Callable[[], object]) -> None:
    """Our server: the served levels, the mixed-length workload, then the sampled ones, on one server
    process; into `result` as they end (`save` writes what there is so far)."""
    port = procs.free_port()
    command, env = SYSTEMS["ours"].command(port, Config(model=plan.preset, rows=plan.rows))
    env["PALIGEMMA_DEVICE"] = plan.device
    mix = build_mix(plan.variants, tokens=dict.fromkeys(TASKS, NEW_TOKENS), photos=photos)
    mixed = spread_new_tokens(build_mix(plan.variants, photos=photos), MIXED_LENGTHS)
    log = logs / "gpu-server.log"
    result.update({"levels": [], "mixed": None, "sampled": {}, "log": str(log)})
    started = time.perf_counter()
    with procs.running("ours", command, env, "/readyz", log, port, timeout_s=budget.left) as server:
        result["startup_s"] = time.perf_counter() - started
        result["pid"] = server.pid
        result.update(server_log_timings(log))
        result["graphs"] = models_card(server.base_url)
        print(f"[served] ready in {result['startup_s']:.0f} s (decode graphs: {result['capture_log']})",
              flush=True)
        index = 0
        for n in plan.served:
            if not budget.allows(f"served {n}", plan.warmup_s + plan.window_s + 20):
                break
            level = asyncio.run(measure_level(server, True, mix, n, plan.warmup_s, plan.window_s, index))
            index += level.pop("sent")
            level.pop("samples")
            result["levels"].append(level)
            m = level.get("server_metrics", {})
            print(f"[served] {n} in flight: {level['requests_per_s']:.2f} req/s, p50 "
                  f"{level['latency_ms']['p50']:.0f} ms, decode step {_ms(m.get('mean_decode_step_ms'))} "
                  f"ms over {_ms(m.get('mean_decode_rows'))} rows, errors {level['errors'] or 0}", flush=True)
            save()
        if budget.allows("mixed", plan.mixed_warmup_s + plan.mixed_s + 30):
            level = asyncio.run(measure_level(server, True, mixed, plan.mixed, plan.mixed_warmup_s,
                                              plan.mixed_s, 0))
            level.pop("sent")
            level.pop("samples")
            result["mixed"] = level
            lengths = level["per_length"]
            print(f"[mixed] {plan.mixed} in flight, max_new_tokens {MIXED_LENGTHS[0]}..{MIXED_LENGTHS[-1]}: "
                  f"{level['requests_per_s']:.2f} req/s; p50 by length: "
                  + ", ".join(f"{k}: {v['p50_ms']:.0f} ms" for k, v in lengths.items()), flush=True)
            save()
        for mode, fields in SAMPLED.items():
            if not budget.allows(f"sampled {mode}", plan.warmup_s + plan.window_s + 20):
                break
            level = asyncio.run(measure_level(server, True, with_sampling(mix, fields), plan.sampled,
                                              plan.warmup_s, plan.window_s, 0))
            level.pop("sent")
            level.pop("samples")
            result["sampled"][mode] = level
            m = level.get("server_metrics", {})
            print(f"[sampled] {mode}, {plan.sampled} in flight: {level['requests_per_s']:.2f} req/s, p50 "
                  f"{level['latency_ms']['p50']:.0f} ms, decode step {_ms(m.get('mean_decode_step_ms'))} ms, "
                  f"errors {level['errors'] or 0}", flush=True)
            save()


def models_card(base_url: str) -> dict[str, Any]:
    """What the server's /v1/models says of its decode graphs (captured buckets, or why discarded)."""
    import httpx

    card = httpx.get(f"{base_url}/v1/models", timeout=10).json()["data"][0]
    return {key: card.get(key) for key in ("decode_graphs", "decode_graphs_failure")}


def server_log_timings(log: Path) -> dict[str, Any]:
    """The server's own start-up lines: model load, decode-graph capture (its last progress line) and
    the warm-up of every task path."""
    text = log.read_text(errors="replace") if log.exists() else ""
    capture = re.findall(r"capturing decode graphs: (\d+)/(\d+) batch sizes, ([\d.]+) s", text)
    warm = re.findall(r"warm-up: every task path ran in ([\d.]+) s", text)
    loaded = re.findall(r"loaded .* in ([\d.]+) s", text)
    return {
        "capture_log": f"{capture[-1][0]}/{capture[-1][1]} buckets in {capture[-1][2]} s" if capture
        else "none logged",
        "capture_log_s": float(capture[-1][2]) if capture else None,
        "warm_up_log_s": float(warm[-1]) if warm else None,
        "load_log_s": float(loaded[-1]) if loaded else None,
    }


def tutorial(plan: Plan, photos: str, budget: Budget, logs: Path) -> dict[str, Any]:
    port = procs.free_port()
    command, _ = SYSTEMS["tutorial"].command(port, Config(model=plan.preset))
    env = {"PALIGEMMA_DEVICE": plan.device}  # the peers load through the server's own loader
    mix = build_mix(plan.variants, tokens=dict.fromkeys(TASKS, NEW_TOKENS), photos=photos)
    levels: list[dict[str, Any]] = []
    with procs.running("tutorial", command, env, "/healthz", logs / "gpu-tutorial.log", port,
                       timeout_s=budget.left) as server:
        pid = server.pid
        index = 0
        for n in plan.tutorial:
            if not budget.allows(f"tutorial {n}", plan.tutorial_warmup_s + plan.tutorial_s + 30):
                break
            level = asyncio.run(measure_level(server, False, mix, n, plan.tutorial_warmup_s, plan.tutorial_s,
                                              index))
            index += level.pop("sent")
            level.pop("samples")
            levels.append(level)
            print(f"[tutorial] {n} in flight: {level['requests_per_s']:.2f} req/s, p50 "
                  f"{level['latency_ms']['p50']:.0f} ms, errors {level['errors'] or 0}", flush=True)
    return {"levels": levels, "pid": pid}


# Adapters ------------------------------------------------------------------------------------------
def adapter_run(plan: Plan, photos: str, budget: Budget, out_dir: Path, logs: Path, stamp: str,
                dry_run: bool) -> dict[str, Any]:
    """benchmarks/adapters.py's two measurements on this device: in-process steps, then served."""
    import torch

    from benchmarks import adapters
    from benchmarks.run import machine_info

    gpu = torch.cuda.get_device_name() if plan.device == "cuda" else "CPU (dry run)"
    command = "python -m benchmarks.gpu --adapters" + (" --dry-run" if dry_run else "")
    result: dict[str, Any] = {"meta": {
        "date": f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}", "command": command,
        "commit": machine_info()["commit"], "cpu": gpu, "cores": os.cpu_count(), "model": plan.preset,
        "concurrency": list(plan.adapter_served), "dry_run": dry_run}}
    folders = adapters.make_adapters(plan.preset, out_dir / "adapters" / plan.preset, plan.device)
    result["steps"] = adapters.measure_steps(plan.preset, folders, plan.adapter_rounds, 3 if dry_run else 20,
                                             plan.device, (plan.rows,))
    gc.collect()
    if plan.device == "cuda":
        torch.cuda.empty_cache()
    windows = len(plan.adapter_served) * (plan.warmup_s + plan.window_s + 10)
    if budget.allows("adapters served", 2 * (STARTUP_S + windows)):
        args = argparse.Namespace(model=plan.preset, concurrency=list(plan.adapter_served), rounds=1,
                                  warmup=plan.warmup_s, duration=plan.window_s, variants=plan.variants,
                                  photos=photos, quiet_wait=0.0, tokens=dict.fromkeys(TASKS, NEW_TOKENS))
        result["served"] = adapters.measure_served(args, folders, stamp, logs, plan.device)
    return result


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


# Main ----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny preset, short windows")
    parser.add_argument("--adapters", action="store_true",
                        help="measure 4 LoRA adapters mixed against the base instead (see above)")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="start no stage that would end after this many seconds (default 480)")
    parser.add_argument("--results", type=Path, help="Markdown file whose `gpu` section to rewrite "
                        "(default benchmarks/RESULTS.md; dry run: benchmarks/out/RESULTS-gpu-dry-run.md)")
    parser.add_argument("--quantized", action="store_true",
                        help="PaliGemma 2 10B at 448 px in nf4 and int8 (benchmarks/gpu_quantized.py)")
    args = parser.parse_args(argv)
    if args.quantized:
        from benchmarks import gpu_quantized

        return gpu_quantized.main([*(["--dry-run"] if args.dry_run else []), "--budget-s", str(args.budget_s),
                                   *(["--results", str(args.results)] if args.results else [])])
    plan = DRY if args.dry_run else FULL
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            parser.error("no CUDA device: run on a GPU host, or use --dry-run")
    photos = "skimage" if skimage_available() else "synthetic"
    if photos == "synthetic" and not args.dry_run:
        parser.error("scikit-image is missing: pip install -r benchmarks/requirements.txt")
    budget = Budget(args.budget_s)
    # With OUT set, everything goes there (the servers' logs too); else under benchmarks/out/.
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "out"
    stamp = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}"
    logs = out_dir if os.environ.get("OUT") else out_dir / "logs" / f"gpu-{stamp}"
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "gpu-dry-run" if args.dry_run else "gpu"
    if args.adapters:
        from benchmarks import adapters

        result = adapter_run(plan, photos, budget, out_dir, logs, stamp, args.dry_run)
        markdown = adapters.render(result)
        (out_dir / f"{name}-adapters.json").write_text(json.dumps(result, indent=2, default=str))
        (out_dir / f"{name}-adapters.md").write_text(markdown + "\n")
        print("\n" + markdown + f"\n\n(total {budget.elapsed:.0f} s)")
        default = ROOT / "out" / "RESULTS-gpu-dry-run.md" if args.dry_run else ROOT / "RESULTS.md"
        gpu_report.update_section(args.results or default, "gpu_adapters", markdown)
        return result
    results: dict[str, Any] = {
        "meta": {"date": f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}", "dry_run": args.dry_run,
                 "plan": asdict(plan), "photos": photos, "new_tokens": NEW_TOKENS,
                 "mixed_lengths": list(MIXED_LENGTHS), "command": "python -m benchmarks.gpu"
                 + (" --dry-run" if args.dry_run else "")},
        "in_process": None, "served": None, "tutorial": None,
    }

    def save() -> str:
        results["meta"]["wall_s"] = budget.elapsed
        results["targets"] = gpu_report.targets(results)
        markdown = gpu_report.render(results)
        (out_dir / f"{name}.json").write_text(json.dumps(results, indent=2, default=str))
        (out_dir / f"{name}.md").write_text(markdown + "\n")
        return markdown

    results["in_process"] = in_process(plan, photos)
    save()
    # A server start is budgeted at STARTUP_S: loading the 3B preset, capturing graphs, warming up.
    if budget.allows("served", STARTUP_S + plan.warmup_s + plan.window_s):
        results["served"] = {}
        try:
            served(plan, photos, budget, logs, results["served"], save)
        except Exception as exc:  # keep what the other stages measured
            print(f"[served] FAILED: {type(exc).__name__}: {exc}", flush=True)
            results["served"]["error"] = f"{type(exc).__name__}: {exc}"
        save()
    if budget.allows("tutorial", STARTUP_S + plan.tutorial_warmup_s + plan.tutorial_s):
        try:
            results["tutorial"] = tutorial(plan, photos, budget, logs)
        except Exception as exc:
            print(f"[tutorial] FAILED: {type(exc).__name__}: {exc}", flush=True)
            results["tutorial"] = {"error": f"{type(exc).__name__}: {exc}"}
    markdown = save()
    print("\n" + markdown + f"\n\n(total {budget.elapsed:.0f} s)")
    default = ROOT / "out" / "RESULTS-gpu-dry-run.md" if args.dry_run else ROOT / "RESULTS.md"
    gpu_report.update_section(args.results or default, "gpu", markdown)
    return results


if __name__ == "__main__":
    main()
