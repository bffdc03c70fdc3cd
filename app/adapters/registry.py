"""Which adapters are loaded, under which names and slots, and which requests hold them.

Lives on the event loop. A request takes a lease on its adapter (`acquire`) before it is queued and
gives it back once answered; unloading an adapter stops new leases at once (those requests get the 404
that lists the loaded names) and waits for the leases out before its slot is cleared, so a running
request never sees its adapter change under it.

Loading at run time never blocks the engine: PEFT reads and checks the folder on another thread, its
weights go onto the device there too, and only the copy into the slot runs on the model's thread,
between two steps (`write`: the engine's `call_between_steps`). Start-up loads run before the engine
starts, on the model's thread (`load_now`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.adapters.bank import AdapterBank, AdapterRef, StagedAdapter
from app.adapters.folder import AdapterFolder, AdapterInvalid, read_adapter
from app.adapters.names import name_problem
from app.errors import Conflict, Forbidden, InvalidRequest, NotFound

logger = logging.getLogger(__name__)

RUNTIME_LOADING_OFF = ("loading adapters at run time is off; set PALIGEMMA_ADAPTER_ROOT to the directory "
                       "that holds them to turn it on")
# Runs a function on the model's thread between two steps, awaited from the event loop.
BetweenSteps = Callable[[Callable[[], None]], Awaitable[None]]


@dataclass
class LoadedAdapter:
    ref: AdapterRef
    path: Path
    rank: int
    layers: int  # how many linear layers it adapts
    base_model: str | None
    created: int  # unix time it was loaded
    leases: int = 0
    unloading: bool = False
    released: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def name(self) -> str:
        return self.ref.name


class AdapterLease:
    """A request's hold on its adapter: the adapter stays loaded until every lease is released."""

    def __init__(self, registry: AdapterRegistry, adapter: LoadedAdapter):
        self._registry = registry
        self.adapter = adapter
        self.ref = adapter.ref
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._registry._release(self.adapter)


