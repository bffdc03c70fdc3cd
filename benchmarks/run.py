"""One command, one machine, one model: our server vs the model's ceiling vs peer servers.

    python -m benchmarks.run                 # full: N = 1, 4, 16, 64; about 35 min on 2 CPU cores
    python -m benchmarks.run --quick         # about 3 min: N = 1, 16, short windows (indicative only)
    python -m benchmarks.run --systems ours,ceiling --concurrency 1,64 --duration 30

Systems: `ceiling` (the server's engine in-process with N requests in flight, at every N measured:
benchmarks/ceiling.py), `ours` (python -m app), `ours_nocache` (the same with
PALIGEMMA_FEATURE_CACHE_SIZE=0), `tutorial`, `litserve`, `pipeline` (benchmarks/peers/). Ours runs with
the server's default KV-cache rows unless --rows says otherwise; LitServe with its own batch settings.
Every server binds 127.0.0.1 on a free port, runs in its own process group and is stopped (the whole
group) before the next one starts.
Raw results go to benchmarks/out/ (gitignored); a full run also rewrites its section of
benchmarks/RESULTS.md (a quick or partial run writes benchmarks/out/RESULTS-quick.md or
RESULTS-partial.md instead, unless --results says otherwise).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx

from app.settings import Settings
from benchmarks import procs, promstats, report
from benchmarks.loadgen import run_load
from benchmarks.systems import SERVER_ROWS, SYSTEMS, Config
from benchmarks.workload import PHOTO_SOURCES, Request, build_mix, describe_mix, skimage_available

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "out"
ALL_SYSTEMS = ("ceiling", "ours", "ours_nocache", "tutorial", "litserve", "pipeline")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="short windows, N = 1 and 16, no ours_nocache (~3 min)")
    parser.add_argument("--systems", help="comma-separated subset of " + ", ".join(ALL_SYSTEMS))
    parser.add_argument("--concurrency", help="comma-separated N (default 1,4,16,64; quick: 1,16)")
    parser.add_argument("--duration", type=float, help="measurement window per N, s (default 45; quick 6)")
    parser.add_argument("--warmup", type=float, help="warm-up before each window, s (default 15; quick 3)")
    parser.add_argument("--ceiling-duration", type=float,
                        help="ceiling window per N and mode, s (default 30; quick 6)")
    parser.add_argument("--ceiling-warmup", type=float,
                        help="ceiling warm-up per N and mode, s (default 10; quick 3)")
    parser.add_argument("--model", default="bench", help="preset for every system (default bench)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", type=int, default=SERVER_ROWS,
                        help="our KV-cache rows, PALIGEMMA_MAX_BATCH_SIZE (default: the server's, "
                        "%(default)s)")
    parser.add_argument("--litserve-batch-size", type=int, default=Config.litserve_max_batch_size,
                        help="LitServe's max_batch_size (default %(default)s)")
    parser.add_argument("--litserve-batch-wait-ms", type=float, default=Config.litserve_batch_timeout_ms,
                        help="LitServe's batch_timeout in ms (default %(default)s)")
    parser.add_argument("--photos", choices=PHOTO_SOURCES,
                        default="skimage" if skimage_available() else "synthetic",
                        help="the workload's pictures (synthetic only where scikit-image is missing)")
    parser.add_argument("--variants", type=int, default=16, help="rounds of the workload mix")
    parser.add_argument("--quiet-wait", type=float, help="before each system, wait up to this many s for "
                        "other processes to use < 0.3 cores (default 60; quick 0)")
    parser.add_argument("--retry-above", type=float, default=report.QUIET_CORES,
                        help="measure a level again when other processes took more than this many "
                        "cores during its window (default 0.25)")
    parser.add_argument("--retries", type=int, help="most extra attempts per level (default 1; quick 0)")
    parser.add_argument("--ceiling-again", action=argparse.BooleanOptionalAction, default=None,
                        help="measure the ceiling again after the servers, as a stability check "
                        "(default: on in full mode)")
    parser.add_argument("--results", type=Path, help="Markdown file to write the report into (default: "
                        "benchmarks/RESULTS.md for a complete full run, else benchmarks/out/RESULTS-quick.md "
                        "or RESULTS-partial.md)")
    parser.add_argument("--section", default="run", help="the file's section to rewrite (default run): "
                        "give a partial run its own section instead of replacing the full run's")
    parser.add_argument("--merge-into", type=Path, metavar="RUN_JSON",
                        help="an earlier run's raw benchmarks/out/run-*.json: measure --systems again "
                        "(at its concurrencies and windows unless told) and report that run with these "
                        "systems replaced, saying which were measured when (for systems whose windows "
                        "other processes disturbed)")
    args = parser.parse_args(argv)
    base = json.loads(args.merge_into.read_text())["meta"] if args.merge_into else None
    if base:
        args.concurrency = args.concurrency or ",".join(map(str, base["concurrency"]))
        args.duration = args.duration or base["duration_s"]
        args.warmup = args.warmup if args.warmup is not None else base["warmup_s"]
        args.ceiling_duration = args.ceiling_duration or base["ceiling_duration_s"]
        if args.ceiling_warmup is None:
            args.ceiling_warmup = base["ceiling_warmup_s"]
    systems = args.systems or ",".join(s for s in ALL_SYSTEMS if not (args.quick and s == "ours_nocache"))
    args.systems = [s.strip() for s in systems.split(",") if s.strip()]
    unknown = set(args.systems) - set(ALL_SYSTEMS)
    if unknown:
        parser.error(f"unknown systems: {', '.join(sorted(unknown))}")
    defaults = (("1,16", 6.0, 3.0, 6.0, 3.0) if args.quick else ("1,4,16,64", 45.0, 15.0, 30.0, 10.0))
    args.concurrency = [int(n) for n in (args.concurrency or defaults[0]).split(",")]
    args.duration = args.duration or defaults[1]
    args.warmup = args.warmup if args.warmup is not None else defaults[2]
    args.ceiling_duration = args.ceiling_duration or defaults[3]
    args.ceiling_warmup = args.ceiling_warmup if args.ceiling_warmup is not None else defaults[4]
    if args.quiet_wait is None:
        args.quiet_wait = 0.0 if args.quick else 60.0
    if args.retries is None:
        args.retries = 0 if args.quick else 1
    if args.ceiling_again is None:
        args.ceiling_again = not args.quick
    if args.results is None and base:
        args.results = OUT / "RESULTS-quick.md" if base["quick"] else ROOT / "RESULTS.md"
    if args.results is None:
        # Only a complete full run replaces the published results; partial or quick runs (a subset of
        # systems or concurrencies, shorter windows) report next to their raw JSON instead.
        complete = (not args.quick and set(args.systems) == set(ALL_SYSTEMS)
                    and {1, 64} <= set(args.concurrency) and args.duration >= 30)
        args.results = ROOT / "RESULTS.md" if complete else OUT / ("RESULTS-quick.md" if args.quick
                                                                   else "RESULTS-partial.md")
    return args


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal:"))
    versions = {}
    for package in ("torch", "transformers", "fastapi", "uvicorn", "litserve", "httpx"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gb": mem_kb * 1024 / 1e9,
            "python": platform.python_version(), "versions": versions, **_git_state()}


def _git_state() -> dict[str, Any]:
    """Read-only: which commit was measured, and whether the server code had local changes."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT.parent, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"commit": git("rev-parse", "--short", "HEAD") or "unknown",
            "app_dirty": bool(git("status", "--porcelain", "--", "app"))}


