r"""Where a decode step's time goes on a GPU: the kernels of one step, and what fusing them would save.

    python -m benchmarks.gpu_profile             # on a GPU host: about 2-3 min for the 3B preset
    python -m benchmarks.gpu_profile --dry-run   # the same code on the CPU with the `tiny` preset

The step engine's decode step is captured as a CUDA graph, so launches cost nothing; what is left is
the kernels themselves. For the `paligemma-3b-224` preset (random weights, bfloat16) over the server's
32 KV-cache rows, at 1 and 32 rows:
1. the step as a graph captures it (`DecodeGraphs.fixed_step`), run eagerly under torch.profiler: how many
   kernels one step launches, their summed time, and the kernels that take the most of it;
2. the captured graph replayed (CUDA events), against (1)'s summed kernel time and the bandwidth floor
   (the weights and the live KV cache a step must read, over the GPU's memory bandwidth);
3. the same step through `torch.compile` (inductor fuses the elementwise kernels between the matmuls),
   captured as a CUDA graph the same way and replayed: its time, its kernel count, and whether its
   logits agree with the eager step's within the dtype's tolerance (`graphs.disagreement`).
A stage is not started when it would end after --budget-s. Written to gpu-profile.json and .md under
$OUT when set (the device tool sets it), else benchmarks/out/.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

PRESET, DRY_PRESET = "paligemma-3b-224", "tiny"
ROWS = 32
POSITION = 280  # a row's mean length over its decode steps: 256 image tokens, a short prompt, 16 tokens


def _rows(driver, width: int) -> list[int]:
    rows = list(range(width))
    for row in rows:
        driver.runner.table.write(row, token=driver.loaded.pad_token_id, position=POSITION)
    driver.runner.table.upload(width)
    return rows


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_ms(step, device, repeats: int) -> float:
    """Mean of `repeats` back-to-back calls of `step`, CUDA events on a GPU, the wall clock elsewhere."""
    import torch

    step()
    _sync(device)
    if device.type != "cuda":
        started = time.perf_counter()
        for _ in range(repeats):
            step()
        return (time.perf_counter() - started) / repeats * 1000
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        step()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / repeats


def kernel_profile(step, device, repeats: int = 10, top: int = 12) -> dict[str, Any]:
    """`step` run `repeats` times under torch.profiler: kernels per step, their summed time per step, and
    the `top` kernel names by time (on the CPU, where there are no kernels: the operators instead)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    step()
    _sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(repeats):
            step()
        _sync(device)
    wanted = torch.autograd.DeviceType.CUDA if device.type == "cuda" else torch.autograd.DeviceType.CPU
    events = [event for event in prof.events() if event.device_type == wanted]
    if device.type != "cuda":  # operators: only the outermost aten calls, or nesting counts them twice
        events = [event for event in events if (event.name.startswith("aten::") and event.cpu_parent is None)
                  or (event.cpu_parent is not None and not event.cpu_parent.name.startswith("aten::")
                      and event.name.startswith("aten::"))]
    count: Counter[str] = Counter()
    total_us: dict[str, float] = defaultdict(float)
    for event in events:
        count[event.name] += 1
        total_us[event.name] += event.time_range.elapsed_us()
    summed = sum(total_us.values())
    ranked = sorted(total_us, key=total_us.get, reverse=True)[:top]
    return {
        "kernels_per_step": len(events) / repeats,
        "kernel_ms_per_step": summed / repeats / 1000,
        "mean_kernel_us": summed / max(len(events), 1),
        "top": [{"name": name[:120], "per_step": count[name] / repeats,
                 "ms_per_step": total_us[name] / repeats / 1000,
                 "share": total_us[name] / summed if summed else 0.0} for name in ranked],
    }


