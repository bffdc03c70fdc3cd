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

# The project's targets (issue "Performance: a benchmark against the peers").
TARGET_EFFICIENCY = 0.85  # served req/s at 64 in flight / ceiling at the max batch size
TARGET_GAIN_REALISED = 0.85  # share of the batching gain realised over the tutorial server
TARGET_VS_LITSERVE = 1.2  # ours / LitServe at 64 in flight
TARGET_P50_AT_1 = 1.15  # ours / tutorial p50 at 1 in flight, at most

# Ceiling modes (benchmarks/ceiling.py): the server's own path (image keys and its feature cache, so a
# repeated image is encoded once), the same without the cache (matches `ours_nocache`), and, from
# runners without image keys, every image encoded.
SERVER_PATH = "server_path"
NO_CACHE = "no_cache"
NO_REUSE = "no_reuse"
MIN_GAIN = 1.05  # a batching gain below this makes "the share of the gain realised" undefined
# Other processes' CPU (cores) up to which a measurement counts as undisturbed (run.py's --retry-above).
QUIET_CORES = 0.25

SECTION_ORDER = ("run", "image_prep", "placement", "exif", "soak", "gpu")


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


def _ceiling_rows(results: dict[str, Any], batch_size: int, mode: str) -> list[dict[str, Any]]:
    """The ceiling measurements used, of the runs before and after the servers: all those during which
    other processes took at most QUIET_CORES (averaged), else the one where they took the least. Rows
    without a mode come from runs before modes existed (no reuse)."""
    rows = [row for key in ("ceiling", "ceiling_again") for row in (results.get(key) or {}).get("results", [])
            if row["batch_size"] == batch_size and row.get("mode", NO_REUSE) == mode]
    quiet = [row for row in rows if _other(row) <= QUIET_CORES]
    return quiet or ([min(rows, key=_other)] if rows else [])


def _ceiling(results: dict[str, Any], batch_size: int, mode: str) -> float | None:
    rows = _ceiling_rows(results, batch_size, mode)
    return sum(row["requests_per_s"] for row in rows) / len(rows) if rows else None


def _server_path_mode(results: dict[str, Any]) -> str:
    """The ceiling mode that does the server's work: with feature reuse if the runner has it."""
    rows = (results.get("ceiling") or {}).get("results", [])
    return SERVER_PATH if any(row.get("mode") == SERVER_PATH for row in rows) else NO_REUSE


