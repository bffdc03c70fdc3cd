"""Turning a run's raw results into the comparisons and the Markdown of RESULTS.md.

RESULTS.md is shared by several scripts (run, soak, image_prep, placement, exif, gpu); each owns one
section between `<!-- BEGIN name -->` and `<!-- END name -->` markers and replaces only that section.
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# The step engine's CPU targets (issue 8): served req/s at N in flight >= 0.9 x the in-process ceiling
# at the same N, at every N from 4 up; p50 at 1 in flight no worse than the static batcher's.
TARGET_EFFICIENCY = 0.9
EFFICIENCY_FROM = 4
# The static batcher's p50 at 1 in flight as RESULTS.md recorded it (full run of 2026-11-28 03:56 UTC,
# commit 7348637, this machine, the same workload), by system.
STATIC_P50_AT_1_MS = {"ours": 293.0, "ours_nocache": 315.0}
# Targets of the earlier benchmark issue ("Performance: a benchmark against the peers"), still reported.
TARGET_GAIN_REALISED = 0.85  # share of the batching gain realised over the tutorial server
TARGET_VS_LITSERVE = 1.2  # ours / LitServe at the top concurrency
TARGET_P50_AT_1 = 1.15  # ours / tutorial p50 at 1 in flight, at most

# Ceiling modes (benchmarks/ceiling.py): the server's own path (image keys and its feature cache), and
# the same without the cache (matches `ours_nocache`).
SERVER_PATH = "server_path"
NO_CACHE = "no_cache"
CEILING_MODE = {"ours": SERVER_PATH, "ours_nocache": NO_CACHE}
MIN_GAIN = 1.05  # a batching gain below this makes "the share of the gain realised" undefined
# Other processes' CPU (cores) up to which a measurement counts as undisturbed (run.py's --retry-above).
QUIET_CORES = 0.25

SECTION_ORDER = ("run", "sampling", "served_sampling", "step_overhead", "image_prep", "placement", "exif",
                 "soak", "adapters", "quantization-weights", "quantization-layers", "quantization-speed",
                 "quantization-accuracy", "gpu", "gpu_adapters", "gpu-quantized")


def _level(results: dict[str, Any], system: str, concurrency: int) -> dict[str, Any] | None:
    entry = results["systems"].get(system)
    if not entry:
        return None
    for level in entry.get("levels", []):
        if level["concurrency"] == concurrency:
            return level
    return None


def _rps(results: dict[str, Any], system: str, concurrency: int) -> float | None:
    level = _level(results, system, concurrency)
    return level["requests_per_s"] if level and level["completed"] else None


def _other(row: dict[str, Any]) -> float:
    return float(row.get("cpu", {}).get("other_cores", 0.0))


def _ceiling_runs(results: dict[str, Any]) -> list[tuple[str, str]]:
    """(key, label) of every ceiling measurement of the results: before and after the servers, and any
    added by measuring again (run.py --merge-into)."""
    runs = [("ceiling", "before the servers"), ("ceiling_again", "again after them")]
    return runs + [(key, label) for key, label in results["meta"].get("ceiling_runs", [])]


def _ceiling_rows(results: dict[str, Any], concurrency: int, mode: str) -> list[dict[str, Any]]:
    """The ceiling measurements used, of all runs: all those during which other processes took at most
    QUIET_CORES (averaged), else the one where they took the least."""
    rows = [row for key, _ in _ceiling_runs(results) for row in (results.get(key) or {}).get("results", [])
            if row["concurrency"] == concurrency and row["mode"] == mode]
    quiet = [row for row in rows if _other(row) <= QUIET_CORES]
    return quiet or ([min(rows, key=_other)] if rows else [])


def _ceiling(results: dict[str, Any], concurrency: int, mode: str) -> float | None:
    rows = _ceiling_rows(results, concurrency, mode)
    return sum(row["requests_per_s"] for row in rows) / len(rows) if rows else None


def _gain_realised(ours: float | None, tutorial: float | None, gain: float | None) -> float | None:
    """(ours / tutorial - 1) / (gain - 1); undefined when batching gains (almost) nothing."""
    ratio = _ratio(ours, tutorial)
    # Below a 5 % gain the denominator is noise and the ratio means nothing: leave it undefined.
    if ratio is None or gain is None or gain < MIN_GAIN:
        return None
    return (ratio - 1) / (gain - 1)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def check(value: float | None, target: float | None, at_most: bool = False) -> dict[str, Any]:
    """A target's verdict: met, not met, or None when either number is missing."""
    met = None if value is None or target is None else (value <= target if at_most else value >= target)
    return {"value": value, "target": target, "at_most": at_most, "met": met}


