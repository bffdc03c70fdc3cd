"""Many LoRA adapters mixed in one engine equal PEFT's model with each adapter merged, request by request.

Adapters trained here with PEFT (tests/trained_adapters.py: language-model attention at rank 4,
attention + MLP at rank 8 with per-layer ranks and alphas, every linear layer including the vision tower
and projector at rank 16 with rsLoRA) are read from their folders into the slots of one served model.
Requests for the base and for each adapter arrive at random steps, share prefills and decode steps,
repeat images (so the feature cache sees one image under several adapters), and some are cancelled;
every request that finishes must have exactly the greedy tokens of PEFT's `merge_and_unload` model for
its adapter running `generate` on it alone. Run on PaliGemma's (`tiny`) and PaliGemma 2's
(`tiny-gemma2`) layouts, adding the deltas both ways the engine does: per adapter present (eager steps)
and in the fixed-shape form a captured CUDA graph replays; and through the runner's graph-capture seam,
with "graphs" that run that fixed-shape step over whole buckets, idle rows included, reading each row's
adapter slot from the row table as a captured graph does (a CUDA graph cannot be captured on a CPU).
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest

from app.adapters.bank import AdapterBank, AdapterRef
from app.adapters.folder import read_adapter
from app.engine.graphs import Replay
from app.engine.runner import ModelStepRunner, RowInput
from app.engine.scheduler import Sequence, State
from app.model.loader import LoadedModel, load_model
from app.settings import Settings
from tests.model.test_engine_exactness import PROMPTS, Driver, generate_alone, make_input
from tests.trained_adapters import KINDS, merged_model, train_adapter

LONGEST = 16


@dataclasses.dataclass
class Setup:
    served: LoadedModel
    bank: AdapterBank
    refs: dict[str, AdapterRef]
    references: dict[str | None, LoadedModel]  # None: the base
    folders: dict[str, Path]
    _expected: dict[tuple[str | None, str, int], list[int]] = dataclasses.field(default_factory=dict)

    def expected(self, name: str | None, prompt: str, image: int, max_new: int) -> list[int]:
        """PEFT's merged model's greedy tokens, alone: computed once for LONGEST tokens, then cut (greedy
        decoding with fewer tokens is a prefix of it)."""
        key = (name, prompt, image)
        if key not in self._expected:
            self._expected[key] = generate_alone(self.references[name], make_input(self.served, prompt, image),
                                                 LONGEST)
        return self._expected[key][:max_new]


@pytest.fixture(scope="module", params=["tiny", "tiny-gemma2"])
def setup(request, tmp_path_factory) -> Setup:
    preset = request.param
    folders = {kind.name: train_adapter(preset, kind, tmp_path_factory.mktemp(f"{preset}-{kind.name}"))
               for kind in KINDS}
    served = load_model(Settings(model=preset))
    bank = AdapterBank(served.model, max_adapters=4, max_rank=16, device=served.device)
    refs = {}
    for slot, (name, folder) in enumerate(folders.items(), start=1):
        staged = bank.stage(read_adapter(folder, served.model.config))
        bank.write(slot, staged)
        refs[name] = AdapterRef(name, slot, uid=100 + slot, vision=staged.vision)
    references: dict[str | None, LoadedModel] = {None: load_model(Settings(model=preset))}
    references.update({name: merged_model(preset, folder) for name, folder in folders.items()})
    return Setup(served, bank, refs, references, folders)


def test_the_adapters_read_as_trained(setup):
    assert {name: ref.vision for name, ref in setup.refs.items()} == {kind.name: kind.vision for kind in KINDS}
    ranks = {name: max(layer.ranks[ref.slot] for layer in setup.bank.layers.values())
             for name, ref in setup.refs.items()}
    assert ranks == {"attention": 4, "attention-mlp": 8, "everything": 16}


def _schedule(setup: Setup, seed: int, count: int = 12):
    rng = random.Random(seed)
    names: list[str | None] = [None, *setup.refs]
    plans = []
    for i in range(count):
        # The base and each adapter in turn, so every one runs whatever the seed; images repeat.
        name = names[i % len(names)]
        image, prompt = rng.randrange(4), rng.choice(PROMPTS)
        item = dataclasses.replace(make_input(setup.served, prompt, image), image_key=f"image-{image}",
                                   adapter=setup.refs[name] if name else None)
        arrive = rng.randrange(0, 20)
        cancel = arrive + rng.randrange(1, 8) if rng.random() < 0.2 else None
        plans.append((arrive, cancel, name, prompt, image, item, rng.randrange(4, LONGEST + 1)))
    return plans


class FixedShapeStandIn:
    """Captures "graphs" that replay the decode step in the form a CUDA graph captures
    (DecodeGraphs.fixed_step): the dense form over all slots, every row of the bucket read from the row
    table."""

    def __init__(self) -> None:
        self.runner: ModelStepRunner | None = None
        self.replayed = 0

    def __call__(self, size: int) -> Replay:
        assert self.runner is not None
        graphs = self.runner.graphs

        def replay():
            self.replayed += 1
            return graphs.fixed_step(size)

        return replay


def _run(setup: Setup, plans, form: str) -> tuple[list[Sequence | None], Driver]:
    stand_in = FixedShapeStandIn() if form == "graphs" else None
    driver = Driver(setup.served, rows=4, prefill_token_budget=3 * (setup.served.image_seq_length + 20),
                    graph_capture=stand_in, adapters=setup.bank,
                    adapter_decode="grouped" if form == "graphs" else form,
                    # "dense": prefills and the vision tower too, as on CUDA (RunnerConfig.adapter_prefill)
                    adapter_prefill="dense" if form == "dense" else "grouped", feature_cache_size=8)
    if stand_in is not None:
        stand_in.runner = driver.runner
        driver.runner.capture_graphs()
        # The warm-up check replayed each bucket with rows spread over every slot, against the eager step.
        assert driver.runner.graphs.captured == [1, 2, 4] and driver.runner.graphs.failure is None
        assert stand_in.replayed == 3
    seqs: list[Sequence | None] = [None] * len(plans)
    rows = driver.runner.table.host("adapter")
    for step in range(1000):
        for i, (arrive, cancel, *_, item, max_new) in enumerate(plans):
            if arrive == step:
                seqs[i] = driver.submit(item, max_new)
            if cancel == step and seqs[i] is not None:
                seqs[i].cancel_reason = "disconnected"
        assert driver.loop.step_once()
        # Each running row's decode steps read its adapter's slot; every other row reads the base's.
        assert {row: int(rows[row]) for row in range(driver.runner.rows) if rows[row]} == {
            row: seq.payload.slot for row, seq in driver.scheduler.running.items() if seq.payload.slot}
        if step > 20 and driver.scheduler.idle:
            break
    return seqs, driver


# The same arrivals both ways, so PEFT's reference outputs are computed once.
@pytest.mark.parametrize("form", ["grouped", "dense", "graphs"])
def test_mixed_adapters_equal_peft_merged_generate_alone(setup, form):
    plans = _schedule(setup, seed=1)
    seqs, driver = _run(setup, plans, form)
    finished = changed = adapted = 0
    for (_, cancel, name, prompt, image, _, max_new), seq in zip(plans, seqs, strict=True):
        assert seq is not None and seq.done
        if seq.state is State.DROPPED:
            assert cancel is not None
            continue
        finished += 1
        assert seq.output_tokens == setup.expected(name, prompt, image, max_new), name
        if name is not None:
            adapted += 1
            changed += seq.output_tokens != setup.expected(None, prompt, image, max_new)
    assert finished >= len(plans) // 2
    # The adapters change what the model says, so the equality above is not the base's equality again.
    assert changed >= adapted - 1 and adapted >= 4
    assert driver.joined_while_running > 0
    assert driver.runner.feature_cache_hits > 0  # images repeated, under the base and the adapters


def test_an_image_gets_its_own_features_under_an_adapter_that_changes_the_vision_tower(setup):
    """The same image, cached under the base, must not be reused for the adapter that changes the
    vision tower (it would give the base's features), and must be reused for those that do not."""
    driver = Driver(setup.served, rows=4, prefill_token_budget=10_000, adapters=setup.bank,
                    feature_cache_size=8)
    item = dataclasses.replace(make_input(setup.served, "caption en", 7), image_key="same")
    first = driver.submit(item, 8)
    driver.loop.run_until_idle()
    hits = driver.runner.feature_cache_hits
    seqs = {name: driver.submit(dataclasses.replace(item, adapter=ref), 8) for name, ref in setup.refs.items()}
    driver.loop.run_until_idle()
    # One lookup found the base's features, for both language-only adapters; the vision one encoded anew.
    assert driver.runner.feature_cache_hits - hits == 1
    assert len(driver.runner.features) == 2
    assert first.output_tokens == setup.expected(None, "caption en", 7, 8)
    for name, seq in seqs.items():
        assert seq.output_tokens == setup.expected(name, "caption en", 7, 8), name


def test_a_rewritten_slot_serves_the_new_adapter_and_a_cleared_one_the_base(setup):
    """Loading writes a slot in place (no new layers, so no re-capture); unloading zeroes it."""
    driver = Driver(setup.served, rows=2, prefill_token_budget=10_000, adapters=setup.bank)
    item = make_input(setup.served, "caption en", 3)
    spare = dataclasses.replace(setup.refs["everything"], slot=4, uid=999)
    try:
        setup.bank.write(spare.slot, setup.bank.stage(read_adapter(setup.folders["everything"],
                                                                    setup.served.model.config)))
        moved = driver.submit(dataclasses.replace(item, adapter=spare), 10)
        driver.loop.run_until_idle()
        assert moved.output_tokens == setup.expected("everything", "caption en", 3, 10)
        setup.bank.clear(spare.slot)
        cleared = driver.submit(dataclasses.replace(item, adapter=spare), 10)
        driver.loop.run_until_idle()
        assert cleared.output_tokens == setup.expected(None, "caption en", 3, 10)
    finally:
        setup.bank.clear(spare.slot)


def test_rows_without_adapters_run_as_before(setup):
    """With the slots in place but every row on the base, outputs equal the base's."""
    driver = Driver(setup.served, rows=3, prefill_token_budget=10_000, adapters=setup.bank)
    items: list[RowInput] = [make_input(setup.served, prompt, seed) for seed, prompt in enumerate(PROMPTS[:3])]
    seqs = [driver.submit(item, 12) for item in items]
    driver.loop.run_until_idle()
    for seed, (prompt, seq) in enumerate(zip(PROMPTS[:3], seqs, strict=True)):
        assert seq.output_tokens == setup.expected(None, prompt, seed, 12)