def _gain_realised(ours: float | None, tutorial: float | None, gain: float | None) -> float | None:
    """(ours / tutorial - 1) / (gain - 1); undefined when batching gains (almost) nothing."""
    ratio = _ratio(ours, tutorial)
    # Below a 5 % gain the denominator is noise and the ratio means nothing: leave it undefined.
    if ratio is None or gain is None or gain < MIN_GAIN:
        return None
    return (ratio - 1) / (gain - 1)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    """The ratios the issue asks for, each with its target and whether it is met (None: not measured)."""
    levels = results["meta"]["concurrency"]
    top = max(levels)
    low = min(levels)
    max_batch = results["meta"]["config"]["max_batch_size"]
    ours_top, tutorial_top = _rps(results, "ours", top), _rps(results, "tutorial", top)
    litserve_top, nocache_top = _rps(results, "litserve", top), _rps(results, "ours_nocache", top)
    mode = _server_path_mode(results)
    ceiling_max, ceiling_1 = _ceiling(results, max_batch, mode), _ceiling(results, 1, mode)
    batching_gain = _ratio(ceiling_max, ceiling_1)
    plain_max, plain_1 = _ceiling(results, max_batch, NO_CACHE), _ceiling(results, 1, NO_CACHE)
    plain_gain = _ratio(plain_max, plain_1)
    # Ceiling figures measured while other processes took CPU (no quiet measurement of them) are not
    # the model's ceiling: the ratios built on them get no verdict.
    disturbed = sorted({f"{m} batch {b}" for m in (mode, NO_CACHE) for b in (1, max_batch)
                        for row in _ceiling_rows(results, b, m) if _other(row) > QUIET_CORES})
    ours_low, tutorial_low = _level(results, "ours", low), _level(results, "tutorial", low)
    p50_ratio = None
    if ours_low and tutorial_low and ours_low["completed"] and tutorial_low["completed"]:
        p50_ratio = ours_low["latency_ms"]["p50"] / tutorial_low["latency_ms"]["p50"]

    def check(value: float | None, target: float, at_most: bool = False) -> dict[str, Any]:
        met = None if value is None else (value <= target if at_most else value >= target)
        return {"value": value, "target": target, "at_most": at_most, "met": met}

    return {
        "top_concurrency": top,
        "low_concurrency": low,
        "ceiling_mode": mode,
        "ceiling_batch_1": ceiling_1,
        "ceiling_max_batch": ceiling_max,
        "batching_gain": batching_gain,
        "ceiling_disturbed": disturbed,
        "efficiency": check(_ratio(ours_top, ceiling_max), TARGET_EFFICIENCY),
        "ours_over_tutorial": _ratio(ours_top, tutorial_top),
        "gain_realised": check(_gain_realised(ours_top, tutorial_top, batching_gain), TARGET_GAIN_REALISED),
        # Like for like without the feature cache: the cache-less server against the cache-less ceiling,
        # and its gain over the tutorial server against that ceiling's gain.
        "no_cache": {
            "ceiling_batch_1": plain_1,
            "ceiling_max_batch": plain_max,
            "batching_gain": plain_gain,
            "efficiency": check(_ratio(nocache_top, plain_max), TARGET_EFFICIENCY),
            "ours_over_tutorial": _ratio(nocache_top, tutorial_top),
            "gain_realised": check(_gain_realised(nocache_top, tutorial_top, plain_gain),
                                   TARGET_GAIN_REALISED),
        },
        "ours_over_litserve": check(_ratio(ours_top, litserve_top), TARGET_VS_LITSERVE),
        "p50_low_ours_over_tutorial": check(p50_ratio, TARGET_P50_AT_1, at_most=True),
    }


