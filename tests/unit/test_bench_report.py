"""The benchmark's arithmetic on made-up numbers: /metrics windows, efficiency verdicts, mixed lengths."""

from __future__ import annotations

from benchmarks import promstats, report
from benchmarks.workload import build_mix, spread_new_tokens


def _scrape(decode_buckets: dict[str, float], decode_sum: float, prefill_count: float) -> promstats.Scrape:
    bucket = "paligemma_step_rows_bucket"
    scrape: promstats.Scrape = {bucket: {}, "paligemma_step_rows_count": {}, "paligemma_step_rows_sum": {}}
    for le, count in decode_buckets.items():
        scrape[bucket][(("le", le), ("phase", "decode"))] = count
        scrape[bucket][(("le", le), ("phase", "prefill"))] = prefill_count
    total = max(decode_buckets.values())
    scrape["paligemma_step_rows_count"] = {(("phase", "decode"),): total, (("phase", "prefill"),): prefill_count}
    scrape["paligemma_step_rows_sum"] = {(("phase", "decode"),): decode_sum, (("phase", "prefill"),): prefill_count}
    return scrape


def test_decode_rows_of_a_window_come_from_the_difference_of_two_scrapes():
    before = _scrape({"1.0": 5, "2.0": 5, "4.0": 5, "+Inf": 5}, 5, 3)
    # In the window: 10 decode steps, 2 of 2 rows and 8 of 3-4 rows (cumulative buckets); 4 prefills.
    after = _scrape({"1.0": 5, "2.0": 7, "4.0": 15, "+Inf": 15}, 5 + 2 * 2 + 8 * 4, 7)
    summary = promstats.window_summary(before, after)
    assert summary["decode_steps"] == 10
    assert summary["decode_rows_distribution"] == {"2.0": 2, "4.0": 8}
    assert summary["mean_decode_rows"] == (2 * 2 + 8 * 4) / 10
    assert summary["prefill_steps"] == 4


def _results(ours: dict[int, float], ceiling: dict[int, float], p50_at_1: float) -> dict:
    levels = [{"concurrency": n, "requests_per_s": rps, "completed": 10, "latency_ms": {"p50": p50_at_1}}
              for n, rps in ours.items()]
    rows = [{"mode": report.SERVER_PATH, "concurrency": n, "requests_per_s": rps, "cpu": {"other_cores": 0.0}}
            for n, rps in ceiling.items()]
    return {"meta": {"concurrency": sorted(ours)}, "ceiling": {"results": rows},
            "systems": {"ours": {"levels": levels}}}


def test_efficiency_is_judged_at_every_level_from_4_in_flight_and_p50_against_static_batching():
    results = _results({1: 3.0, 4: 3.6, 16: 3.5}, {1: 3.5, 4: 3.8, 16: 4.0}, p50_at_1=280.0)
    summary = report.summarise(results)
    rows = {row["concurrency"]: row for row in summary["efficiency"]["ours"]}
    assert rows[1]["target"] is None and rows[1]["met"] is None  # 1 in flight: reported, not judged
    assert rows[4]["met"] is True  # 3.6 / 3.8 = 0.95
    assert rows[16]["met"] is False  # 3.5 / 4.0 = 0.875
    assert summary["efficiency_met"] is False
    assert summary["p50_vs_static"]["ours"]["met"] is True  # 280 <= 293
    assert "**not met**" in "\n".join(report._summary_lines(summary, results))


def test_a_disturbed_ceiling_gives_no_verdict():
    results = _results({1: 3.0, 4: 3.0}, {1: 3.5, 4: 4.0}, p50_at_1=300.0)
    for row in results["ceiling"]["results"]:
        row["cpu"]["other_cores"] = 1.0
    summary = report.summarise(results)
    row = summary["efficiency"]["ours"][1]
    assert row["ceiling_disturbed"] and report._verdict(row, disturbed=True).startswith("no verdict")
    assert summary["p50_vs_static"]["ours"]["met"] is False  # 300 > 293


def test_mixed_lengths_cycle_through_every_length_and_the_bodies_ask_for_them():
    mix = spread_new_tokens(build_mix(variants=1, photos="synthetic"), (8, 64))
    assert [r.max_new_tokens for r in mix[:4]] == [8, 64, 8, 64]
    for request in mix[:2]:
        assert f'name="max_new_tokens"\r\n\r\n{request.max_new_tokens}\r\n'.encode() in request.body


def test_a_system_measured_again_replaces_its_tables_and_the_report_says_when():
    from benchmarks.run import merge

    base = _results({1: 3.0, 4: 2.0}, {1: 3.5, 4: 4.0}, p50_at_1=280.0)
    base["meta"].update(date="day 1", command="python -m benchmarks.run")
    again = _results({1: 3.1, 4: 3.9}, {}, p50_at_1=270.0)
    again["ceiling"] = None
    again["meta"].update(date="day 2", command="python -m benchmarks.run --systems ours",
                         machine={"commit": "abc1234", "app_dirty": False})
    merged = merge(base, again)
    assert merged["systems"]["ours"]["measured"] == "day 2"
    assert merged["ceiling"] == base["ceiling"] and not merged["meta"]["ceiling_runs"]
    assert merged["meta"]["remeasured"][0]["systems"] == ["ours"]
    assert report.summarise(merged)["efficiency"]["ours"][1]["met"] is True  # 3.9 / 4.0