def _efficiency(results: dict[str, Any], system: str) -> list[dict[str, Any]]:
    """Served req/s / ceiling req/s at every level, with the target where it applies (N >= 4)."""
    mode = CEILING_MODE[system]
    rows = []
    for n in results["meta"]["concurrency"]:
        served, ceiling = _rps(results, system, n), _ceiling(results, n, mode)
        disturbed = any(_other(row) > QUIET_CORES for row in _ceiling_rows(results, n, mode))
        target = TARGET_EFFICIENCY if n >= EFFICIENCY_FROM else None
        rows.append({"concurrency": n, "served": served, "ceiling": ceiling, "ceiling_disturbed": disturbed,
                     **check(_ratio(served, ceiling), target)})
    return rows


def _p50(results: dict[str, Any], system: str, concurrency: int) -> float | None:
    level = _level(results, system, concurrency)
    return level["latency_ms"]["p50"] if level and level["completed"] else None


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    """The ratios the issues ask for, each with its target and whether it is met (None: not measured)."""
    levels = results["meta"]["concurrency"]
    top, low = max(levels), min(levels)
    ours_top, tutorial_top = _rps(results, "ours", top), _rps(results, "tutorial", top)
    gain = _ratio(_ceiling(results, top, SERVER_PATH), _ceiling(results, low, SERVER_PATH))
    plain_gain = _ratio(_ceiling(results, top, NO_CACHE), _ceiling(results, low, NO_CACHE))
    nocache_top = _rps(results, "ours_nocache", top)
    ours = [system for system in CEILING_MODE if system in results["systems"]]
    efficiency = {system: _efficiency(results, system) for system in ours}
    # The p50 target compares with the static batcher at 1 in flight; at another lowest level: no target.
    p50_static = {system: check(_p50(results, system, low),
                                 STATIC_P50_AT_1_MS[system] if low == 1 else None, at_most=True)
                  for system in ours}
    p50_ratio = _ratio(_p50(results, "ours", low), _p50(results, "tutorial", low))
    verdicts = [row["met"] for row in efficiency.get("ours", []) if row["target"] is not None]
    return {
        "top_concurrency": top,
        "low_concurrency": low,
        "efficiency": efficiency,
        # The CPU target for our server: every level from 4 up, and p50 at 1.
        "efficiency_met": (None if not verdicts or None in verdicts else all(verdicts)),
        "p50_vs_static": p50_static,
        "batching_gain": gain,
        "ours_over_tutorial": _ratio(ours_top, tutorial_top),
        "gain_realised": check(_gain_realised(ours_top, tutorial_top, gain), TARGET_GAIN_REALISED),
        "no_cache_batching_gain": plain_gain,
        "no_cache_gain_realised": check(_gain_realised(nocache_top, tutorial_top, plain_gain),
                                         TARGET_GAIN_REALISED),
        "ours_over_litserve": check(_ratio(ours_top, _rps(results, "litserve", top)), TARGET_VS_LITSERVE),
        "p50_low_ours_over_tutorial": check(p50_ratio, TARGET_P50_AT_1, at_most=True),
    }