def _f(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _met(check: dict[str, Any]) -> str:
    return {True: "**met**", False: "**not met**", None: "not measured"}[check["met"]]


def _errors(level: dict[str, Any]) -> str:
    errors = level["errors"]
    return ", ".join(f"{k}: {v}" for k, v in sorted(errors.items())) if errors else "0"


def render_run(results: dict[str, Any]) -> str:
    meta, summary = results["meta"], results["summary"]
    config = meta["config"]
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
        f"- Model: preset `{config['model']}` (seed {config['seed']}, {meta['parameters']}), float32 on the "
        f"CPU, the same weights in every system. Max batch size {config['max_batch_size']}, batch wait "
        f"{config['batch_wait_ms']} ms (ours: PALIGEMMA_MAX_BATCH_SIZE / _WAIT_MS; LitServe: "
        "max_batch_size / batch_timeout), queue timeout "
        f"{config['request_timeout_s']} s.",
        "- Load: closed loop (asyncio + httpx), N requests always in flight; "
        f"{meta['warmup_s']:.0f} s warm-up, then a {meta['duration_s']:.0f} s window (requests finishing in "
        "it count), then the in-flight requests are drained. Each server is started fresh, then "
        "measured at every N in turn.",
        f"- Workload: {_mix_text(meta['mix'])}",
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
        lines += ["### Ceiling: the same model in-process, prepared tensors, no HTTP, no queue", "",
                  "`server path`: image keys and the server's feature cache, as `ours` runs them (a repeated "
                  "image is encoded once); `no cache`: the same keys with feature cache size 0, as "
                  "`ours_nocache` runs them (requests about one image share an encoding only inside a batch; "
                  "at batch 1 every image is encoded); `no reuse`: a runner without image keys. Each "
                  "mode and batch size was measured before and after the servers; the comparisons use the "
                  f"mean of the measurements during which other processes took at most {QUIET_CORES} cores "
                  "(**used**), or else the quietest one.", "",
                  "| run | mode | batch size | req/s | tokens/s | ms per batch (median) | batches | "
                  "other cores |", "|---|---|---|---|---|---|---|---|"]
        runs = (("before the servers", "ceiling"), ("again after them", "ceiling_again"))
        for tag, key in runs:
            for row in (results.get(key) or {}).get("results", []):
                mode = row.get("mode", NO_REUSE)
                used = any(row is r for r in _ceiling_rows(results, row["batch_size"], mode))
                lines.append(f"| {tag}{' (**used**)' if used else ''} | {mode.replace('_', ' ')} | "
                             f"{row['batch_size']} | "
                             f"{_f(row['requests_per_s'])} | {_f(row['tokens_per_s'], 1)} | "
                             f"{_f(row['batch_ms_median'], 0)} | {row['batches']} | "
                             f"{_f(row.get('cpu', {}).get('other_cores'))} |")
        lines.append("")
    for name, entry in results["systems"].items():
        lines += [f"### {entry['title']}", ""]
        if entry.get("error"):
            lines += [f"Failed: {entry['error']}", ""]
        if not entry.get("levels"):
            continue
        lines += ["| in flight | req/s | p50 ms | p90 ms | p99 ms | errors | peak MB | server cores | "
                  "other cores |", "|---|---|---|---|---|---|---|---|---|"]
        for level in entry["levels"]:
            lat, cpu = level["latency_ms"], level.get("cpu", {})
            retried = level.get("discarded_attempts")
            n = f"{level['concurrency']}" + (" (retried)" if retried else "")
            lines.append(
                f"| {n} | {_f(level['requests_per_s'])} | {_f(lat['p50'], 0)} | "
                f"{_f(lat['p90'], 0)} | {_f(lat['p99'], 0)} | {_errors(level)} | {_f(level['peak_mb'], 0)} | "
                f"{_f(cpu.get('server_cores'))} | {_f(cpu.get('other_cores'))} |")
        for level in entry["levels"]:
            for attempt in level.get("discarded_attempts") or []:
                lines.append(f"\nN={level['concurrency']} was measured again: its first window had "
                             f"{_f(attempt['cpu'].get('other_cores'))} cores taken by other processes "
                             f"({_f(attempt['requests_per_s'])} req/s, p50 "
                             f"{_f(attempt['latency_ms']['p50'], 0)} ms); the table shows the quieter "
                             "attempt.")
        mismatches = sum(level["token_mismatches"] for level in entry["levels"])
        if mismatches:
            lines.append(f"\n{mismatches} responses reported a completion_tokens other than max_new_tokens.")
        lines.append("")
        if name.startswith("ours"):
            lines += _server_metrics_table(entry["levels"])
    lines += _summary_lines(summary, results)
    return "\n".join(lines)


def _mix_text(mix: dict[str, Any]) -> str:
    photos = ", ".join(f"{p['name']} {p['width']}x{p['height']} ({p['jpeg_bytes'] // 1000} kB)"
                       for p in mix["photos"])
    tasks = ", ".join(f"{k} {v}" for k, v in mix["tasks"].items())
    return (f"a sequence of {mix['requests']} requests ({tasks}) over {mix['distinct_images']} distinct "
            "JPEGs: "
            f"the photos {photos} from scikit-image's bundled data, each in 16 variants shifted by a few "
            "pixels; each image is asked 1 to 4 questions back to back (a session), and sessions are "
            f"shuffled. Mean max_new_tokens {mix['mean_new_tokens']:.1f}.")


def _server_metrics_table(levels: list[dict[str, Any]]) -> list[str]:
    rows = [level for level in levels if level.get("server_metrics")]
    if not rows:
        return []
    lines = ["Our server's /metrics over each window (difference of two scrapes; `worker busy` = summed "
             "durations of the batches that ended in the window / window, so it can pass 100 % when a "
             "long batch started before the window):", "",
             "| in flight | batches | mean batch size | batch sizes (bucket upper bound: batches) | "
             "mean queue wait ms | ms per batch | worker busy | cache hits |",
             "|---|---|---|---|---|---|---|---|"]
    for level in rows:
        m = level["server_metrics"]
        dist = ", ".join(f"<={float(k):g}: {v:.0f}" for k, v in m["batch_size_distribution"].items())
        busy = m["inference_busy_s"] / level["duration_s"]
        lines.append(f"| {level['concurrency']} | {m['batches']:.0f} | {_f(m['mean_batch_size'])} | {dist} | "
                     f"{_f(m['mean_queue_wait_ms'], 0)} | {_f(m['mean_inference_ms_per_batch'], 0)} | "
                     f"{busy:.0%} | {m['feature_cache_hits']:.0f} |")
    return [*lines, ""]


def _verdict(check: dict[str, Any], gain: float | None = None, disturbed: bool = False) -> str:
    if disturbed:
        return "no verdict: ceiling measured while other processes took CPU"
    if check["value"] is None and gain is not None and gain < MIN_GAIN:
        return f"undefined: batching gains under {MIN_GAIN}x here"
    return _met(check)


def _summary_lines(summary: dict[str, Any], results: dict[str, Any]) -> list[str]:
    top, low = summary["top_concurrency"], summary["low_concurrency"]
    b = results["meta"]["config"]["max_batch_size"]
    eff, gain, lit, p50 = (summary[k] for k in ("efficiency", "gain_realised", "ours_over_litserve",
                                                 "p50_low_ours_over_tutorial"))
    path = "the server's path" if summary["ceiling_mode"] == SERVER_PATH else "every image encoded"
    disturbed = bool(summary.get("ceiling_disturbed"))
    lines = [
        "### Against the targets",
        "",
        f"- Ceiling used ({path}): batch {b} {_f(summary['ceiling_max_batch'])} req/s, batch 1 "
        f"{_f(summary['ceiling_batch_1'])} req/s: batching makes **{_f(summary['batching_gain'])}x** "
        "possible."
        + (f" **Not valid**: other processes took CPU while {', '.join(summary['ceiling_disturbed'])} "
           "ran, with no quiet measurement to use instead." if disturbed else ""),
        "",
        "| measure | value | target | verdict |",
        "|---|---|---|---|",
        f"| efficiency: ours@{top} / ceiling(batch {b}) | {_f(eff['value'])} | >= {eff['target']} | "
        f"{_verdict(eff, disturbed=disturbed)} |",
        f"| ours@{top} / tutorial@{top} (req/s) | {_f(summary['ours_over_tutorial'])}x | | |",
        f"| batching gain realised: (ours@{top} / tutorial@{top} - 1) / (ceiling_{b} / ceiling_1 - 1) | "
        f"{_f(gain['value'])} | >= {gain['target']} | "
        f"{_verdict(gain, summary['batching_gain'], disturbed)} |",
        f"| ours@{top} / LitServe@{top} (req/s) | {_f(lit['value'])}x | >= {lit['target']}x | {_met(lit)} |",
        f"| p50 at {low} in flight: ours / tutorial | {_f(p50['value'])} | <= {p50['target']} | "
        f"{_met(p50)} |",
    ]
    plain = summary.get("no_cache") or {}
    if plain.get("efficiency", {}).get("value") is not None:
        p_eff, p_gain = plain["efficiency"], plain["gain_realised"]
        lines += [
            f"| feature cache off: ours_nocache@{top} / ceiling(batch {b}, no cache) | "
            f"{_f(p_eff['value'])} | >= {p_eff['target']} | {_verdict(p_eff, disturbed=disturbed)} |",
            f"| feature cache off: batching gain realised, (ours_nocache@{top} / tutorial@{top} - 1) "
            f"/ ({_f(plain['ceiling_max_batch'])} / {_f(plain['ceiling_batch_1'])} - 1) | "
            f"{_f(p_gain['value'])} "
            f"| >= {p_gain['target']} | {_verdict(p_gain, plain['batching_gain'], disturbed)} |",
        ]
    lines += [
        "",
        f"The batching gain realised is the share of the speed-up that batching makes possible on this "
        f"machine (ceiling_{b} / ceiling_1 - 1, both in-process) which our server delivers over the "
        f"tutorial server at {top} in flight (ours / tutorial - 1): 1.0 means all of it, 0 means nothing "
        "over one `generate` per request. It can pass 1 where the tutorial server also loses time outside "
        "the model (decoding 12 MP photos at full size) that our server avoids, or re-encodes images whose "
        "features our server reuses.",
        "",
    ]
    return lines


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of `repeats` calls, in ms, after one warm-up call (first-call costs such as
    plugin imports and allocator growth are not per-request costs)."""
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
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
