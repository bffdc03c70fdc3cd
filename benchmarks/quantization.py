"""Quantized weights on the CPU: their bytes, the engine's tokens/s, and (with a trained model) accuracy.

    python -m benchmarks.quantization weights          # bytes of `bench` (built) and of the 3B architecture
    python -m benchmarks.quantization layers           # one linear layer under each method
    python -m benchmarks.quantization speed            # tokens/s of the in-process engine on `bench`
    python -m benchmarks.quantization accuracy --model DIR --coco ANNOTATIONS.json --images DIR

weights: `bench` built in bfloat16 on this CPU and quantized for real (bytes measured where the weights
lie, `app.model.quantization.weight_bytes`); PaliGemma-3B and PaliGemma 2 10B from the memory plan (the
architecture on the meta device, the same arithmetic the tests check against real quantized layers). Each
against bfloat16: the whole model, and the layers quantized (the language model's decoder layers).

speed: the server's engine in-process (`benchmarks.ceiling.EngineDriver`: its scheduler, runner and
finisher), N requests always in flight, for none / int8 (torchao) / bnb-int8 (bitsandbytes LLM.int8, the
alternative int8 measured to choose between them) / nf4, in rounds that alternate the methods (the
machine is shared: medians over rounds, and the CPU other processes took).

accuracy: serves the model under each setting (`python -m app`, PALIGEMMA_QUANTIZATION=none/int8/nf4, and
nf4 with the vision tower quantized) and runs `paligemma eval detect` and `paligemma eval segment` on a
COCO dataset against each; the table gives AP50 and mask IoU (segm AP50 where the evaluation gives no
IoU) and the change from unquantized. It needs the trained demo model and `paligemma eval` (the client's
`eval` extra); `--eval-command` adapts it to another evaluation command.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.report import add_section_arguments, fmt, publish, wait_if_asked

SECTION = "quantization"
METHODS = ("none", "int8", "bnb-int8", "nf4")


# Bytes ----------------------------------------------------------------------------------------------
def _ratio_row(name: str, bf16: dict[str, int], other: dict[str, int]) -> str:
    whole = sum(other.values()) / sum(bf16.values())
    layers = other.get("language model", 0) / bf16["language model"]
    return f"| {name} | {sum(other.values()) / 2**20:,.1f} | {whole:.3f} | {layers:.3f} |"


def weights() -> str:
    from app.engine.memory_plan import PlanRequest, plan
    from app.model.checkpoints import architecture, official_checkpoint
    from app.model.loader import load_model
    from app.model.quantization import Quantization, weight_bytes
    from app.settings import Settings

    lines = [
        "### Weight bytes against bfloat16 (`python -m benchmarks.quantization weights`)",
        "",
        "`whole`: every weight, the vision tower, projector and embeddings (tied to lm_head) included; "
        "`quantized layers`: the language model's decoder layers, the part quantization replaces.",
        "",
    ]
    # bench, built for real in bfloat16 and quantized where it lies.
    lines += [
        "| bench (built, measured) | MiB | whole / bf16 | quantized layers / bf16 |",
        "|---|---|---|---|",
    ]
    config, _ = architecture("bench")
    measured: dict[str, dict[str, int]] = {}
    for method, vision in (("none", False), ("int8", False), ("nf4", False), ("int8", True), ("nf4", True)):
        loaded = load_model(
            Settings(model="bench", dtype="bfloat16", quantization=method, quantize_vision=vision)
        )
        # Split the measured bytes as the plan splits them, to report the quantized layers alone.
        parts = _measured_parts(loaded.model, weight_bytes)
        predicted = plan(
            "bench", config, PlanRequest(torch.bfloat16, Quantization(method), vision, 1, 8, 8, 8, None)
        )
        assert sum(parts.values()) == loaded.weight_bytes == predicted.weight_bytes, "plan != measured"
        name = method + (" + vision" if vision else "")
        measured[name] = parts
        lines.append(_ratio_row(name, measured["none"], parts))
    for model_id in ("google/paligemma-3b-pt-224", "google/paligemma2-10b-pt-448"):
        lines += [
            "",
            f"| {model_id} (meta device, plan) | MiB | whole / bf16 | quantized layers / bf16 |",
            "|---|---|---|---|",
        ]
        config = official_checkpoint(model_id).config()
        base = None
        for method, vision in (
            ("none", False),
            ("int8", False),
            ("nf4", False),
            ("int8", True),
            ("nf4", True),
        ):
            parts = plan(
                model_id, config, PlanRequest(torch.bfloat16, Quantization(method), vision, 1, 8, 8, 8, None)
            ).weight_bytes_by_part
            base = base or parts
            lines.append(_ratio_row(method + (" + vision" if vision else ""), base, parts))
    return "\n".join(lines)


def _measured_parts(model: torch.nn.Module, measure) -> dict[str, int]:
    from app.engine.memory_plan import PARTS

    inner = model.model
    text = inner.language_model
    parts = {
        "vision tower": measure(inner.vision_tower),
        "projector": measure(inner.multi_modal_projector),
        "embeddings": measure(text.embed_tokens),
    }
    parts["language model"] = measure(text) - parts["embeddings"]
    tied = model.lm_head.weight is text.embed_tokens.weight
    parts["lm_head"] = 0 if tied else measure(model.lm_head)
    assert set(parts) <= set(PARTS)
    return {part: size for part, size in parts.items() if size}


# One layer -------------------------------------------------------------------------------------------
def layers(repeats: int) -> str:
    """One 2048 -> 8192 linear layer (Gemma 2B's MLP width) under each method, 1 and 32 rows, float32 and
    bfloat16 inputs; median ms of `repeats` calls, the methods alternating call by call."""
    from torch import nn

    from app.model.quantization import Quantization, quantize_in_place

    torch.manual_seed(0)
    weight = torch.randn(8192, 2048) * 0.02
    lines = [
        "### One linear layer, 2048 -> 8192 (`python -m benchmarks.quantization layers`)",
        "",
        f"Median ms of {repeats} calls, methods alternating call by call; torch's default threads.",
        "",
        "| rows | input dtype | none | int8 (torchao) | bnb-int8 | nf4 | bnb-int8 / int8 |",
        "|---|---|---|---|---|---|---|",
    ]
    for dtype in (torch.float32, torch.bfloat16):
        built = {}
        for method in ("none", "int8", "bnb-int8", "nf4"):
            layer = nn.Sequential(nn.Linear(2048, 8192, bias=False, dtype=dtype))
            layer[0].weight.data.copy_(weight.to(dtype))
            # The layer's name must not look like a kept module (lm_head, vision tower): "0" does not.
            quantize_in_place(layer, Quantization(method), quantize_vision=False)
            built[method] = layer
        for rows in (1, 32):
            x = torch.randn(rows, 2048, dtype=dtype)
            times: dict[str, list[float]] = {method: [] for method in built}
            with torch.inference_mode():
                for layer in built.values():
                    layer(x)
                for _ in range(repeats):
                    for method, layer in built.items():
                        started = time.perf_counter()
                        layer(x)
                        times[method].append((time.perf_counter() - started) * 1000)
            ms = {method: statistics.median(values) for method, values in times.items()}
            lines.append(
                f"| {rows} | {str(dtype).removeprefix('torch.')} | {ms['none']:.2f} | {ms['int8']:.2f} | "
                f"{ms['bnb-int8']:.2f} | {ms['nf4']:.2f} | {ms['bnb-int8'] / ms['int8']:.2f} |"
            )
    return "\n".join(lines)


# Speed ----------------------------------------------------------------------------------------------
def _load(method: str, dtype: str):
    from app.model.loader import load_model
    from app.model.quantization import Quantization, detect, quantize_in_place, weight_bytes
    from app.settings import Settings

    if method != "bnb-int8":
        return load_model(Settings(model="bench", dtype=dtype, quantization=method))
    loaded = load_model(Settings(model="bench", dtype=dtype))
    quantize_in_place(loaded.model, Quantization.BNB_INT8, quantize_vision=False)
    return dataclasses.replace(
        loaded, quantization=detect(loaded.model), weight_bytes=weight_bytes(loaded.model)
    )


def speed(
    methods: list[str],
    concurrency: int,
    rounds: int,
    warmup_s: float,
    duration_s: float,
    dtype: str,
    threads: int,
) -> tuple[str, dict[str, Any]]:
    from app.settings import Settings
    from benchmarks.ceiling import EngineDriver, prepare, steady_state
    from benchmarks.procs import loadavg
    from benchmarks.workload import TASKS, build_mix

    # On a shared machine torch's OpenMP threads spin-wait for each other while other processes hold the
    # cores: with 2 threads here, windows of the same method varied 10x. One thread measures the kernels.
    torch.set_num_threads(threads)
    settings = Settings(model="bench", dtype=dtype, max_batch_size=concurrency)
    models = {method: _load(method, dtype) for method in methods}
    mix = build_mix(4, tokens=dict.fromkeys(TASKS, 32), photos="synthetic")
    items = prepare(models[methods[0]], mix)
    runs: dict[str, list[dict[str, Any]]] = {method: [] for method in methods}
    for round_ in range(rounds):
        order = methods if round_ % 2 == 0 else list(reversed(methods))  # A/B, then B/A
        for method in order:
            driver = EngineDriver(models[method], settings)
            row = steady_state(driver, items, concurrency, warmup_s, duration_s)
            row["loadavg"] = loadavg()
            runs[method].append(row)
            print(
                f"[speed] round {round_ + 1} {method}: {row['tokens_per_s']:.1f} tokens/s, decode step "
                f"{fmt(row['decode']['ms_median'], 1)} ms, other processes {row['cpu']['other_cores']:.2f} "
                "cores",
                flush=True,
            )
    lines = [
        f"### Tokens/s on the CPU, `bench`, {concurrency} in flight, {dtype}, {threads} torch thread(s) "
        f"(`python -m benchmarks.quantization speed`)",
        "",
        f"{rounds} rounds of {duration_s:.0f} s windows (after {warmup_s:.0f} s warm-up), methods "
        "alternating; medians. `other cores`: CPU that other processes took during the windows.",
        "",
        "| quantization | weights MiB | decode step ms (rows) | decode tokens/s | / none | tokens/s (window) "
        "| prefill step ms | other cores |",
        "|---|---|---|---|---|---|---|---|",
    ]
    decode_tps: dict[str, float] = {}
    for method in methods:
        rows = runs[method]
        decode = statistics.median(r["decode"]["ms_median"] for r in rows if r["decode"]["ms_median"])
        decode_rows = statistics.median(r["decode"]["rows_mean"] for r in rows if r["decode"]["rows_mean"])
        # Tokens a decode step yields per second: what quantization changes (prefill is mostly the
        # vision tower, which stays in the dtype).
        decode_tps[method] = decode_rows * 1000 / decode
        prefill = [r["prefill"]["ms_median"] for r in rows if r["prefill"]["ms_median"]]
        other = statistics.median(r["cpu"]["other_cores"] for r in rows)
        lines.append(
            f"| {method} | {models[method].weight_bytes / 2**20:.1f} | {decode:.1f} ({decode_rows:.1f}) | "
            f"{decode_tps[method]:.1f} | {decode_tps[method] / decode_tps[methods[0]]:.2f} | "
            f"{statistics.median(r['tokens_per_s'] for r in rows):.1f} | "
            f"{fmt(statistics.median(prefill) if prefill else None, 1)} | {other:.2f} |"
        )
    return "\n".join(lines), {"runs": runs}


# Accuracy -------------------------------------------------------------------------------------------
ACCURACY_SETTINGS = (("none", False), ("int8", False), ("nf4", False), ("nf4", True))
# `paligemma eval` of the environment running the benchmark (the client's console script, as a module).
DEFAULT_EVAL = (
    f"{sys.executable} -m paligemma_client.cli eval {{task}} --coco {{coco}} --images {{images}} "
    "--url {url} --json"
)
TEXT_EVAL = f"{sys.executable} -m paligemma_client.cli eval {{task}} --jsonl {{jsonl}} --url {{url}} --json"
TEXT_TASKS = ("caption", "vqa", "ocr")


def accuracy(model: str, coco: Path, images: Path, eval_command: str, tasks: list[str],
             jsonl_dir: Path | None = None) -> str:
    from benchmarks import procs
    from benchmarks.systems import SYSTEMS, Config

    logs = Path(__file__).resolve().parent / "out" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    scores: dict[str, dict[str, Any]] = {}
    for method, vision in ACCURACY_SETTINGS:
        name = method + (" + vision" if vision else "")
        port = procs.free_port()
        command, env = SYSTEMS["ours"].command(port, Config(model=model))
        env.update(PALIGEMMA_QUANTIZATION=method, PALIGEMMA_QUANTIZE_VISION=str(vision).lower())
        log = logs / f"quantization-{method}{'-vision' if vision else ''}.log"
        with procs.running(f"ours-{name}", command, env, "/readyz", log, port) as server:
            scores[name] = {}
            for task in tasks:
                evaluation = eval_command.format(task=task, coco=coco, images=images, url=server.base_url)
                if task in TEXT_TASKS:  # caption / vqa / ocr: the JSONL file of that task in --jsonl-dir
                    if jsonl_dir is None:
                        raise SystemExit(f"{task} needs --jsonl-dir")
                    evaluation = TEXT_EVAL.format(task=task, jsonl=jsonl_dir / f"{task}.jsonl",
                                                  url=server.base_url)
                # Exit 1 means some requests failed; the document still scores the others.
                result = subprocess.run(shlex.split(evaluation), capture_output=True, text=True)
                if result.returncode not in (0, 1):
                    raise RuntimeError(f"{evaluation} exited {result.returncode}: {result.stderr[-2000:]}")
                try:
                    scores[name][task] = json.loads(result.stdout)
                except json.JSONDecodeError:  # exit 1 before any scoring (a missing module, a bad flag)
                    raise RuntimeError(f"{evaluation} exited {result.returncode} without a JSON document: "
                                       f"{result.stderr[-2000:]}") from None
        print(f"[accuracy] {name}: {json.dumps(scores[name])[:300]}", flush=True)

    def value(name: str, task: str, key: str) -> float | None:
        found = scores[name].get(task, {}).get(key)
        return float(found) if isinstance(found, (int, float)) else None

    # (column, task, key of its JSON document): COCO AP50 and the per-object numbers for boxes and masks,
    # exact match for the text tasks; each with its change from unquantized.
    columns = [("detect AP50", "detect", "AP50"), ("detect recall@0.5", "detect", "recall_50"),
               ("detect mean IoU", "detect", "mean_best_iou"),
               ("segment mask IoU", "segment", "mean_mask_iou"),
               *((f"{task} exact", task, "exact_match") for task in TEXT_TASKS)]
    columns = [c for c in columns if c[1] in tasks]
    lines = [
        f"### Accuracy under quantization: {model} (`python -m benchmarks.quantization accuracy`)",
        "",
        f"Dataset: {coco} ({images}){f', {jsonl_dir}' if jsonl_dir else ''}. Targets: detect AP50 and "
        "mask IoU within 0.02 of unquantized for int8, 0.05 for nf4. A cell: the value (change from none).",
        "",
        "| setting | " + " | ".join(c[0] for c in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for name in scores:
        cells = []
        for _, task, key in columns:
            got, base = value(name, task, key), value("none", task, key)
            change = _delta(got, base)
            cells.append(fmt(got, 3) + ("" if name == "none" or change is None else f" ({change:+.3f})"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _delta(value: float | None, base: float | None) -> float | None:
    return None if value is None or base is None else value - base


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("weights", help="bytes of bench and of the 3B / 10B architectures")
    layer = sub.add_parser("layers", help="one linear layer under each method")
    layer.add_argument("--repeats", type=int, default=30)
    fast = sub.add_parser("speed", help="tokens/s of the in-process engine on bench")
    fast.add_argument("--methods", default=",".join(METHODS))
    fast.add_argument("--concurrency", type=int, default=8)
    fast.add_argument("--rounds", type=int, default=4)
    fast.add_argument("--warmup", type=float, default=5.0)
    fast.add_argument("--duration", type=float, default=20.0)
    fast.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on a shared machine)")
    fast.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="the serving dtype (the CPU's default is float32)",
    )
    acc = sub.add_parser("accuracy", help="paligemma eval under each setting (needs a trained model)")
    acc.add_argument("--model", required=True, help="the trained demo model's directory (or any checkpoint)")
    acc.add_argument("--coco", type=Path, required=True, help="COCO annotations of held-out scenes")
    acc.add_argument("--images", type=Path, required=True)
    acc.add_argument(
        "--tasks",
        default="detect,segment",
        help="any of detect, segment (COCO; segment needs masks: PALIGEMMA_MASK_DECODER or the demo's own) "
             "and caption, vqa, ocr (with --jsonl-dir)",
    )
    acc.add_argument("--jsonl-dir", type=Path, help="folder of caption.jsonl, vqa.jsonl, ocr.jsonl (as "
                                                     "`python -m app.demo.export` writes them)")
    acc.add_argument(
        "--eval-command",
        default=DEFAULT_EVAL,
        help="the evaluation, with {task} {coco} {images} {url}; it prints one JSON document",
    )
    for command in (fast, acc, layer, sub.choices["weights"]):
        add_section_arguments(command, SECTION, quiet_wait_s=0)
    args = parser.parse_args(argv)
    wait_if_asked(args)
    started = time.perf_counter()
    if args.command == "weights":
        markdown = weights()
    elif args.command == "layers":
        markdown = layers(args.repeats)
    elif args.command == "speed":
        markdown, raw = speed(
            args.methods.split(","),
            args.concurrency,
            args.rounds,
            args.warmup,
            args.duration,
            args.dtype,
            args.threads,
        )
        out = Path(__file__).resolve().parent / "out"
        out.mkdir(exist_ok=True)
        (out / "quantization-speed.json").write_text(json.dumps(raw, indent=2, default=str))
    else:
        markdown = accuracy(args.model, args.coco, args.images, args.eval_command, args.tasks.split(","),
                            args.jsonl_dir)
    print(f"({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    publish(args, f"{SECTION}-{args.command}", markdown)


if __name__ == "__main__":
    main()
