"""LoRA adapters: what serving four of them, mixed in every step, costs against the base alone.

    python -m benchmarks.adapters                          # bench preset, N = 16 and 64, 2 rounds (~25 min)
    python -m benchmarks.adapters --concurrency 16 --rounds 1 --duration 20 --results -   # a quick look
    python -m benchmarks.adapters --steps-only --out FILE  # the per-step part alone (run.py-style child)

Two measurements, each alternating A and B so that a shared machine disturbs both alike (medians and
ratios are what the report quotes, with the machine's load average):

- Served throughput (`python -m app`, the benchmark workload of benchmarks/run.py, N requests in flight):
  A = the base alone (no adapters configured), B = the same server with 4 adapters of rank 16 loaded
  (PALIGEMMA_ADAPTERS) and every request naming one of them in turn, so each step mixes all four.
  Target: B >= 0.8 A at 16 and 64 in flight.
- The LoRA path's cost per step, in-process (a child process, like the ceiling): the decode step over
  16 and 64 rows with every row on the base, then with the rows spread evenly over the 4 adapters (as
  eager steps add deltas: per adapter present; and in the fixed-shape form captured CUDA graphs use),
  and a prefill of 8 newcomers, base against mixed.

The adapters are made here with PEFT: rank 16, alpha 32, on the modules the common PaliGemma fine-tuning
recipe targets (`q_proj k_proj v_proj o_proj gate_proj up_proj down_proj`: the language model's attention
and MLP, and the vision tower's attention, whose q/k/v share those names), their B matrices drawn at
random (a freshly initialised LoRA adds nothing) and saved with `save_pretrained`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import shlex
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks import procs, report
from benchmarks.report import fmt
from benchmarks.workload import PHOTO_SOURCES, Request, build_mix, multipart, skimage_available

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "out"
SECTION = "adapters"
ADAPTERS = 4
RANK = 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGET_RATIO = 0.8
# The decode steps timed: every row on the base, then rows mixed over the adapters with each form of
# adding the deltas (app.adapters.lora_linear; eager steps with 2 adapters or more take the dense one).
DECODE_FORMS = {"base": "auto", "mixed, grouped (per adapter)": "grouped",
                "mixed, dense (all slots, as CUDA graphs)": "dense"}


def make_adapters(model: str, directory: Path, device: str = "cpu", count: int = ADAPTERS,
                  rank: int = RANK) -> list[Path]:
    """`count` PEFT LoRA adapters for the preset `model`, saved under `directory` (made once, reused)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from app.model.loader import load_model
    from app.settings import Settings

    folders = [directory / f"adapter{i}" for i in range(count)]
    missing = [(i, folder) for i, folder in enumerate(folders)
               if not (folder / "adapter_model.safetensors").is_file()]
    if not missing:
        return folders
    base = load_model(Settings(model=model, device=device)).model
    for i, folder in missing:
        torch.manual_seed(1000 + i)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights="gaussian")
        peft_model = get_peft_model(base, config)
        with torch.no_grad():
            for name, parameter in peft_model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0.0, 0.02)
        peft_model.save_pretrained(folder, save_embedding_layers=False)
        base = peft_model.unload()  # the base again, for the next one
    return folders


