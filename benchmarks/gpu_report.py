"""The GPU benchmark's physical limits, targets and Markdown (benchmarks/gpu.py measures)."""

from __future__ import annotations

from typing import Any

from benchmarks.report import check, fmt, update_section

__all__ = ["physical_limits", "render", "targets", "update_section"]

# Memory bandwidth by GPU (bytes/s): H100 SXM (HBM3) and H200 (HBM3e), matched in the device name.
BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12}
BF16_FLOPS = 989e12  # dense bf16 tensor-core FLOP/s, H100 SXM and H200 alike

# Issue 8's GPU targets (3B preset, bf16, 32 new tokens per request).
TARGET_SERVED_OVER_CEILING = 0.9  # served req/s at the top common N / in-process ceiling there
TARGET_STEP_OVER_FLOOR = 3.0  # decode step at full rows / its bandwidth floor, at most
TARGET_STEP_1_ROW_MS = 4.5  # decode step at 1 row, at most
TARGET_H200_RPS = 150.0  # served req/s at 32 in flight, on an H200
TARGET_P50_AT_1_MS = 180.0
TARGET_SHORT_OVER_LONG = 0.3  # mixed lengths: p50 of the shortest / p50 of the longest, at most
TARGET_SAMPLED_OVER_GREEDY = 0.6  # served req/s, sampled (temperature 1) / greedy, at the same N


def bandwidth(gpu: str | None) -> tuple[float, str]:
    """(bytes/s, where the figure comes from) for the GPU name torch reports."""
    for key, value in BANDWIDTH.items():
        if gpu and key in gpu:
            return value, f"{key} ({value / 1e12:.2f} TB/s)"
    return BANDWIDTH["H100"], f"not an H100 or H200 ({gpu or 'no GPU'}): the H100's 3.35 TB/s assumed"


def physical_limits(loaded, prompt_tokens: int, gpu: str | None) -> dict[str, Any]:
    """Bytes a decode step must read and FLOPs a prefill must do, from the model's own parameters."""
    model = loaded.model
    inner = model.model

    def size(module) -> tuple[int, int]:
        params = list(module.parameters())
        return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)

    total_params, total_bytes = size(model)  # parameters() yields a tied head's weight once
    vision_params, vision_bytes = size(inner.vision_tower)
    projector_params, projector_bytes = size(inner.multi_modal_projector)
    text = inner.language_model
    embed = text.embed_tokens.weight
    head = model.lm_head.weight
    # A decode step runs the language model on one token per row and the output head over the whole
    # vocabulary: it reads every language-model weight except the unused rows of the embedding table,
    # plus the head (the same matrix when tied, so read once, as the head).
    lm_params, lm_bytes = size(text)
    decode_bytes = lm_bytes - embed.numel() * embed.element_size() + head.numel() * head.element_size()
    config = model.config.text_config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_bytes_per_token = (2 * config.num_hidden_layers * config.num_key_value_heads * head_dim
                          * head.element_size())
    image_tokens = loaded.image_seq_length
    # Prefill: 2 FLOPs per parameter per token it touches. The vision tower sees the image's patches, the
    # language model (without the embedding lookup) every prompt token, the head only the last one.
    prefill_flops = (2 * (vision_params + projector_params) * image_tokens
                     + 2 * (lm_params - embed.numel()) * prompt_tokens + 2 * head.numel())
    rate, source = bandwidth(gpu)
    return {
        "parameters": total_params,
        "weight_bytes": total_bytes,
        "vision_bytes": vision_bytes + projector_bytes,
        "decode_weight_bytes": decode_bytes,
        "kv_bytes_per_token": kv_bytes_per_token,
        "prompt_tokens": prompt_tokens,
        "bandwidth": rate,
        "bandwidth_source": source,
        "prefill_flops": prefill_flops,
        "min_prefill_ms": prefill_flops / BF16_FLOPS * 1000,
    }


def floor_ms(limits: dict[str, Any], rows: int, tokens_per_row: int) -> float:
    """The least time a decode step over `rows` rows of `tokens_per_row` cached tokens can take."""
    read = limits["decode_weight_bytes"] + rows * tokens_per_row * limits["kv_bytes_per_token"]
    return read / limits["bandwidth"] * 1000


def _row(levels: list[dict[str, Any]], n: int) -> dict[str, Any] | None:
    return next((level for level in levels if level["concurrency"] == n), None)


def _step_ms(ceiling_row: dict[str, Any] | None, rows: int) -> float | None:
    """The engine's median decode step over exactly `rows` rows during a ceiling measurement."""
    if ceiling_row is None:
        return None
    found = ceiling_row["decode"]["by_rows"].get(str(rows))
    return found["ms_median"] if found else None