def fmt(value: float | None, digits: int = 2) -> str:
    """A number for a table: `digits` decimals, or n/a when it was not measured."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _met(check: dict[str, Any]) -> str:
    return {True: "**met**", False: "**not met**", None: "not measured"}[check["met"]]


def _errors(level: dict[str, Any]) -> str:
    errors = level["errors"]
    return ", ".join(f"{k}: {v}" for k, v in sorted(errors.items())) if errors else "0"


def render_run(results: dict[str, Any]) -> str:
    meta = results["meta"]
    config, defaults = meta["config"], meta["server_defaults"]
    lines = [
        "## Served throughput and latency" + (" (QUICK MODE: short windows, indicative only)"
                                              if meta["quick"] else ""),
        "",
        f"- Date: {meta['date']}; command: `{meta['command']}`",
        f"- Machine: {meta['machine']['cpu']}, {meta['machine']['cores']} cores, "
        f"{meta['machine']['ram_gb']:.1f} GB RAM, no GPU; Python {meta['machine']['python']}; "
        + ", ".join(f"{k} {v}" for k, v in meta["machine"]["versions"].items()),
        f"- Code: commit {meta['machine']['commit']}"
        + (" with uncommitted changes under app/" if meta["machine"]["app_dirty"] else ""),
        *(f"- Measured again on {again['date']} (`{again['command']}`, commit {again['commit']}"
          + (" with uncommitted changes under app/" if again["app_dirty"] else "")
          + f"): {', '.join(again['systems'])}; their tables below are from that run (other processes "
          "took CPU during their first windows)." for again in meta.get("remeasured", [])),
        f"- Model: preset `{config['model']}` (seed {config['seed']}, {meta['parameters']}), float32 on the "
        "CPU, the same weights in every system. Ours: the step engine with "
        f"{config['rows']} KV-cache rows (PALIGEMMA_MAX_BATCH_SIZE"
        + (", the server's default" if config["rows"] == defaults["rows"] else "")
        + f"), at most {defaults['prefill_tokens']} prompt tokens prefilled per step "
        "(PALIGEMMA_PREFILL_TOKENS, default), no batch wait (a request joins at the next step). LitServe: "
        f"its own batching, max_batch_size {config['litserve_max_batch_size']}, batch_timeout "
        f"{config['litserve_batch_timeout_ms']:g} ms. Queue timeout {config['request_timeout_s']:g} s.",
        "- Load: closed loop (asyncio + httpx), N requests always in flight; "
        f"{meta['warmup_s']:.0f} s warm-up, then a {meta['duration_s']:.0f} s window (requests finishing in "
        "it count), then the in-flight requests are drained. Each server is started fresh, then "
        "measured at every N in turn.",
        f"- Workload: {_mix_text(meta['mix'], meta.get('photos', 'skimage'))}",
        "- The random-weight preset never emits <eos>: every request generates exactly its max_new_tokens "
        "(16 for caption/vqa, 32 for detect/segment) on every system; the load generator checks the "
        "`completion_tokens` our server, the tutorial server and LitServe report (the pipeline returns "
        "text only).",
        "- Peak MB: VmHWM of the server process, summed over its process group for multi-process "
        "servers (LitServe: API server, inference worker, queue manager), read after each N, so it is "
        "the peak so far.",
        "- The machine is shared: `other cores` is the CPU time that processes other than the server and "
        "the load generator used during the window, in cores (of 2), from /proc/stat. Where it is well "
        "above 0, the system had less than the whole machine and its numbers are pessimistic; compare "
        "systems only where it is similar.",
        "",
    ]
    if results.get("ceiling"):
        lines += _ceiling_table(results)
    for name, entry in results["systems"].items():
        lines += _system_lines(name, entry)
    lines += _summary_lines(results["summary"], results)
    return "\n".join(lines)


def _ceiling_table(results: dict[str, Any]) -> list[str]:
    lines = ["### Ceiling: the server's engine in-process, N in flight, prepared tensors, no HTTP", "",
             "`benchmarks/ceiling.py`: the server's `EngineCore` + `ModelStepRunner` + `Scheduler`, built "
             "from the same settings, stepped in one thread; N requests always in flight (a finished one is "
             "replaced by the next of the workload at once, joining at the next step); images and prompts "
             f"prepared beforehand by the server's own functions. Window {_ceiling_window(results)}. "
             "`server path`: the server's feature cache, as `ours` runs; `no cache`: feature cache size 0, "
             "as `ours_nocache` runs. Step times and rows come from the engine's own observer hooks (what "
             "feeds /metrics); `engine busy` is the share of the window spent inside model steps (steps "
             "that began in the warm-up count too, so it can pass 100 %). Each mode and N was measured "
             "before and after the servers (and again where said); the comparisons use the mean of the "
             f"measurements during which other processes took at most {QUIET_CORES} cores (**used**), or "
             "else the quietest one.", "",
             "| run | mode | in flight | req/s | tokens/s | p50 ms | decode steps | mean decode rows | "
             "decode step ms (median) | prefill steps (mean rows) | prefill step ms (median) | engine busy | "
             "other cores |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, tag in _ceiling_runs(results):
        for row in (results.get(key) or {}).get("results", []):
            used = any(row is r for r in _ceiling_rows(results, row["concurrency"], row["mode"]))
            d, p = row["decode"], row["prefill"]
            lines.append(f"| {tag}{' (**used**)' if used else ''} | {row['mode'].replace('_', ' ')} | "
                         f"{row['concurrency']} | {fmt(row['requests_per_s'])} | "
                         f"{fmt(row['tokens_per_s'], 1)} | "
                         f"{fmt(row['latency_ms']['p50'], 0)} | {d['steps']} | {fmt(d['rows_mean'], 1)} | "
                         f"{fmt(d['ms_median'], 1)} | {p['steps']} ({fmt(p['rows_mean'], 1)}) | "
                         f"{fmt(p['ms_median'], 0)} | {row['busy']:.0%} | {fmt(_other(row))} |")
    return [*lines, ""]


def _ceiling_window(results: dict[str, Any]) -> str:
    rows = (results.get("ceiling") or {}).get("results", [])
    if not rows:
        return "n/a"
    return f"{rows[0]['warmup_s']:.0f} s warm-up, then {rows[0]['duration_s']:.0f} s per mode and N"


def _system_lines(name: str, entry: dict[str, Any]) -> list[str]:
    again = f" (measured again, {entry['measured']})" if "measured" in entry else ""
    lines = [f"### {entry['title']}{again}", ""]
    if entry.get("error"):
        lines += [f"Failed: {entry['error']}", ""]
    if not entry.get("levels"):
        return lines
    lines += ["| in flight | req/s | p50 ms | p90 ms | p99 ms | errors | peak MB | server cores | "
              "other cores |", "|---|---|---|---|---|---|---|---|---|"]
    for level in entry["levels"]:
        lat, cpu = level["latency_ms"], level.get("cpu", {})
        n = f"{level['concurrency']}" + (" (retried)" if level.get("discarded_attempts") else "")
        lines.append(
            f"| {n} | {fmt(level['requests_per_s'])} | {fmt(lat['p50'], 0)} | "
            f"{fmt(lat['p90'], 0)} | {fmt(lat['p99'], 0)} | {_errors(level)} | {fmt(level['peak_mb'], 0)} | "
            f"{fmt(cpu.get('server_cores'))} | {fmt(cpu.get('other_cores'))} |")
    for level in entry["levels"]:
        for attempt in level.get("discarded_attempts") or []:
            lines.append(f"\nN={level['concurrency']} was measured again: its first window had "
                         f"{fmt(attempt['cpu'].get('other_cores'))} cores taken by other processes "
                         f"({fmt(attempt['requests_per_s'])} req/s, p50 "
                         f"{fmt(attempt['latency_ms']['p50'], 0)} ms); the table shows the quieter attempt.")
    mismatches = sum(level["token_mismatches"] for level in entry["levels"])
    if mismatches:
        lines.append(f"\n{mismatches} responses reported a completion_tokens other than max_new_tokens.")
    lines.append("")
    if name.startswith("ours"):
        lines += _server_metrics_table(entry["levels"])
    return lines


def _mix_text(mix: dict[str, Any], photos: str) -> str:
    names = ", ".join(f"{p['name']} {p['width']}x{p['height']} ({p['jpeg_bytes'] // 1000} kB)"
                      for p in mix["photos"])
    tasks = ", ".join(f"{k} {v}" for k, v in mix["tasks"].items())
    source = ("from scikit-image's bundled data" if photos == "skimage"
              else "as SYNTHETIC stand-ins (scikit-image was not installed)")
    return (f"a sequence of {mix['requests']} requests ({tasks}) over {mix['distinct_images']} distinct "
            f"JPEGs: the photos {names} {source}, each in 16 variants shifted by a few "
            "pixels; each image is asked 1 to 4 questions back to back (a session), and sessions are "
            f"shuffled. Mean max_new_tokens {mix['mean_new_tokens']:.1f}.")


def _server_metrics_table(levels: list[dict[str, Any]]) -> list[str]:
    rows = [level for level in levels if level.get("server_metrics")]
    if not rows:
        return []
    lines = ["Our server's /metrics over each window (difference of two scrapes: the steps that ended in "
             "the window). Decode rows from `paligemma_step_rows{phase=\"decode\"}` (bucket upper bound: "
             "steps); `worker in steps` = summed step durations / window.", "",
             "| in flight | decode steps | mean decode rows | decode rows (bucket: steps) | decode step ms | "
             "prefill steps | mean prefill rows | prefill step ms | worker in steps | queue wait ms | "
             "first token ms | cache hits |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for level in rows:
        m = level["server_metrics"]
        dist = ", ".join(f"<={float(k):g}: {v:.0f}" for k, v in m["decode_rows_distribution"].items())
        busy = m["step_busy_s"] / level["duration_s"]
        lines.append(f"| {level['concurrency']} | {m['decode_steps']:.0f} | "
                     f"{fmt(m['mean_decode_rows'], 1)} | {dist} | {fmt(m['mean_decode_step_ms'], 1)} | "
                     f"{m['prefill_steps']:.0f} | "
                     f"{fmt(m['mean_prefill_rows'], 1)} | {fmt(m['mean_prefill_step_ms'], 0)} | {busy:.0%} | "
                     f"{fmt(m['mean_queue_wait_ms'], 0)} | {fmt(m['mean_time_to_first_token_ms'], 0)} | "
                     f"{m['feature_cache_hits']:.0f} |")
    return [*lines, ""]


def _verdict(check: dict[str, Any], gain: float | None = None, disturbed: bool = False) -> str:
    if check["target"] is None:
        return "(no target)"
    if disturbed:
        return "no verdict: ceiling measured while other processes took CPU"
    if check["value"] is None and gain is not None and gain < MIN_GAIN:
        return f"undefined: batching gains under {MIN_GAIN}x here"
    return _met(check)


def _summary_lines(summary: dict[str, Any], results: dict[str, Any]) -> list[str]:
    top, low = summary["top_concurrency"], summary["low_concurrency"]
    lines = ["### Against the targets", "",
             f"Efficiency = served req/s at N in flight / the in-process ceiling at the same N (same rows, "
             f"same mode); target (issue 8, CPU): >= {TARGET_EFFICIENCY} at every N from {EFFICIENCY_FROM} "
             "up.", "",
             "| system | in flight | served req/s | ceiling req/s | efficiency | target | verdict |",
             "|---|---|---|---|---|---|---|"]
    for system, rows in summary["efficiency"].items():
        for row in rows:
            target = f">= {row['target']}" if row["target"] is not None else ""
            lines.append(f"| {system} | {row['concurrency']} | {fmt(row['served'])} | "
                         f"{fmt(row['ceiling'])} | {fmt(row['value'])} | {target} | "
                         f"{_verdict(row, disturbed=row['ceiling_disturbed'])} |")
    met = summary["efficiency_met"]
    lines += ["", "Our server's efficiency target (every N from 4 up): "
              + {True: "**met**", False: "**not met**", None: "not measured"}[met] + ".", "",
              "| measure | value | target | verdict |", "|---|---|---|---|"]
    for system, check in summary["p50_vs_static"].items():
        target = f"<= {check['target']:g} ms (static batching)" if check["target"] is not None else ""
        lines.append(f"| {system}: p50 at {low} in flight, ms | {fmt(check['value'], 0)} | {target} | "
                     f"{_verdict(check)} |")
    gain, lit, p50 = (summary[k] for k in ("gain_realised", "ours_over_litserve",
                                           "p50_low_ours_over_tutorial"))
    plain, plain_gain = summary["no_cache_gain_realised"], summary["no_cache_batching_gain"]
    lines += [
        f"| ours@{top} / tutorial@{top} (req/s) | {fmt(summary['ours_over_tutorial'])}x | | |",
        f"| batching gain realised: (ours@{top} / tutorial@{top} - 1) / (ceiling@{top} / ceiling@{low} - 1), "
        f"ceiling gain {fmt(summary['batching_gain'])}x | {fmt(gain['value'])} | >= {gain['target']} | "
        f"{_verdict(gain, summary['batching_gain'])} |",
        f"| the same, feature cache off (ceiling gain {fmt(plain_gain)}x) | "
        f"{fmt(plain['value'])} | >= {plain['target']} | {_verdict(plain, plain_gain)} |",
        f"| ours@{top} / LitServe@{top} (req/s) | {fmt(lit['value'])}x | >= {lit['target']}x | "
        f"{_met(lit)} |",
        f"| p50 at {low} in flight: ours / tutorial | {fmt(p50['value'])} | <= {p50['target']} | "
        f"{_met(p50)} |",
        "",
        "The p50 target compares with the static batcher's p50 at 1 in flight as this file recorded it "
        "(2026-11-28, commit 7348637). The gain, LitServe and tutorial rows are the earlier benchmark "
        "issue's targets. The batching gain realised is the share of the speed-up that batching makes "
        f"possible on this machine (ceiling@{top} / ceiling@{low} - 1, both in-process) which our server "
        f"delivers over the tutorial server at {top} in flight (ours / tutorial - 1): 1.0 means all of it. "
        "It can pass 1 where the tutorial server also loses time outside the model (decoding 12 MP photos "
        "at full size) that our server avoids, or re-encodes images whose features our server reuses.",
        "",
    ]
    return lines


def median_ms(fn: Callable[[], object], repeats: int,
              clock: Callable[[], float] = time.perf_counter) -> float:
    """Median time of `repeats` calls by `clock` (wall time unless told), in ms, after one warm-up call
    (first-call costs such as plugin imports and allocator growth are not per-request costs)."""
    fn()
    times = []
    for _ in range(repeats):
        started = clock()
        fn()
        times.append(clock() - started)
    return statistics.median(times) * 1000


def add_section_arguments(parser: argparse.ArgumentParser, section: str, quiet_wait_s: float) -> None:
    """--results (the RESULTS.md whose `section` to rewrite) and --quiet-wait, as every section script has."""
    parser.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "RESULTS.md",
                        help=f"Markdown file whose `{section}` section to rewrite ('-' for none)")
    parser.add_argument("--quiet-wait", type=float, default=quiet_wait_s, help="first wait up to this many s "
                        "for other processes to use < 0.3 cores (the machine may be shared)")


def wait_if_asked(args: argparse.Namespace) -> None:
    if args.quiet_wait > 0:
        from benchmarks.procs import wait_until_quiet

        wait_until_quiet(args.quiet_wait)


def save_raw(name: str, data: object) -> Path:
    """Write a benchmark's raw results as benchmarks/out/<name>.json (gitignored); the path."""
    import json

    path = Path(__file__).resolve().parent / "out" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str))
    return path