class AdapterRegistry:
    def __init__(self, bank: AdapterBank, base_name: str, base_config: Any, root: Path | None):
        self.bank = bank
        self.base_name = base_name
        self.base_config = base_config
        self.root = root.resolve() if root is not None else None
        self._adapters: dict[str, LoadedAdapter] = {}
        self._pending: set[str] = set()  # names being loaded
        self._free_slots = list(range(1, bank.max_adapters + 1))
        self._uids = itertools.count(1)
        self._unloads: dict[str, asyncio.Task[None]] = {}
        # Called with the name of each adapter unloaded (metrics forget its series).
        self.on_unloaded: Callable[[str], None] = lambda name: None

    # What is loaded --------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return sorted(name for name, adapter in self._adapters.items() if not adapter.unloading)

    def adapters(self) -> list[LoadedAdapter]:
        return [self._adapters[name] for name in self.names]

    def is_loaded(self, name: str) -> bool:
        adapter = self._adapters.get(name)
        return adapter is not None and not adapter.unloading

    def _not_found(self, name: str, param: str) -> NotFound:
        adapter = self._adapters.get(name)
        state = "is being unloaded" if adapter is not None else "is not loaded"
        loaded = ", ".join(self.names) or "none"
        return NotFound(f"adapter {name!r} {state}; loaded adapters: {loaded} (GET /v1/models lists them)",
                        param=param)

    def acquire(self, name: str, param: str = "adapter") -> AdapterLease:
        adapter = self._adapters.get(name)
        if adapter is None or adapter.unloading:
            raise self._not_found(name, param)
        adapter.leases += 1
        adapter.released.clear()
        return AdapterLease(self, adapter)

    def _release(self, adapter: LoadedAdapter) -> None:
        adapter.leases -= 1
        if adapter.leases == 0:
            adapter.released.set()

    # Loading ---------------------------------------------------------------------------------------
    def _check_name(self, name: str) -> None:
        problem = name_problem(name)
        if problem:
            raise InvalidRequest(problem, param="name")
        if name == self.base_name:
            raise InvalidRequest(f"{name!r} is the base model's id; give the adapter another name",
                                 param="name")
        if name in self._adapters or name in self._pending:
            raise Conflict(f"an adapter named {name!r} is loaded already; DELETE /v1/adapters/{name} first "
                           "or choose another name", param="name")

    def _take_slot(self) -> int:
        if not self._free_slots:
            raise Conflict(f"all {self.bank.max_adapters} adapter slots are taken (PALIGEMMA_MAX_ADAPTERS); "
                           f"unload one first (loaded: {', '.join(self.names)})")
        return self._free_slots.pop(0)

    def _read(self, path: Path) -> tuple[AdapterFolder, StagedAdapter]:
        folder = read_adapter(path, self.base_config)
        return folder, self.bank.stage(folder)

    def _register(self, name: str, slot: int, folder: AdapterFolder, staged: StagedAdapter) -> LoadedAdapter:
        ref = AdapterRef(name, slot, next(self._uids), staged.vision)
        adapter = LoadedAdapter(ref, folder.path, folder.rank, len(folder.modules), folder.base_model,
                                int(time.time()))
        adapter.released.set()
        self._adapters[name] = adapter
        if folder.base_model and folder.base_model != self.base_name:
            logger.warning("adapter %r was trained on %r, not on the served model %r: its outputs may be "
                           "meaningless if the weights differ", name, folder.base_model, self.base_name)
        for note in folder.notes:
            logger.warning("adapter %r: %s", name, note)
        logger.info("adapter %r loaded from %s into slot %d: rank %d, %d layers%s", name, folder.path, slot,
                    folder.rank, len(folder.modules), ", vision tower included" if staged.vision else "")
        return adapter

    def load_now(self, name: str, path: Path) -> LoadedAdapter:
        """Load at start-up, on the model's thread, before the engine runs: AdapterInvalid stops start-up."""
        problem = name_problem(name)
        if problem:
            raise AdapterInvalid(path, problem)
        slot = self._take_slot()
        folder, staged = self._read(path)
        self.bank.write(slot, staged)
        return self._register(name, slot, folder, staged)

    def resolve_under_root(self, given: str) -> Path:
        """`given` (absolute, or relative to the root) as a real path inside PALIGEMMA_ADAPTER_ROOT."""
        if self.root is None:
            raise Forbidden(RUNTIME_LOADING_OFF)
        candidate = Path(given)
        if not candidate.is_absolute():
            candidate = self.root / candidate
        # realpath follows every symlink, so a link inside the root cannot lead out of it.
        resolved = Path(os.path.realpath(candidate))
        if not resolved.is_relative_to(self.root):
            raise InvalidRequest(f"{given!r} is outside PALIGEMMA_ADAPTER_ROOT ({self.root}); only folders "
                                 "under it can be loaded", param="path")
        return resolved

    async def load(self, name: str, given_path: str, between_steps: BetweenSteps) -> LoadedAdapter:
        """Load the folder `given_path` (under the root) as `name` while the engine keeps stepping."""
        path = self.resolve_under_root(given_path)
        self._check_name(name)
        slot = self._take_slot()
        self._pending.add(name)
        try:
            try:
                folder, staged = await asyncio.to_thread(self._read, path)
            except AdapterInvalid as exc:
                raise InvalidRequest(f"{exc}", param="path") from None
            await between_steps(lambda: self.bank.write(slot, staged))
        except BaseException:
            self._free_slots.insert(0, slot)
            raise
        finally:
            self._pending.discard(name)
        return self._register(name, slot, folder, staged)

    # Unloading -------------------------------------------------------------------------------------
    async def unload(self, name: str, between_steps: BetweenSteps) -> None:
        """Stop new requests for `name`, wait for its running ones to finish, clear its slot. Carries on
        if the caller goes away (shielded), so an adapter is never left half unloaded."""
        adapter = self._adapters.get(name)
        if adapter is None:
            raise self._not_found(name, "name")
        task = self._unloads.get(name)
        if task is None:
            adapter.unloading = True
            task = self._unloads[name] = asyncio.ensure_future(self._unload(adapter, between_steps))
        await asyncio.shield(task)

    async def _unload(self, adapter: LoadedAdapter, between_steps: BetweenSteps) -> None:
        try:
            await self._unload_when_released(adapter, between_steps)
        except BaseException:
            if adapter.name in self._adapters:
                adapter.unloading = False  # still loaded and usable; the caller sees why it failed
            raise
        finally:
            self._unloads.pop(adapter.name, None)

    async def _unload_when_released(self, adapter: LoadedAdapter, between_steps: BetweenSteps) -> None:
        if adapter.leases:
            logger.info("unloading adapter %r: waiting for its %d requests", adapter.name, adapter.leases)
        await adapter.released.wait()
        slot = adapter.ref.slot
        await between_steps(lambda: self.bank.clear(slot))
        del self._adapters[adapter.name]
        self._free_slots.append(slot)
        self.on_unloaded(adapter.name)
        logger.info("adapter %r unloaded from slot %d", adapter.name, slot)