def _check(name: str, value: float | None, target: float, at_most: bool) -> dict[str, Any]:
    return {"name": name, **check(value, target, at_most)}


def _served_levels(results: dict[str, Any]) -> list[dict[str, Any]]:
    return (results.get("served") or {}).get("levels") or []


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    inproc = results.get("in_process") or {}
    ceiling, served = inproc.get("ceiling") or [], _served_levels(results)
    checks = []
    common = sorted({r["concurrency"] for r in ceiling} & {r["concurrency"] for r in served})
    if common:
        n = common[-1]
        c, s = _row(ceiling, n), _row(served, n)
        ratio = s["requests_per_s"] / c["requests_per_s"] if c and s and c["requests_per_s"] else None
        checks.append(_check(f"served req/s at {n} in flight / in-process ceiling at {n}", ratio,
                             TARGET_SERVED_OVER_CEILING, False))
    if ceiling:
        top = max(r["concurrency"] for r in ceiling)
        rows = min(top, inproc["rows"])
        step = _step_ms(_row(ceiling, top), rows)
        floor = floor_ms(inproc["limits"], rows, inproc["replay_position"])
        checks.append(_check(f"decode step at {rows} rows / bandwidth floor ({floor:.2f} ms)",
                             step / floor if step else None, TARGET_STEP_OVER_FLOOR, True))
        checks.append(_check("decode step at 1 row, ms", _step_ms(_row(ceiling, 1), 1),
                             TARGET_STEP_1_ROW_MS, True))
    if served:
        if "H200" in (inproc.get("gpu") or ""):
            top = _row(served, inproc["rows"])
            checks.append(_check(f"served req/s at {inproc['rows']} in flight (H200)",
                                 top["requests_per_s"] if top else None, TARGET_H200_RPS, False))
        one = _row(served, 1)
        checks.append(_check("served p50 at 1 in flight, ms", one["latency_ms"]["p50"] if one else None,
                             TARGET_P50_AT_1_MS, True))
    mixed = (results.get("served") or {}).get("mixed")
    if mixed:
        lengths = results["meta"]["mixed_lengths"]
        short, long = (mixed["per_length"].get(str(n), {}).get("p50_ms") for n in (lengths[0], lengths[-1]))
        checks.append(_check(f"mixed lengths at {mixed['concurrency']} in flight: p50 of {lengths[0]}-token "
                             f"/ p50 of {lengths[-1]}-token requests",
                             short / long if short and long else None, TARGET_SHORT_OVER_LONG, True))
    sampled = ((results.get("served") or {}).get("sampled") or {}).get("temperature 1")
    if sampled:
        greedy = _row(served, sampled["concurrency"])
        ratio = sampled["requests_per_s"] / greedy["requests_per_s"] if greedy and greedy["requests_per_s"] \
            else None
        checks.append(_check(f"served req/s at {sampled['concurrency']} in flight, temperature 1 / greedy",
                             ratio, TARGET_SAMPLED_OVER_GREEDY, False))
    return checks