def publish(args: argparse.Namespace, section: str, markdown: str) -> None:
    """Print the section and write it into --results unless that is '-'."""
    print(markdown)
    if str(args.results) != "-":
        update_section(args.results, section, markdown)


def update_section(path: Path, name: str, body: str, title: str = "# Benchmark results") -> None:
    """Replace (or add) the section `name` of the Markdown file at `path`, keeping the others."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    text = path.read_text() if path.exists() else f"{title}\n"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else _insert_in_order(text, name, block)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.rstrip() + "\n")


def _insert_in_order(text: str, name: str, block: str) -> str:
    """Put a new section before the first existing section that comes after it in SECTION_ORDER."""
    rank = SECTION_ORDER.index(name) if name in SECTION_ORDER else len(SECTION_ORDER)
    for later in SECTION_ORDER[rank + 1:]:
        marker = f"<!-- BEGIN {later} -->"
        if marker in text:
            return text.replace(marker, f"{block}\n\n{marker}", 1)
    return f"{text.rstrip()}\n\n{block}\n"


def main() -> None:
    """Re-render RESULTS.md's `run` section from a raw result file (after editing this module)."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("raw", type=Path, help="benchmarks/out/run-*.json")
    parser.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "RESULTS.md")
    args = parser.parse_args()
    results = json.loads(args.raw.read_text())
    results["summary"] = summarise(results)
    update_section(args.results, "run", render_run(results))
    print(f"rewrote the `run` section of {args.results}")


if __name__ == "__main__":
    main()
