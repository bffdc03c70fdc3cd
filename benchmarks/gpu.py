"""PaliGemma-3B (224 px) on one GPU: in-process throughput, served throughput, and the physical limits.

    python -m benchmarks.gpu              # one H100: about 4-5 min, must stay under 8
    python -m benchmarks.gpu --dry-run    # the same code on the CPU with the `tiny` preset, in ~1 min

1. Builds the `paligemma-3b-224` preset (the exact PaliGemma-3B architecture, random weights) in
   bfloat16 on CUDA through `app.model.loader.load_model`.
2. In-process: batches of 1, 8 and 32 prepared requests (every one max_new_tokens 32; random weights
   never emit <eos>, so every row generates 32 tokens) through `ModelRunner.generate`: requests/s and
   tokens/s; plus one batch at max_new_tokens 1 per size, to split a batch into prefill and decode steps.
3. Starts our server on the same preset (PALIGEMMA_MAX_BATCH_SIZE 32) and measures served requests/s at
   1, 8 and 32 in flight with the benchmark's mixed workload (all at max_new_tokens 32).
4. Prints these next to the physical limits: a decode step must read every weight the language model
   uses (bytes computed from the model's parameters) plus the KV cache, at the H100's 3.35 TB/s; a
   prefill needs about 2 x parameters x tokens FLOPs, at ~990 dense bf16 TFLOP/s.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks import procs, report
from benchmarks.ceiling import measure, prepare
from benchmarks.loadgen import run_load
from benchmarks.workload import TASKS, build_mix

ROOT = Path(__file__).resolve().parent
H100_BANDWIDTH = 3.35e12  # bytes/s, H100 SXM HBM3
H100_BF16_FLOPS = 990e12  # dense bf16 tensor-core FLOP/s, H100 SXM
NEW_TOKENS = 32


@dataclasses.dataclass(frozen=True)
class Plan:
    preset: str
    device: str
    batch_sizes: tuple[int, ...]
    inproc_s: float
    warmup_s: float
    window_s: float
    variants: int


FULL = Plan("paligemma-3b-224", "cuda", (1, 8, 32), 12.0, 8.0, 20.0, 4)
DRY = Plan("tiny", "cpu", (1, 2, 4), 2.0, 1.0, 3.0, 1)


def physical_limits(loaded, prompt_tokens: int) -> dict[str, Any]:
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
    embed_params = text.embed_tokens.weight.numel()
    tied = model.lm_head.weight is text.embed_tokens.weight
    # A decode step runs the language model on one token per row and the output head over the whole
    # vocabulary: it reads every language-model weight except the unused rows of the embedding table,
    # plus the head (the same matrix when tied, so read once, as the head).
    lm_params, lm_bytes = size(text)
    head_bytes = model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    embed_bytes = embed_params * text.embed_tokens.weight.element_size()
    decode_bytes = lm_bytes - embed_bytes + head_bytes
    config = model.config.text_config
    kv_bytes_per_token = (2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
                          * model.lm_head.weight.element_size())
    image_tokens = loaded.image_seq_length
    # Prefill: 2 FLOPs per parameter per token it touches. The vision tower sees the image's patches, the
    # language model (without the embedding lookup) every prompt token, the head only the last one.
    vision_flops = 2 * vision_params * image_tokens + 2 * projector_params * image_tokens
    text_flops = 2 * (lm_params - embed_params) * prompt_tokens + 2 * model.lm_head.weight.numel()
    return {
        "parameters": total_params,
        "weight_bytes": total_bytes,
        "vision_bytes": vision_bytes + projector_bytes,
        "decode_weight_bytes": decode_bytes,
        "tied_head": tied,
        "kv_bytes_per_token": kv_bytes_per_token,
        "prompt_tokens": prompt_tokens,
        "min_decode_step_ms_all_weights": total_bytes / H100_BANDWIDTH * 1000,
        "min_decode_step_ms": decode_bytes / H100_BANDWIDTH * 1000,
        "prefill_flops_simple": 2 * total_params * prompt_tokens,
        "prefill_flops": vision_flops + text_flops,
        "min_prefill_ms_simple": 2 * total_params * prompt_tokens / H100_BF16_FLOPS * 1000,
        "min_prefill_ms": (vision_flops + text_flops) / H100_BF16_FLOPS * 1000,
    }


def in_process(plan: Plan) -> dict[str, Any]:
    """Measure in-process, then free the model: the server about to start needs the GPU memory."""
    import torch

    result = _in_process(plan)
    gc.collect()
    if plan.device == "cuda":
        torch.cuda.empty_cache()
    return result


def _in_process(plan: Plan) -> dict[str, Any]:
    import torch

    from app.model.loader import load_model
    from app.model.runner import ModelRunner
    from app.settings import Settings

    started = time.perf_counter()
    loaded = load_model(Settings(model=plan.preset, device=plan.device))
    load_s = time.perf_counter() - started
    mix = build_mix(plan.variants, tokens=dict.fromkeys(TASKS, NEW_TOKENS))
    inputs = prepare(loaded, mix)
    runner = ModelRunner(loaded)
    prompt_tokens = round(sum(len(i.input_ids) for i in inputs) / len(inputs))
    limits = physical_limits(loaded, prompt_tokens)
    rows = []
    for batch_size in plan.batch_sizes:
        row = measure(runner, inputs, batch_size, plan.inproc_s)
        row.pop("cpu", None)
        # One batch generating a single token is (almost) all prefill: what is left is decode steps.
        first = [dataclasses.replace(item, max_new_tokens=1) for item in inputs[:batch_size]]
        row["prefill_ms"] = report.median_ms(lambda batch=first: runner.generate(batch), 3)
        row["decode_step_ms"] = (row["batch_ms_median"] - row["prefill_ms"]) / (NEW_TOKENS - 1)
        seq = prompt_tokens + NEW_TOKENS // 2  # the KV cache's mean length over the decode steps
        row["min_decode_step_ms"] = ((limits["decode_weight_bytes"] + batch_size * seq
                                      * limits["kv_bytes_per_token"]) / H100_BANDWIDTH * 1000)
        row["min_prefill_ms"] = limits["min_prefill_ms"] * batch_size
        rows.append(row)
        print(f"[in-process] batch {batch_size}: {row['requests_per_s']:.2f} req/s, "
              f"{row['tokens_per_s']:.0f} tokens/s, prefill {row['prefill_ms']:.1f} ms, "
              f"decode step {row['decode_step_ms']:.2f} ms", flush=True)
    memory = torch.cuda.max_memory_allocated() / 1e9 if plan.device == "cuda" else None
    return {"load_s": load_s, "dtype": str(loaded.dtype), "device": str(loaded.device),
            "gpu": torch.cuda.get_device_name() if plan.device == "cuda" else None,
            "max_memory_allocated_gb": memory, "limits": limits, "rows": rows}



def served(plan: Plan) -> list[dict[str, Any]]:
    port = procs.free_port()
    env = {"PALIGEMMA_MODEL": plan.preset, "PALIGEMMA_DEVICE": plan.device, "PALIGEMMA_HOST": procs.HOST,
           "PALIGEMMA_PORT": str(port), "PALIGEMMA_MAX_BATCH_SIZE": str(max(plan.batch_sizes))}
    mix = build_mix(plan.variants, tokens=dict.fromkeys(TASKS, NEW_TOKENS))
    log = ROOT / "out" / "logs" / f"gpu-server-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.log"
    rows = []
    command = [procs.python(), "-m", "app"]
    with procs.running("ours", command, env, "/readyz", log, port, timeout_s=600) as server:
        index = 0
        for concurrency in plan.batch_sizes:
            result = asyncio.run(run_load(server.base_url, mix, concurrency, plan.warmup_s, plan.window_s,
                                          start_index=index))
            index += result.sent
            row = result.to_json()
            rows.append(row)
            print(f"[served] {concurrency} in flight: {row['requests_per_s']:.2f} req/s, "
                  f"p50 {row['latency_ms']['p50']:.0f} ms, errors {row['errors'] or 0}", flush=True)
    return rows


def render(inproc: dict[str, Any], served_rows: list[dict[str, Any]], plan: Plan, dry_run: bool) -> str:
    limits = inproc["limits"]
    lines = [
        "## GPU: PaliGemma-3B 224 px on one GPU (`python -m benchmarks.gpu`)"
        + (" (DRY RUN on the CPU with the tiny preset: numbers meaningless)" if dry_run else ""),
        "",
        f"- {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}; device {inproc['gpu'] or inproc['device']}, "
        f"{inproc['dtype']}; preset `{plan.preset}`, {limits['parameters'] / 1e9:.3f} B parameters, "
        f"{limits['weight_bytes'] / 1e9:.3f} GB of weights ({limits['vision_bytes'] / 1e9:.3f} GB vision "
        f"tower + projector); model built in {inproc['load_s']:.0f} s"
        + (f"; peak GPU memory in-process {inproc['max_memory_allocated_gb']:.1f} GB"
           if inproc["max_memory_allocated_gb"] else "") + ".",
        f"- Every request generates {NEW_TOKENS} tokens; mean prompt {limits['prompt_tokens']} tokens "
        "(256 image tokens + the prefix).",
        f"- Physical limits on an H100 SXM (3.35 TB/s, ~990 dense bf16 TFLOP/s): a decode step reads "
        f"{limits['decode_weight_bytes'] / 1e9:.3f} GB of language-model weights (all weights: "
        f"{limits['weight_bytes'] / 1e9:.3f} GB -> {limits['min_decode_step_ms_all_weights']:.2f} ms) -> at "
        f"least **{limits['min_decode_step_ms']:.2f} ms per step** plus the KV cache "
        f"({limits['kv_bytes_per_token'] / 1e3:.0f} kB per token); a prefill needs "
        f"{limits['prefill_flops'] / 1e12:.2f} TFLOP per request (2 x all parameters x prompt tokens: "
        f"{limits['prefill_flops_simple'] / 1e12:.2f} TFLOP) -> at least **{limits['min_prefill_ms']:.2f} ms "
        "per request**.",
        "",
        "| batch | in-process req/s | tokens/s | ms per batch | prefill ms (min) | decode ms/step (min) | "
        "served req/s at that many in flight | served p50 ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    served_by_n = {row["concurrency"]: row for row in served_rows}
    for row in inproc["rows"]:
        s = served_by_n.get(row["batch_size"])
        lines.append(
            f"| {row['batch_size']} | {row['requests_per_s']:.2f} | {row['tokens_per_s']:.0f} | "
            f"{row['batch_ms_median']:.1f} | {row['prefill_ms']:.1f} ({row['min_prefill_ms']:.1f}) | "
            f"{row['decode_step_ms']:.2f} ({row['min_decode_step_ms']:.2f}) | "
            + (f"{s['requests_per_s']:.2f} | {s['latency_ms']['p50']:.0f} |" if s else "n/a | n/a |"))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny preset, short windows")
    parser.add_argument("--results", type=Path, help="Markdown file whose `gpu` section to rewrite "
                        "(default benchmarks/RESULTS.md; dry run: benchmarks/out/RESULTS-gpu-dry-run.md)")
    args = parser.parse_args()
    plan = DRY if args.dry_run else FULL
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            parser.error("no CUDA device: run on a GPU host, or use --dry-run")
    started = time.perf_counter()
    inproc = in_process(plan)
    try:
        served_rows = served(plan)
    except Exception as exc:  # keep the in-process numbers even if the server cannot start
        print(f"[served] FAILED: {type(exc).__name__}: {exc}", flush=True)
        served_rows = []
    markdown = render(inproc, served_rows, plan, args.dry_run)
    print("\n" + markdown + f"\n\n(total {time.perf_counter() - started:.0f} s)")
    out = ROOT / "out" / ("gpu-dry-run.json" if args.dry_run else "gpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"in_process": inproc, "served": served_rows}, indent=2, default=str))
    default = ROOT / "out" / "RESULTS-gpu-dry-run.md" if args.dry_run else ROOT / "RESULTS.md"
    results = args.results or default
    report.update_section(results, "gpu", markdown)


if __name__ == "__main__":
    main()