def render(results: dict[str, Any]) -> str:
    meta, inproc = results["meta"], results.get("in_process") or {}
    limits = inproc.get("limits") or {}
    dry = meta["dry_run"]
    lines = [
        "## GPU: PaliGemma-3B 224 px on one GPU (`python -m benchmarks.gpu`)"
        + (" (DRY RUN on the CPU with the tiny preset: numbers meaningless)" if dry else ""),
        "",
        f"- {meta['date']}, `{meta['command']}`, {meta.get('wall_s', 0):.0f} s in all; device "
        f"{inproc.get('gpu') or inproc.get('device')}, {inproc.get('dtype')}; preset "
        f"`{meta['plan']['preset']}`, {limits.get('parameters', 0) / 1e9:.3f} B parameters, "
        f"{limits.get('weight_bytes', 0) / 1e9:.3f} GB of weights "
        f"({limits.get('vision_bytes', 0) / 1e9:.3f} GB vision tower + projector), built in "
        f"{inproc.get('load_s', 0):.0f} s"
        + (f"; peak GPU memory in-process {inproc['max_memory_allocated_gb']:.1f} GB"
           if inproc.get("max_memory_allocated_gb") else "") + ".",
        f"- Engine: {inproc.get('rows')} KV-cache rows of {inproc.get('cache_length')} tokens "
        f"({inproc.get('cache_gb', 0):.2f} GB); decode graphs {inproc.get('graphs') or 'none (eager)'} "
        f"captured in {inproc.get('capture_s', 0):.1f} s in-process (`ModelStepRunner.capture_graphs`, "
        f"timed); the server's log: {(results.get('served') or {}).get('capture_log', 'n/a')}, ready in "
        f"{fmt((results.get('served') or {}).get('startup_s'), 0)} s.",
        f"- Every request generates {meta['new_tokens']} tokens unless said otherwise; mean prompt "
        f"{limits.get('prompt_tokens')} tokens (image tokens + the prefix). Photos: {meta['photos']}.",
        f"- Bandwidth: {limits.get('bandwidth_source')}. A decode step must read "
        f"{limits.get('decode_weight_bytes', 0) / 1e9:.3f} GB of language-model weights plus "
        f"{limits.get('kv_bytes_per_token', 0) / 1e3:.1f} kB of KV cache per cached token of every row; a "
        f"prefill needs {limits.get('prefill_flops', 0) / 1e12:.2f} TFLOP per request (at least "
        f"{limits.get('min_prefill_ms', 0):.2f} ms at 989 dense bf16 TFLOP/s).",
        "",
    ]
    lines += _ceiling_lines(inproc) + _step_lines(inproc) + _served_lines(results) + _sampled_lines(results)
    lines += _tutorial_lines(results)
    lines += ["### Targets (issues 8 and 18)" + (" (dry run: no meaning)" if dry else ""), "",
              "| target | value | limit | verdict |", "|---|---|---|---|"]
    for target in results.get("targets") or []:
        verdict = {True: "**met**", False: "**not met**", None: "not measured"}[target["met"]]
        lines.append(f"| {target['name']} | {fmt(target['value'])} | {'<=' if target['at_most'] else '>='} "
                     f"{target['target']:g} | {verdict} |")
    return "\n".join(lines)


