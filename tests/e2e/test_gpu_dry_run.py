"""`python -m benchmarks.gpu --dry-run`: the GPU benchmark's whole code path on the CPU (tiny preset).

The GPU run happens on a machine lent for a few minutes, where a crash in its last stage would waste the
whole lease; this runs the same stages here: the in-process ceiling through the server's engine, our
server at several concurrencies and with mixed lengths, the tutorial server, the report. It checks what
ran and that nothing failed, never how fast (timings belong in the benchmark's output).
In-process, so a timeout still unwinds through the `procs.running` blocks that stop the servers.
"""

from __future__ import annotations

import json

import pytest

from benchmarks import gpu
from benchmarks.procs import group_pids


@pytest.mark.timeout(400)
def test_the_dry_run_measures_every_stage_and_writes_its_report(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    results_md = tmp_path / "RESULTS.md"
    gpu.main(["--dry-run", "--results", str(results_md)])

    results = json.loads((tmp_path / "gpu-dry-run.json").read_text())
    plan = gpu.DRY
    ceiling = results["in_process"]["ceiling"]
    assert [row["concurrency"] for row in ceiling] == list(plan.ceiling)
    assert all(row["decode"]["steps"] > 0 for row in ceiling)
    assert set(results["in_process"]["replay_ms"]) == {"1", str(plan.rows)}

    served = results["served"]
    assert "error" not in served
    assert [level["concurrency"] for level in served["levels"]] == list(plan.served)
    for level in [*served["levels"], served["mixed"]]:
        # The `tiny` preset's small vocabulary makes <eos> likely enough that a request may end early;
        # the load generator counts those apart (token_mismatches) rather than as errors.
        assert level["errors"] == {} and 0 <= level["token_mismatches"] < level["completed"]
        assert level["server_metrics"]["decode_steps"] > 0  # /metrics scraped around the window
    assert sum(level["completed"] for level in served["levels"]) > 0
    assert set(served["mixed"]["per_length"]) <= {str(n) for n in gpu.MIXED_LENGTHS}
    assert [level["concurrency"] for level in results["tutorial"]["levels"]] == list(plan.tutorial)
    assert all(level["errors"] == {} for level in results["tutorial"]["levels"])
    assert {check["name"].split(" ")[0] for check in results["targets"]} >= {"served", "decode", "mixed"}

    markdown = (tmp_path / "gpu-dry-run.md").read_text()
    assert "DRY RUN" in markdown and "### Targets" in markdown
    assert "<!-- BEGIN gpu -->" in results_md.read_text()
    for log in ("gpu-server.log", "gpu-tutorial.log"):
        assert (tmp_path / log).stat().st_size > 0
    # Both servers were stopped with everything they started (each ran in a process group of its own).
    assert group_pids(served["pid"]) == [] and group_pids(results["tutorial"]["pid"]) == []


@pytest.mark.timeout(400)
def test_the_adapter_dry_run_times_the_steps_serves_both_and_writes_its_report(tmp_path, monkeypatch):
    """`--adapters --dry-run`: the adapters made with PEFT, the step timings, the base server and the
    server with the 4 adapters (every request naming one), the report."""
    monkeypatch.setenv("OUT", str(tmp_path))
    results_md = tmp_path / "RESULTS.md"
    gpu.main(["--adapters", "--dry-run", "--results", str(results_md)])

    results = json.loads((tmp_path / "gpu-dry-run-adapters.json").read_text())
    steps = results["steps"]
    assert steps["layers"] > 0 and steps["bank_mib"] > 0
    assert set(steps["decode"][str(gpu.DRY.rows)]) == {"base", "mixed, grouped (per adapter)",
                                                      "mixed, dense (all slots, as CUDA graphs)"}
    assert all(ms > 0 for ms in steps["prefill"]["8"].values())
    levels = results["served"]["levels"]
    for name in ("base", "4 adapters"):
        assert [level["errors"] for level in levels[name][str(gpu.DRY.adapter_served[0])]] == [{}]
    assert "<!-- BEGIN gpu_adapters -->" in results_md.read_text()
    assert "### Served throughput" in (tmp_path / "gpu-dry-run-adapters.md").read_text()


@pytest.mark.timeout(400)
def test_the_quantized_dry_run_measures_each_quantization(tmp_path, monkeypatch):
    """`python -m benchmarks.gpu --quantized --dry-run`: the 10B nf4/int8 stages on `tiny` on the CPU."""
    from benchmarks import gpu_quantized

    monkeypatch.setenv("OUT", str(tmp_path))
    results_md = tmp_path / "RESULTS.md"
    gpu.main(["--quantized", "--dry-run", "--results", str(results_md)])
    results = json.loads((tmp_path / "gpu-quantized-dry-run.json").read_text())
    plan = gpu_quantized.DRY
    assert list(results["methods"]) == list(plan.methods)
    for method, entry in results["methods"].items():
        local = entry["in_process"]
        assert "error" not in local, local
        assert local["quantization"] == method
        assert [row["concurrency"] for row in local["levels"]] == list(plan.in_flight)
        assert all(row["decode"]["steps"] > 0 for row in local["levels"])
        assert set(local["decode"]) == {"1", str(plan.rows)}
        assert local["decode"]["1"]["floor_bytes"]["weights"] > 0
        served = entry["served"]
        assert "error" not in served, served
        assert served["errors"] == {} and served["completed"] > 0
    assert "<!-- BEGIN gpu-quantized -->" in results_md.read_text()