# ------------------------------------------------------------------------------------------- steps
def measure_steps(model: str, folders: list[Path], rounds: int, repeats: int, device: str = "cpu",
                  row_counts: tuple[int, ...] = (16, 64)) -> dict[str, Any]:
    """Decode and prefill step times, base rows against rows mixed over the adapters (this process).

    On CUDA the decode steps are the captured graphs the server replays, also timed on the model before
    any layer is wrapped (no adapters configured at all); on the CPU they run eagerly, each way of adding
    the deltas timed apart."""
    import torch

    from app.adapters.bank import AdapterBank, AdapterRef
    from app.adapters.folder import read_adapter
    from app.engine.runner import ModelStepRunner, RowInput, RunnerConfig
    from app.engine.scheduler import Sequence
    from app.images import decode_image
    from app.model.inputs import ImageTransform, PromptEncoder
    from app.model.loader import load_model
    from app.settings import Settings

    loaded = load_model(Settings(model=model, device=device))
    graphs = loaded.device.type == "cuda"
    # On the CPU the process's own CPU time: a shared machine stretches wall time by whatever else runs
    # (in one torch thread, as --step-threads makes it, CPU time is the work done). On CUDA, wall time:
    # every timed call reads its tokens back, so it waits for the device.
    clock = time.perf_counter if graphs or torch.get_num_threads() > 1 else time.process_time
    encoder = PromptEncoder.from_processor(loaded.processor)
    transform = ImageTransform.from_processor(loaded.processor)
    photos = build_mix(1, photos="synthetic")[:8]
    pixels = [transform(decode_image(r.jpeg, max_pixels=10**9, min_side=transform.min_side).image)
              for r in photos]
    prompt = encoder.encode("caption en")
    refs: list[AdapterRef] = []

    def sequences(count: int, mixed: bool) -> list[Sequence]:
        seqs = []
        for row in range(count):
            item = RowInput(prompt, pixels[row % len(pixels)], None,
                            adapter=refs[row % len(refs)] if mixed else None)
            seq = Sequence(len(item.input_ids), 1_000, frozenset(), item)
            seq.row = row
            seqs.append(seq)
        return seqs

    def ready(runner: ModelStepRunner, seqs: list[Sequence]) -> tuple[ModelStepRunner, list[Sequence]]:
        for start in range(0, len(seqs), 8):  # each row's prompt into the cache (not timed)
            for seq, token in zip(seqs[start:start + 8], runner.prefill(seqs[start:start + 8]), strict=True):
                seq.computed.append(token)
        return runner, seqs

    def decode_in_place(runner: ModelStepRunner, seqs: list[Sequence]) -> None:
        """One decode step, then the rows put back at the position it wrote (the row table advances them),
        so every timed step is the same step however many run. It returns the sampled tokens as ints: each
        timed call waits for the device."""
        runner.decode(seqs, len(seqs))
        runner.table.host("position")[:len(seqs)] -= 1

    def alternated(states: dict[str, tuple[ModelStepRunner, list[Sequence]]]) -> dict[str, float]:
        times: dict[str, list[float]] = {mode: [] for mode in states}
        for _ in range(rounds):
            for mode, (runner, seqs) in states.items():
                times[mode].append(report.median_ms(lambda r=runner, s=seqs: decode_in_place(r, s), repeats,
                                                    clock))
        return {mode: statistics.median(values) for mode, values in times.items()}

    def config(rows: int, bank: AdapterBank | None, form: str = "auto") -> RunnerConfig:
        return RunnerConfig(rows=rows, max_prompt_tokens=32, max_new_tokens=64, adapters=bank,
                            adapter_decode=form)  # type: ignore[arg-type]

    results: dict[str, Any] = {"device": str(loaded.device), "graphs": graphs, "decode": {}, "prefill": {},
                               "clock": "wall" if clock is time.perf_counter else "process CPU time"}
    with torch.inference_mode():
        plain = {}
        if graphs:  # before any layer is wrapped: the server without adapters
            for rows in row_counts:
                runner = ModelStepRunner(loaded, config(rows, None))
                runner.capture_graphs()
                plain[rows] = ready(runner, sequences(rows, False))
        # In the model's dtype, as PALIGEMMA_LORA_DTYPE=auto serves them.
        bank = AdapterBank(loaded.model, ADAPTERS, RANK, loaded.device, loaded.dtype)
        for slot, folder in enumerate(folders, start=1):
            staged = bank.stage(read_adapter(folder, loaded.model.config))
            bank.write(slot, staged)
            refs.append(AdapterRef(folder.name, slot, slot, staged.vision))
        results.update(bank_mib=bank.bytes / 2**20, layers=len(bank.layers),
                       bank_dtype=str(bank.dtype).removeprefix("torch."))
        for rows in row_counts:
            if graphs:
                # A runner each: its row table holds what its rows run (the adapter slot among it).
                runners = [ModelStepRunner(loaded, config(rows, bank)) for _ in range(2)]
                for runner in runners:
                    runner.capture_graphs()
                states = {"no adapters configured": plain[rows],
                          "adapters configured, base rows": ready(runners[0], sequences(rows, False)),
                          "mixed, CUDA graph (dense)": ready(runners[1], sequences(rows, True))}
            else:
                states = {mode: ready(ModelStepRunner(loaded, config(rows, bank, form)),
                                      sequences(rows, mode != "base"))
                          for mode, form in DECODE_FORMS.items()}
            results["decode"][rows] = alternated(states)
            print(f"[steps] decode over {rows} rows: " + ", ".join(
                f"{mode} {ms:.2f} ms" for mode, ms in results["decode"][rows].items()), flush=True)
        runner = ModelStepRunner(loaded, config(8, bank))
        batches = {"base": sequences(8, False), "mixed": sequences(8, True)}
        times: dict[str, list[float]] = {mode: [] for mode in batches}
        for _ in range(rounds):
            for mode, seqs in batches.items():
                times[mode].append(report.median_ms(lambda s=seqs: runner.prefill(s), max(1, repeats // 4),
                                                    clock))
        results["prefill"][8] = {mode: statistics.median(values) for mode, values in times.items()}
        print("[steps] prefill of 8: " + ", ".join(
            f"{mode} {ms:.1f} ms" for mode, ms in results["prefill"][8].items()), flush=True)
    return results


# ------------------------------------------------------------------------------------------ served
def adapter_mix(mix: list[Request], names: list[str]) -> list[Request]:
    """The same requests, each naming the next adapter in turn (so every step mixes them all)."""
    mixed = []
    for i, request in enumerate(mix):
        fields = {**request.fields, "adapter": names[i % len(names)]}
        body, content_type = multipart({**fields, "max_new_tokens": str(request.max_new_tokens)},
                                       request.jpeg)
        mixed.append(dataclasses.replace(request, fields=fields, body=body, content_type=content_type))
    return mixed


def measure_served(args: argparse.Namespace, folders: list[Path], stamp: str, logs: Path = OUT / "logs",
                   device: str | None = None) -> dict[str, Any]:
    """Rounds of (the base server, the adapter server), each measured at every N; `args` has model,
    concurrency, rounds, warmup, duration, variants, photos and quiet_wait."""
    from benchmarks.run import measure_level
    from benchmarks.systems import SYSTEMS, Config

    mix = build_mix(args.variants, tokens=getattr(args, "tokens", None), photos=args.photos)
    names = [folder.name for folder in folders]
    setups = {
        "base": ({}, mix),
        "4 adapters": ({"PALIGEMMA_ADAPTERS": ",".join(f"{f.name}={f}" for f in folders),
                        "PALIGEMMA_MAX_ADAPTERS": str(ADAPTERS), "PALIGEMMA_MAX_LORA_RANK": str(RANK)},
                       adapter_mix(mix, names)),
    }
    levels: dict[str, dict[int, list[dict[str, Any]]]] = {name: {n: [] for n in args.concurrency}
                                                          for name in setups}
    system = SYSTEMS["ours"]
    for round_index in range(args.rounds):
        for name, (extra, requests) in setups.items():
            port = procs.free_port()
            command, env = system.command(port, Config(args.model))
            env = {**env, **extra, **({"PALIGEMMA_DEVICE": device} if device else {})}
            threads = getattr(args, "server_threads", 0)
            if threads:
                env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
            if args.quiet_wait > 0:
                procs.wait_until_quiet(args.quiet_wait)
            log = logs / f"adapters-{name.replace(' ', '-')}-{stamp}-{round_index}.log"
            with procs.running(name, command, env, system.ready_path, log, port) as server:
                index = 0
                for concurrency in args.concurrency:
                    level = asyncio.run(measure_level(server, True, requests, concurrency, args.warmup,
                                                      args.duration, index))
                    index += level.pop("sent")
                    level.pop("samples", None)
                    levels[name][concurrency].append(level)
                    print(f"[served] round {round_index + 1} {name} N={concurrency}: "
                          f"{level['requests_per_s']:.2f} req/s, errors {level['errors'] or 0}, load "
                          f"{level['loadavg']:.1f}, other processes "
                          f"{level['cpu'].get('other_cores', 0):.2f} cores", flush=True)
    return {"levels": levels, "command": shlex.join(command)}


# ------------------------------------------------------------------------------------------ report
def _per_cpu_s(level: dict[str, Any]) -> float | None:
    cores = level.get("cpu", {}).get("server_cores")
    return level["requests_per_s"] / cores if cores else None


def _median_ratio(values: list[float | None], references: list[float | None]) -> float | None:
    ratios = [v / r for v, r in zip(values, references, strict=False) if v is not None and r]
    return statistics.median(ratios) if ratios else None


def _list(values: list[float | None], digits: int = 2) -> str:
    return ", ".join(fmt(v, digits) for v in values)


def render(results: dict[str, Any]) -> str:
    results = json.loads(json.dumps(results))  # as written to disk: counts of rows and N as strings
    meta = results["meta"]
    lines = [f"## LoRA adapters: four mixed in every step against the base alone ({meta['date']})", "",
             f"`{meta['command']}` at commit {meta['commit']}, `{meta['model']}` preset; 4 PEFT adapters "
             f"of rank {RANK} on `{' '.join(TARGETS)}` (language model attention and MLP, vision tower "
             f"q/k/v). Machine: {meta['cpu']}, {meta['cores']} cores, shared: the load average is quoted "
             "per window.", ""]
    served = results.get("served")
    if served:
        threads = meta.get("server_threads") or "the server's default"
        lines += ["### Served throughput (`python -m app`, the benchmark workload, N in flight)", "",
                  "Each round starts the base server then the adapter server (torch threads per server: "
                  f"{threads}); every request of the adapter run names one of the 4 adapters in turn. "
                  "Requests per second in each round's window, and per second of CPU the server used in it "
                  "(on a shared machine the server gets what the others leave; per CPU-second is the "
                  "comparison that survives that). Ratios: adapters / base, median of the rounds.", "",
                  "| in flight | base req/s | 4 adapters req/s | ratio | base req per CPU-s | 4 adapters "
                  "req per CPU-s | ratio per CPU-s | target >= 0.8 | load averages |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for n in meta["concurrency"]:
            base, mixed = (served["levels"][name][str(n)] for name in ("base", "4 adapters"))
            per_cpu = [[_per_cpu_s(level) for level in levels] for levels in (base, mixed)]
            rates = [[lv["requests_per_s"] for lv in levels] for levels in (base, mixed)]
            ratio = _median_ratio(rates[1], rates[0])
            cpu_ratio = _median_ratio(per_cpu[1], per_cpu[0])
            verdict = "n/a" if cpu_ratio is None else "met" if cpu_ratio >= TARGET_RATIO else "not met"
            loads = [lv["loadavg"] for lv in [*base, *mixed]]
            lines.append(
                f"| {n} | {_list(rates[0])} | {_list(rates[1])} | {fmt(ratio)} | {_list(per_cpu[0])} | "
                f"{_list(per_cpu[1])} | {fmt(cpu_ratio)} | {verdict} | {_list(loads, 1)} |")
        lines.append("")
    steps = results.get("steps")
    if steps:
        threads = f", {steps['threads']} torch thread(s)" if "threads" in steps else ""
        lines += ["### The LoRA path per step (in-process, medians of alternated rounds)", "",
                  f"Stacked weights: {steps['bank_mib']:.1f} MiB over {steps['layers']} wrapped linear "
                  f"layers ({ADAPTERS} slots of rank {RANK}, {steps.get('bank_dtype', 'float32')}), on "
                  f"{steps.get('device', 'cpu')}"
                  f"{', decode steps as CUDA graphs' if steps.get('graphs') else ', eager steps'}{threads}; "
                  f"{steps.get('clock', 'wall')} per step.", "",
                  "| step | reference | reference ms | ms | LoRA cost |", "|---|---|---|---|---|"]
        for rows, modes in steps["decode"].items():
            reference, *others = modes  # the first: every row on the base
            base = modes[reference]
            for mode in others:
                cost = modes[mode] - base
                lines.append(f"| decode, {rows} rows, {mode} | {reference} | {fmt(base, 2)} | "
                             f"{fmt(modes[mode], 2)} | {fmt(cost, 2)} ms ({fmt(100 * cost / base, 0)} %) |")
        for rows, modes in steps["prefill"].items():
            base, mixed = modes["base"], modes["mixed"]
            lines.append(f"| prefill of {rows} (image + prompt), 2 rows per adapter | base rows | "
                         f"{fmt(base, 1)} | {fmt(mixed, 1)} | {fmt(mixed - base, 1)} ms "
                         f"({fmt(100 * (mixed / base - 1), 0)} %) |")
        lines.append("")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", default="bench")
    parser.add_argument("--concurrency", default="16,64")
    parser.add_argument("--rounds", type=int, default=2, help="A/B rounds of the served measurement")
    parser.add_argument("--duration", type=float, default=40.0, help="window per N, s")
    parser.add_argument("--warmup", type=float, default=10.0, help="warm-up before each window, s")
    parser.add_argument("--variants", type=int, default=16, help="rounds of the workload mix")
    parser.add_argument("--photos", choices=PHOTO_SOURCES,
                        default="skimage" if skimage_available() else "synthetic")
    parser.add_argument("--step-rounds", type=int, default=5, help="alternated rounds of the step timing")
    parser.add_argument("--step-repeats", type=int, default=12, help="steps timed per round")
    parser.add_argument("--step-threads", type=int, default=1,
                        help="torch threads of the step timing (default 1: on a shared machine a 2-thread "
                        "OpenMP team waits for a descheduled thread at every op, which swamps the LoRA "
                        "path's cost; 0: torch's default)")
    parser.add_argument("--server-threads", type=int, default=0,
                        help="torch threads of both servers (OMP_NUM_THREADS; default: the server's own)")
    parser.add_argument("--no-served", action="store_true", help="only the per-step measurement")
    parser.add_argument("--no-steps", action="store_true", help="only the served measurement")
    parser.add_argument("--steps-only", action="store_true", help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    report.add_section_arguments(parser, SECTION, quiet_wait_s=0.0)
    args = parser.parse_args(argv)
    args.concurrency = [int(n) for n in str(args.concurrency).split(",")]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    folders = make_adapters(args.model, OUT / "adapters" / args.model)
    if args.steps_only:
        import torch

        if args.step_threads:
            torch.set_num_threads(args.step_threads)
        steps = measure_steps(args.model, folders, args.step_rounds, args.step_repeats)
        steps["threads"] = torch.get_num_threads()
        args.out.write_text(json.dumps(steps))
        return
    from benchmarks.run import machine_info

    OUT.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    machine = machine_info()
    results: dict[str, Any] = {"meta": {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m benchmarks.adapters " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "commit": machine["commit"], "cpu": machine["cpu"], "cores": machine["cores"], "model": args.model,
        "concurrency": args.concurrency, "server_threads": args.server_threads}}
    if not args.no_steps:
        out = OUT / f"adapter-steps-{stamp}.json"
        started = time.perf_counter()
        subprocess.run([procs.python(), "-m", "benchmarks.adapters", "--steps-only", "--model", args.model,
                        "--step-rounds", str(args.step_rounds), "--step-repeats", str(args.step_repeats),
                        "--step-threads", str(args.step_threads), "--out", str(out)],
                       check=True, cwd=ROOT.parent, timeout=3600)
        results["steps"] = json.loads(out.read_text())
        results["meta"]["steps_s"] = time.perf_counter() - started
    if not args.no_served:
        results["served"] = measure_served(args, folders, stamp)
    raw = OUT / f"adapters-{stamp}.json"
    raw.write_text(json.dumps(results, indent=1))
    print(f"raw results: {raw}")
    report.publish(args, SECTION, render(results))


if __name__ == "__main__":
    main()