def settle(args: argparse.Namespace, what: str) -> None:
    if args.quiet_wait > 0:
        other = procs.wait_until_quiet(args.quiet_wait)
        print(f"[{what}] other processes use {other:.2f} cores before the start", flush=True)


def run_ceiling(args: argparse.Namespace, stamp: str, tag: str = "") -> dict[str, Any]:
    """The ceiling in a child process, so its torch threads never overlap a server's."""
    settle(args, "ceiling")
    out = OUT / f"ceiling{tag}-{stamp}.json"
    command = [procs.python(), "-m", "benchmarks.ceiling", "--model", args.model, "--seed", str(args.seed),
               "--concurrency", ",".join(map(str, args.concurrency)), "--rows", str(args.rows),
               "--duration", str(args.ceiling_duration), "--warmup", str(args.ceiling_warmup),
               "--variants", str(args.variants), "--photos", args.photos, "--out", str(out)]
    print(f"[ceiling] N = {args.concurrency}, {args.ceiling_warmup:.0f} + {args.ceiling_duration:.0f} s each "
          "per mode", flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, cwd=ROOT.parent, timeout=3600)
    result = json.loads(out.read_text())
    for row in result["results"]:
        print(f"[ceiling] {row['mode']} N={row['concurrency']}: {row['requests_per_s']:.2f} req/s "
              f"(other processes: {row['cpu']['other_cores']:.2f} cores)", flush=True)
    return result