def capture(step, device):
    """`step` captured as a CUDA graph as `DecodeGraphs` captures it (warmed on a side stream first);
    on the CPU, `step` itself."""
    import torch

    if device.type != "cuda":
        return step
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits = step()

    def replay():
        graph.replay()
        return logits

    return replay


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny preset")
    parser.add_argument("--budget-s", type=float, default=240.0,
                        help="start no stage that would end after this many seconds (default 240)")
    parser.add_argument("--no-compile", action="store_true", help="skip stage 3")
    args = parser.parse_args(argv)
    started = time.perf_counter()

    import torch

    from app.engine.graphs import disagreement
    from app.model.loader import load_model
    from app.settings import Settings
    from benchmarks import gpu_report
    from benchmarks.ceiling import EngineDriver
    from benchmarks.run import machine_info

    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: use --dry-run on a CPU")
    preset = DRY_PRESET if args.dry_run else PRESET
    settings = Settings(model=preset, device=device, max_batch_size=ROWS)
    loaded = load_model(settings)
    driver = EngineDriver(loaded, settings)
    graphs = driver.runner.graphs
    dev = graphs.device
    gpu = torch.cuda.get_device_name() if dev.type == "cuda" else None
    repeats = 50 if dev.type == "cuda" else 3
    result: dict[str, Any] = {"meta": {
        "command": "python -m benchmarks.gpu_profile" + (" --dry-run" if args.dry_run else ""),
        "commit": machine_info()["commit"], "device": gpu or "cpu", "preset": preset,
        "dtype": str(loaded.dtype), "torch": torch.__version__, "rows": ROWS, "position": POSITION,
        "decode_graphs": graphs.captured}, "widths": {}}

    def left() -> float:
        return args.budget_s - (time.perf_counter() - started)

    for width in (ROWS, 1):  # the step at full width first: it is the one furthest from its floor
        rows = _rows(driver, width)
        try:
            with torch.inference_mode():
                eager = functools.partial(graphs.fixed_step, width)  # the step a graph captures
                entry: dict[str, Any] = {"eager_ms": timed_ms(eager, dev, repeats),
                                         "profile": kernel_profile(eager, dev)}
                if width in graphs.captured:
                    entry["graph_ms"] = timed_ms(graphs._replays[width], dev, repeats)
                limits = gpu_report.physical_limits(loaded, POSITION, gpu)
                entry["floor_ms"] = (gpu_report.floor_ms(limits, width, POSITION)
                                     if limits.get("bandwidth") else None)
                reference = graphs.fixed_step(width).float().clone()
                print(f"[profile] {width} rows: eager {entry['eager_ms']:.2f} ms, graph "
                      f"{entry.get('graph_ms', float('nan')):.2f} ms, "
                      f"{entry['profile']['kernels_per_step']:.0f} kernels per step summing "
                      f"{entry['profile']['kernel_ms_per_step']:.2f} ms (mean "
                      f"{entry['profile']['mean_kernel_us']:.1f} us)", flush=True)
                for kernel in entry["profile"]["top"]:
                    print(f"    {kernel['share']:6.1%} {kernel['ms_per_step']:7.3f} ms "
                          f"{kernel['per_step']:5.0f}x  {kernel['name']}", flush=True)
                if not args.no_compile and left() > (150 if dev.type == "cuda" else 60):
                    entry["compiled"] = compiled_step(graphs, width, dev, repeats, reference, disagreement,
                                                      loaded.dtype)
                    shown = json.dumps(entry["compiled"], default=str)[:400]
                    print(f"[profile] {width} rows compiled: {shown}", flush=True)
                elif not args.no_compile:
                    entry["compiled"] = {"skipped": f"{left():.0f} s of the budget left"}
        finally:
            graphs.table.release(rows)
        result["widths"][str(width)] = entry
    result["meta"]["wall_s"] = time.perf_counter() - started
    out = Path(os.environ.get("OUT") or "benchmarks/out")
    out.mkdir(parents=True, exist_ok=True)
    name = "gpu-profile-dry-run" if args.dry_run else "gpu-profile"
    (out / f"{name}.json").write_text(json.dumps(result, indent=2, default=str))
    print(f"[profile] written to {out / name}.json ({result['meta']['wall_s']:.0f} s)", flush=True)
    return result


def compiled_step(graphs, width: int, device, repeats: int, reference, disagreement, dtype) -> dict[str, Any]:
    """The fixed-shape step through torch.compile, captured and replayed; compile errors are reported,
    not raised (this stage measures a possibility, it does not serve)."""
    import torch

    started = time.perf_counter()
    try:
        torch._dynamo.reset()
        compiled = torch.compile(functools.partial(graphs.fixed_step, width), dynamic=False, fullgraph=False)
        with torch.inference_mode():
            for _ in range(3):
                compiled()
            _sync(device)
            compile_s = time.perf_counter() - started
            replay = capture(compiled, device)
            logits = replay().float().clone()
            return {"compile_s": compile_s, "replay_ms": timed_ms(replay, device, repeats),
                    "profile": {key: value for key, value in kernel_profile(compiled, device).items()
                                if key != "top"},
                    "disagreement": disagreement(logits[:width], reference[:width], dtype)}
    except Exception as error:
        return {"error": f"{type(error).__name__}: {str(error)[:300]}",
                "after_s": time.perf_counter() - started}


if __name__ == "__main__":
    main()
