"""Memory soak: our server under steady load for a while, its resident memory sampled as it goes.

A leak shows as RSS that keeps climbing once the server is warm (allocator pools, caches and the
feature cache fill during the first minutes, then RSS should be flat). RSS also swings by a few hundred
MB with every large prefill (activations allocated and freed), so two slopes are reported, in MB per
minute: least squares through all samples after the warm-up, and through each minute's lowest sample
(the floor between prefills, where a leak would show without their swing).

    python -m benchmarks.soak              # 10 min at 16 in flight
    python -m benchmarks.soak --quick      # 60 s
"""

from __future__ import annotations

import argparse
import asyncio
import time
from datetime import datetime, timezone
from pathlib import Path

from benchmarks import procs, report
from benchmarks.loadgen import run_load
from benchmarks.systems import SERVER_ROWS, SYSTEMS, Config
from benchmarks.workload import build_mix

ROOT = Path(__file__).resolve().parent


def minute_floors(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(middle of the minute, lowest sample in it) for every minute with samples."""
    floors: dict[int, float] = {}
    for t, mb in points:
        minute = int(t // 60)
        floors[minute] = min(mb, floors.get(minute, mb))
    return [(minute * 60 + 30, mb) for minute, mb in sorted(floors.items())]


def slope_per_minute(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MB) points, in MB per minute."""
    return _fit(points)[0]


def slope_error(points: list[tuple[float, float]]) -> float:
    """Standard error of that slope, in MB per minute (nan with fewer than 3 points)."""
    return _fit(points)[1]


def _fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    n = len(points)
    if n < 2:
        return float("nan"), float("nan")
    mean_t = sum(t for t, _ in points) / n
    mean_m = sum(m for _, m in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if not var:
        return float("nan"), float("nan")
    slope = sum((t - mean_t) * (m - mean_m) for t, m in points) / var
    if n < 3:
        return slope * 60, float("nan")
    residual = sum((m - mean_m - slope * (t - mean_t)) ** 2 for t, m in points)
    return slope * 60, (residual / (n - 2) / var) ** 0.5 * 60


async def _soak(server: procs.Server, concurrency: int, duration_s: float, interval_s: float):
    samples: list[tuple[float, float]] = []
    t0 = time.perf_counter()
    load = asyncio.ensure_future(run_load(server.base_url, build_mix(), concurrency, 0.0, duration_s))
    while not load.done():
        samples.append((time.perf_counter() - t0, procs.memory_mb(server.pid, "VmRSS")))
        await asyncio.wait({load}, timeout=interval_s)
    return await load, samples


def _floor_fit(after: list[tuple[float, float]], end_s: float) -> dict[str, float]:
    # Whole minutes after the warm-up only: a partial last minute has too few samples for a floor.
    floors = [p for p in minute_floors(after) if p[0] + 30 <= end_s]
    return {"floor_slope_mb_per_min": slope_per_minute(floors), "floor_slope_error": slope_error(floors)}


def run(duration_s: float, warmup_s: float, concurrency: int, interval_s: float, config: Config):
    started = datetime.now(timezone.utc)
    port = procs.free_port()
    command, env = SYSTEMS["ours"].command(port, config)
    log = ROOT / "out" / "logs" / f"soak-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.log"
    with procs.running("ours", command, env, "/readyz", log, port) as server:
        result, samples = asyncio.run(_soak(server, concurrency, duration_s, interval_s))
        peak = procs.memory_mb(server.pid, "VmHWM")
    after = [(t, m) for t, m in samples if t >= warmup_s]
    return {
        "date": f"{started:%Y-%m-%d %H:%M UTC}",
        "duration_s": duration_s,
        "warmup_s": warmup_s,
        "concurrency": concurrency,
        "interval_s": interval_s,
        "samples": len(samples),
        "rss_start_mb": samples[0][1] if samples else float("nan"),
        "rss_after_warmup_mb": after[0][1] if after else float("nan"),
        "rss_end_mb": samples[-1][1] if samples else float("nan"),
        "peak_mb": peak,
        "slope_mb_per_min": slope_per_minute(after),
        **_floor_fit(after, samples[-1][0] if samples else 0.0),
        "minute_floors_mb": minute_floors(samples),
        "requests": result.completed,
        "requests_per_s": result.requests_per_s,
        "errors": result.errors,
        "series": samples,
    }


def render(r: dict, config: Config) -> str:
    errors = ", ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "none"
    floor, error = r["floor_slope_mb_per_min"], r["floor_slope_error"]
    # A trend counts when it is both outside twice its standard error and over 1 MB/min.
    significant = abs(floor) > 2 * error and abs(floor) >= 1.0
    verdict = ("no significant trend: no sign of a leak" if not significant else
               "rising: worth a look" if floor > 0 else "falling")
    floors = ", ".join(f"{mb:.0f}" for _, mb in r["minute_floors_mb"])
    return "\n".join([
        "## Memory soak (`python -m benchmarks.soak`)",
        "",
        f"- {r['date']}: our server, preset `{config.model}`, {config.rows} KV-cache rows, "
        f"{r['concurrency']} requests in flight for {r['duration_s'] / 60:.1f} min "
        f"({r['requests']} requests, {r['requests_per_s']:.2f} req/s, errors: {errors}); RSS of the server "
        f"process sampled every {r['interval_s']:.0f} s ({r['samples']} samples).",
        f"- RSS: {r['rss_start_mb']:.0f} MB at the start, {r['rss_after_warmup_mb']:.0f} MB after the "
        f"{r['warmup_s']:.0f} s warm-up, {r['rss_end_mb']:.0f} MB at the end; peak (VmHWM) "
        f"{r['peak_mb']:.0f} MB.",
        f"- Each minute's lowest RSS (the floor between prefills), MB: {floors}.",
        f"- **RSS slope after warm-up: {floor:+.2f} ± {error:.2f} MB/min through the per-minute floors** "
        f"({verdict}); "
        f"{r['slope_mb_per_min']:+.2f} MB/min by least squares through every sample after the warm-up, "
        "which the swing of each prefill's activations makes noisy.",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="60 s instead of 10 min")
    parser.add_argument("--duration", type=float, help="seconds under load (default 600; quick 60)")
    parser.add_argument("--warmup", type=float,
                        help="seconds excluded from the slope (default 120; quick 15)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between RSS samples")
    parser.add_argument("--model", default="bench")
    parser.add_argument("--rows", type=int, default=SERVER_ROWS,
                        help="KV-cache rows, PALIGEMMA_MAX_BATCH_SIZE (default: the server's default)")
    parser.add_argument("--results", type=Path, help="Markdown file whose `soak` section to rewrite "
                        "(default benchmarks/RESULTS.md; quick: benchmarks/out/RESULTS-quick.md)")
    parser.add_argument("--render", type=Path, help="only rewrite the section from a saved soak.json")
    args = parser.parse_args()
    config = Config(model=args.model, rows=args.rows)
    if args.render:
        import json

        saved = json.loads(args.render.read_text())
        if "date" not in saved:  # files from before the date was saved: written when the soak ended
            ended = datetime.fromtimestamp(args.render.stat().st_mtime - saved["duration_s"], timezone.utc)
            saved["date"] = f"{ended:%Y-%m-%d %H:%M UTC}"
        points = [tuple(p) for p in saved["series"]]
        after = [p for p in points if p[0] >= saved["warmup_s"]]
        saved["minute_floors_mb"] = minute_floors(points)
        saved.update(_floor_fit(after, points[-1][0]))
        markdown = render(saved, config)
        print(markdown)
        report.update_section(args.results or ROOT / "RESULTS.md", "soak", markdown)
        return
    duration = args.duration or (60.0 if args.quick else 600.0)
    warmup = args.warmup if args.warmup is not None else (15.0 if args.quick else 120.0)
    results = args.results or (ROOT / "out" / "RESULTS-quick.md" if args.quick else ROOT / "RESULTS.md")
    result = run(duration, warmup, args.concurrency, args.interval, config)
    markdown = render(result, config)
    print(markdown)
    report.update_section(results, "soak", markdown)
    out = ROOT / "out" / "soak.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    import json

    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