def run_system(name: str, args: argparse.Namespace, config: Config, mix: list[Request],
               stamp: str) -> dict[str, Any]:
    system = SYSTEMS[name]
    port = procs.free_port()
    command, env = system.command(port, config)
    entry: dict[str, Any] = {"title": system.title, "command": shlex.join(command), "env": env, "levels": []}
    log_path = OUT / "logs" / f"{name}-{stamp}.log"
    settle(args, name)
    started = time.perf_counter()
    try:
        with procs.running(name, command, env, system.ready_path, log_path, port) as server:
            entry["startup_s"] = time.perf_counter() - started
            print(f"[{name}] ready in {entry['startup_s']:.1f} s (pid {server.pid})", flush=True)
            if name == "ours":
                entry["models"] = httpx.get(server.base_url + "/v1/models", timeout=10).json()
            index = 0
            for concurrency in args.concurrency:
                attempts: list[dict[str, Any]] = []
                # On a shared machine another process can take a core mid-window; torch's 2-thread
                # team then stalls far more than a 1/2 share would suggest. Measure such a level
                # again and keep the quieter attempt (the other stays in the raw JSON).
                while len(attempts) <= args.retries:
                    level = asyncio.run(measure_level(server, system.scrape_metrics, mix, concurrency,
                                                      args.warmup, args.duration, index))
                    index += level.pop("sent")
                    attempts.append(level)
                    _print_level(name, level)
                    if _other_cores(level) <= args.retry_above:
                        break
                    if len(attempts) <= args.retries:
                        print(f"[{name}] N={concurrency}: other processes took {_other_cores(level):.2f} "
                              "cores: measuring again", flush=True)
                level = min(attempts, key=_other_cores)
                level["discarded_attempts"] = [_without_samples(a) for a in attempts if a is not level]
                entry["levels"].append(level)
    except Exception as exc:  # one system failing must not lose the others' results
        entry["error"] = f"{type(exc).__name__}: {exc}"
        print(f"[{name}] FAILED: {entry['error']}", file=sys.stderr, flush=True)
    entry["log"] = str(log_path)
    return entry


def _other_cores(level: dict[str, Any]) -> float:
    return float(level.get("cpu", {}).get("other_cores", 0.0))


def _without_samples(level: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in level.items() if k != "samples"}


def _print_level(name: str, level: dict[str, Any]) -> None:
    print(f"[{name}] N={level['concurrency']}: {level['requests_per_s']:.2f} req/s, "
          f"p50 {level['latency_ms']['p50']:.0f} ms, errors {level['errors'] or 0}, "
          f"peak {level['peak_mb']:.0f} MB, other processes {_other_cores(level):.2f} cores", flush=True)


