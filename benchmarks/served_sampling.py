"""Sampled against greedy requests, served, over PaliGemma's real 257,216-token vocabulary.

    python -m benchmarks.served_sampling [--model tiny-vocab] [--concurrency 32] [--rounds 2]

One `python -m app` (the `tiny-vocab` preset: `tiny` with the real vocabulary, so the logits and the
choice of tokens cost what they cost with a real checkpoint, while the rest of the model is small) and
the benchmark's workload mix at N requests in flight, sent four ways in turn, round after round: greedy,
temperature 1, top_k 50 (temperature 1), top_p 0.9 (temperature 1). Tokens/s come from the server's own
/metrics over each window (`paligemma_generated_tokens_total`); each sampled mode is compared with the
greedy window of its round. Random weights make flat logits: top-p 0.9 keeps about 90 % of the
vocabulary and takes the sampler's exact search every step (a trained model's would not).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks import procs, report
from benchmarks.run import measure_level
from benchmarks.systems import SERVER_ROWS, SYSTEMS, Config
from benchmarks.workload import build_mix, multipart, skimage_available

MODES: dict[str, dict[str, str]] = {
    "greedy": {},
    "temperature 1": {"temperature": "1.0"},
    "top_k 50": {"temperature": "1.0", "top_k": "50"},
    "top_p 0.9": {"temperature": "1.0", "top_p": "0.9"},
}
TARGET = 0.6  # sampled tokens/s over greedy's (the issue's)


def with_sampling(mix: list[Any], fields: dict[str, str]) -> list[Any]:
    """The same requests with sampling fields in their forms (a seed each, so runs can be repeated)."""
    out = []
    for i, request in enumerate(mix):
        extra = {**fields, "seed": str(i)} if fields else {}
        form = {**request.fields, **extra, "max_new_tokens": str(request.max_new_tokens)}
        body, content_type = multipart(form, request.jpeg)
        out.append(dataclasses.replace(request, body=body, content_type=content_type))
    return out


def run(model: str, concurrency: int, rounds: int, warmup_s: float, window_s: float) -> dict[str, Any]:
    photos = "skimage" if skimage_available() else "synthetic"
    mix = build_mix(4, photos=photos)
    mixes = {mode: with_sampling(mix, fields) for mode, fields in MODES.items()}
    port = procs.free_port()
    command, env = SYSTEMS["ours"].command(port, Config(model=model, rows=SERVER_ROWS))
    out = Path(__file__).resolve().parent / "out"
    out.mkdir(exist_ok=True)
    windows: list[dict[str, Any]] = []
    with procs.running("ours", command, env, "/readyz", out / "served_sampling.log", port,
                       timeout_s=300) as server:
        index = 0
        for round_number in range(rounds):
            for mode, requests in mixes.items():
                level = asyncio.run(measure_level(server, True, requests, concurrency, warmup_s, window_s,
                                                  index))
                index += level.pop("sent")
                level.pop("samples")
                metrics = level.get("server_metrics", {})
                tokens_per_s = (metrics.get("generated_tokens") or 0) / window_s
                windows.append({"round": round_number, "mode": mode, "tokens_per_s": tokens_per_s,
                                "requests_per_s": level["requests_per_s"], "errors": level["errors"],
                                "decode_step_ms": metrics.get("mean_decode_step_ms"),
                                "decode_rows": metrics.get("mean_decode_rows"),
                                "other_cores": level["cpu"].get("other_cores"), "loadavg": level["loadavg"]})
                print(f"[served_sampling] round {round_number} {mode}: {tokens_per_s:.1f} tokens/s, "
                      f"{level['requests_per_s']:.2f} req/s, decode step "
                      f"{metrics.get('mean_decode_step_ms')} ms over {metrics.get('mean_decode_rows')} rows, "
                      f"errors {level['errors'] or 0}, other processes "
                      f"{level['cpu'].get('other_cores', 0):.2f} cores", flush=True)
    return {"model": model, "concurrency": concurrency, "rounds": rounds, "warmup_s": warmup_s,
            "window_s": window_s, "windows": windows}


def render(result: dict[str, Any], command: str) -> str:
    windows = result["windows"]
    greedy = {w["round"]: w["tokens_per_s"] for w in windows if w["mode"] == "greedy"}
    lines = [
        "## Sampled against greedy, served over the real vocabulary (`python -m benchmarks.served_sampling`)",
        "",
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}; command: `{command}`. `python -m app` with the "
        f"`{result['model']}` preset (PaliGemma's 257,216-token vocabulary on the `tiny` model) and "
        f"{result['concurrency']} requests in flight, the workload mix sent greedy and sampled in turn, "
        f"{result['rounds']} rounds of a {result['warmup_s']:g} s warm-up and a {result['window_s']:g} s "
        "window each; tokens/s from the server's /metrics over each window; the ratio is to the greedy "
        "window of the same round (medians over rounds). Random weights make flat logits, where top-p 0.9 "
        "keeps about 90 % of the vocabulary (the sampler's exact search, every row, every step).",
        "",
        "| mode | tokens/s | x greedy | target | verdict | decode step ms (rows) | other cores |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode in MODES:
        rows = [w for w in windows if w["mode"] == mode]
        tokens = statistics.median(w["tokens_per_s"] for w in rows)
        ratio = statistics.median(w["tokens_per_s"] / greedy[w["round"]] for w in rows if greedy[w["round"]])
        target = TARGET if mode != "greedy" else None
        met = report.check(ratio, target)["met"]
        verdict = "" if met is None else ("**met**" if met else "**not met**")
        step = statistics.median(w["decode_step_ms"] or 0 for w in rows)
        decode_rows = statistics.median(w["decode_rows"] or 0 for w in rows)
        other = max(w["other_cores"] or 0 for w in rows)
        lines.append(f"| {mode} | {tokens:.1f} | {ratio:.2f} | {'>= ' + str(target) if target else ''} | "
                     f"{verdict} | {step:.1f} ({decode_rows:.1f}) | {other:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-vocab")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--window", type=float, default=20.0)
    report.add_section_arguments(parser, "served_sampling", quiet_wait_s=60.0)
    args = parser.parse_args()
    report.wait_if_asked(args)
    result = run(args.model, args.concurrency, args.rounds, args.warmup, args.window)
    report.save_raw("served_sampling", result)
    rounds = f" --rounds {args.rounds}" if args.rounds != 2 else ""
    command = f"python -m benchmarks.served_sampling{rounds}"
    report.publish(args, "served_sampling", render(result, command))


if __name__ == "__main__":
    main()