def _ceiling_lines(inproc: dict[str, Any]) -> list[str]:
    rows = inproc.get("ceiling") or []
    if not rows:
        return []
    lines = ["### In-process ceiling (the server's engine, N requests always in flight, no HTTP)", "",
             "| in flight | req/s | tokens/s | p50 ms | decode steps | mean decode rows | decode step ms "
             "(median) | prefill steps (mean rows) | prefill step ms (median) | engine busy |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d, p = r["decode"], r["prefill"]
        lines.append(f"| {r['concurrency']} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.0f} | "
                     f"{fmt(r['latency_ms']['p50'], 0)} | {d['steps']} | {fmt(d['rows_mean'], 1)} | "
                     f"{fmt(d['ms_median'])} | {p['steps']} ({fmt(p['rows_mean'], 1)}) | "
                     f"{fmt(p['ms_median'], 1)} | {r['busy']:.0%} |")
    return [*lines, ""]


def _step_lines(inproc: dict[str, Any]) -> list[str]:
    replay = inproc.get("replay_ms") or {}
    if not replay:
        return []
    limits, position = inproc["limits"], inproc["replay_position"]
    ceiling = inproc.get("ceiling") or []
    lines = ["### Decode step against the bandwidth floor", "",
             f"Floor: (language-model weights + rows x {position} cached tokens x KV bytes per token) / "
             "bandwidth. `whole rows`: the same with every row's full cache length, which the slot cache's "
             "attention reads whatever a row holds. Engine step: the engine's own step timer (token "
             "selection included) during the ceiling runs; graph replay: the step alone, CUDA events.", "",
             "| rows | engine step ms (median) | graph replay ms | floor ms | whole-rows floor ms | "
             "engine step / floor |", "|---|---|---|---|---|---|"]
    for width, replay_ms in replay.items():
        rows = int(width)
        level = next((r for r in sorted(ceiling, key=lambda r: r["concurrency"]) if r["concurrency"] >= rows),
                     None)
        step = _step_ms(level, rows)
        floor = floor_ms(limits, rows, position)
        whole = floor_ms(limits, rows, inproc["cache_length"] + 1)
        lines.append(f"| {rows} | {fmt(step)} | {replay_ms:.2f} | {floor:.2f} | {whole:.2f} | "
                     f"{fmt(step / floor if step else None)} |")
    return [*lines, ""]


def _served_lines(results: dict[str, Any]) -> list[str]:
    served = results.get("served") or {}
    lines = ["### Served (`python -m app`, its default rows)", ""]
    if served.get("error"):
        lines += [f"Failed: {served['error']}", ""]
    levels = served.get("levels") or []
    inproc = results.get("in_process") or {}
    ceiling = {r["concurrency"]: r["requests_per_s"] for r in inproc.get("ceiling") or []}
    if levels:
        lines += ["| in flight | req/s | p50 ms | p90 ms | p99 ms | errors | mean decode rows | decode step "
                  "ms (mean) | prefill steps (mean rows) | first token ms (mean) | served / ceiling |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for level in levels:
            m, lat = level.get("server_metrics") or {}, level["latency_ms"]
            c = ceiling.get(level["concurrency"])
            lines.append(
                f"| {level['concurrency']} | {level['requests_per_s']:.2f} | {fmt(lat['p50'], 0)} | "
                f"{fmt(lat['p90'], 0)} | {fmt(lat['p99'], 0)} | {level['errors'] or 0} | "
                f"{fmt(m.get('mean_decode_rows'), 1)} | {fmt(m.get('mean_decode_step_ms'))} | "
                f"{fmt(m.get('prefill_steps'), 0)} ({fmt(m.get('mean_prefill_rows'), 1)}) | "
                f"{fmt(m.get('mean_time_to_first_token_ms'), 0)} | "
                f"{fmt(level['requests_per_s'] / c if c else None)} |")
        lines.append("")
    mixed = served.get("mixed")
    if mixed:
        lengths = results["meta"]["mixed_lengths"]
        lines += [f"Mixed lengths: max_new_tokens cycling over {', '.join(map(str, lengths))}, "
                  f"{mixed['concurrency']} in flight: {mixed['requests_per_s']:.2f} req/s, errors "
                  f"{mixed['errors'] or 0}.", "",
                  "| max_new_tokens | completed | p50 ms | p90 ms |", "|---|---|---|---|"]
        for length, row in mixed["per_length"].items():
            lines.append(f"| {length} | {row['completed']} | {fmt(row['p50_ms'], 0)} | "
                         f"{fmt(row['p90_ms'], 0)} |")
        lines.append("")
    return lines


def _sampled_lines(results: dict[str, Any]) -> list[str]:
    inproc, served = results.get("in_process") or {}, results.get("served") or {}
    lines = ["### Sampling and the decode graphs' check", ""]
    graphs = served.get("graphs") or {}
    lines.append(f"- Decode graphs at warm-up: in-process {inproc.get('graphs') or 'none'}"
                 + (f", DISCARDED: {inproc['graphs_failure']}" if inproc.get("graphs_failure") else
                    " (they agreed with the eager step)" if inproc.get("graphs") else "")
                 + f"; the server's /v1/models: {graphs.get('decode_graphs')}"
                 + (f", DISCARDED: {graphs['decode_graphs_failure']}" if graphs.get("decode_graphs_failure")
                    else "") + ".")
    sampler = inproc.get("sampler_ms") or {}
    if sampler:
        greedy = sampler.get("greedy")
        timings = ", ".join(f"{mode} {ms:.2f} ({fmt(ms / greedy if greedy else None)})"
                            for mode, ms in sampler.items())
        lines.append(f"- The sampler alone, {inproc.get('rows')} rows x 257,216 {inproc.get('dtype')} logits "
                     f"(peaked), ms (x greedy): {timings}.")
    sampled = served.get("sampled") or {}
    if sampled:
        levels = {level["concurrency"]: level for level in served.get("levels") or []}
        lines += ["", "| workload | in flight | req/s | x greedy | p50 ms | decode step ms (mean) | errors |",
                  "|---|---|---|---|---|---|---|"]
        for mode, level in sampled.items():
            greedy_level = levels.get(level["concurrency"])
            ratio = level["requests_per_s"] / greedy_level["requests_per_s"] if greedy_level and \
                greedy_level["requests_per_s"] else None
            m = level.get("server_metrics") or {}
            lines.append(f"| {mode} | {level['concurrency']} | {level['requests_per_s']:.2f} | "
                         f"{fmt(ratio)} | {fmt(level['latency_ms']['p50'], 0)} | "
                         f"{fmt(m.get('mean_decode_step_ms'))} | {level['errors'] or 0} |")
    return [*lines, ""]


def _tutorial_lines(results: dict[str, Any]) -> list[str]:
    tutorial = results.get("tutorial") or {}
    lines = ["### Tutorial server on the same GPU (one `generate` per request)", ""]
    if tutorial.get("error"):
        return [*lines, f"Failed: {tutorial['error']}", ""]
    if not tutorial.get("levels"):
        return []
    lines += ["| in flight | req/s | p50 ms | p90 ms | errors |", "|---|---|---|---|---|"]
    for level in tutorial["levels"]:
        lat = level["latency_ms"]
        lines.append(f"| {level['concurrency']} | {level['requests_per_s']:.2f} | {fmt(lat['p50'], 0)} | "
                     f"{fmt(lat['p90'], 0)} | {level['errors'] or 0} |")
    return [*lines, ""]