async def measure_level(server: procs.Server, scrape: bool, mix: list[Request], concurrency: int,
                        warmup_s: float, duration_s: float, start_index: int) -> dict[str, Any]:
    """One closed-loop window against a running server: the load generator's figures, the CPU taken by
    the server and by other processes, memory, and (`scrape`: our server) what its /metrics says about
    the window. `sent` is how many requests of the sequence it used; `samples` every request's timing."""
    scrapes: dict[str, promstats.Scrape] = {}
    load: list[float] = []

    meters: list[procs.CpuMeter] = []
    cpu: dict[str, float] = {}

    async def at_start() -> None:
        meters.append(procs.CpuMeter(server.pid))
        if scrape:
            scrapes["before"] = await promstats.scrape(server.base_url)

    async def at_end() -> None:
        load.append(procs.loadavg())
        cpu.update(meters[0].stop())
        if scrape:
            scrapes["after"] = await promstats.scrape(server.base_url)

    result = await run_load(server.base_url, mix, concurrency, warmup_s, duration_s,
                            start_index=start_index, on_window_start=at_start, on_window_end=at_end)
    level = result.to_json()
    level["loadavg"] = load[0] if load else None
    level["cpu"] = cpu
    level["peak_mb"] = procs.memory_mb(server.pid, "VmHWM")
    level["rss_mb"] = procs.memory_mb(server.pid, "VmRSS")
    if "before" in scrapes and "after" in scrapes:
        level["server_metrics"] = promstats.window_summary(scrapes["before"], scrapes["after"])
    samples = [(s.task, round(s.start, 4), round(s.end, 4), s.status) for s in result.samples]
    level["samples"] = samples  # moved to the samples file by main()
    return level


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    config = Config(args.model, args.seed, args.rows, litserve_max_batch_size=args.litserve_batch_size,
                    litserve_batch_timeout_ms=args.litserve_batch_wait_ms)
    print(f"building the workload ({args.variants} variants, {args.photos} photos)...", flush=True)
    mix = build_mix(args.variants, photos=args.photos)
    command = "python -m benchmarks.run " + shlex.join(argv if argv is not None else sys.argv[1:])
    results: dict[str, Any] = {
        "meta": {
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": command.strip(),
            "quick": args.quick,
            "concurrency": args.concurrency,
            "warmup_s": args.warmup,
            "duration_s": args.duration,
            "ceiling_duration_s": args.ceiling_duration,
            "ceiling_warmup_s": args.ceiling_warmup,
            "config": asdict(config),
            "server_defaults": {"rows": SERVER_ROWS,
                                "prefill_tokens": Settings.model_fields["prefill_tokens"].default,
                                "feature_cache_size": Settings.model_fields["feature_cache_size"].default},
            "photos": args.photos,
            "machine": machine_info(),
            "mix": describe_mix(mix),
            "parameters": "",
        },
        "ceiling": None,
        "systems": {},
    }
    started = time.perf_counter()
    if "ceiling" in args.systems:
        try:
            results["ceiling"] = run_ceiling(args, stamp)
            results["meta"]["parameters"] = f"{results['ceiling']['parameters'] / 1e6:.1f} M parameters"
        except (subprocess.SubprocessError, OSError, ValueError) as exc:
            print(f"[ceiling] FAILED: {exc}", file=sys.stderr)
    for name in args.systems:
        if name != "ceiling":
            results["systems"][name] = run_system(name, args, config, mix, stamp)
    # Measure the ceiling again after the servers: always in full mode (a stability check), and whenever
    # other processes took CPU during the first measurement and retries are allowed.
    disturbed = any(row["cpu"]["other_cores"] > args.retry_above
                    for row in (results["ceiling"] or {}).get("results", []))
    if results["ceiling"] and (args.ceiling_again or (disturbed and args.retries > 0)):
        try:
            results["ceiling_again"] = run_ceiling(args, stamp, "-again")
        except (subprocess.SubprocessError, OSError, ValueError) as exc:
            print(f"[ceiling] FAILED again: {exc}", file=sys.stderr)
    if not results["meta"]["parameters"] and "models" in results["systems"].get("ours", {}):
        parameters = results["systems"]["ours"]["models"]["data"][0]["parameters"]
        results["meta"]["parameters"] = f"{parameters / 1e6:.1f} M parameters"
    results["meta"]["wall_s"] = time.perf_counter() - started
    samples = {name: {str(level["concurrency"]): level.pop("samples") for level in entry["levels"]}
               for name, entry in results["systems"].items()}
    results["summary"] = report.summarise(results)
    raw = OUT / f"run-{stamp}.json"
    raw.write_text(json.dumps(results, indent=2))
    (OUT / f"samples-{stamp}.json").write_text(json.dumps(samples))
    if args.merge_into:  # this run's own measurements stay in its raw file; the report is of the merge
        results = merge(json.loads(args.merge_into.read_text()), results)
        results["summary"] = report.summarise(results)
        raw = OUT / f"run-{stamp}-merged.json"
        raw.write_text(json.dumps(results, indent=2))
    markdown = report.render_run(results)
    report.update_section(args.results, args.section, markdown)
    print("\n" + markdown)
    print(f"\nraw results: {raw}; report: {args.results}; "
          f"wall time {results['meta']['wall_s'] / 60:.1f} min")
    return results


def merge(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """`base` with the systems of `new` in place of its own, and `new`'s ceiling measurements added to
    its own; meta says which were measured again, when and by which command."""
    merged = {**base, "systems": dict(base["systems"]), "meta": dict(base["meta"])}
    for name, entry in new["systems"].items():
        merged["systems"][name] = {**entry, "measured": new["meta"]["date"]}
    measured = list(new["systems"])
    # Ceiling measurements are added, not replaced: the report averages every quiet one of them.
    runs = list(base["meta"].get("ceiling_runs", []))
    for key, when in (("ceiling", "measured again"), ("ceiling_again", "measured again, after the servers")):
        if new.get(key):
            name = f"{key}_{len(base['meta'].get('remeasured', [])) + 1}"
            merged[name] = new[key]
            runs.append([name, f"{when} ({new['meta']['date']})"])
    if new.get("ceiling"):
        measured.insert(0, "ceiling")
    merged["meta"]["ceiling_runs"] = runs
    merged["meta"]["remeasured"] = [*base["meta"].get("remeasured", []), {
        "date": new["meta"]["date"], "command": new["meta"]["command"], "systems": measured,
        "commit": new["meta"]["machine"]["commit"], "app_dirty": new["meta"]["machine"]["app_dirty"]}]
    return merged


if __name__ == "__main__":
    main()
