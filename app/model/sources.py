"""Why a checkpoint could not be loaded, in one message an operator can act on.

`from_pretrained` fails with a chain of hub and transformers errors (and transformers prints its own
lines); start-up turns that chain into one message that names PALIGEMMA_MODEL, says what happened as far
as the chain tells, and what each kind of value needs: a preset, a local directory, a hub id (gated
repositories, HF_TOKEN), offline mode.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterator
from pathlib import Path

from app import demo
from app.lifecycle import StartupError


class ModelUnavailable(StartupError):
    """PALIGEMMA_MODEL (or PALIGEMMA_REVISION) names nothing this process can load."""


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _has(exc: BaseException, *names: str) -> bool:
    """Whether the chain holds an exception of one of these class names (the hub library's error classes
    moved between releases; their names did not)."""
    return any(type(e).__name__ in names for e in _causes(exc))


def _says(exc: BaseException, *phrases: str) -> bool:
    return any(phrase in str(e).lower() for e in _causes(exc) for phrase in phrases)


def looks_like_path(source: str) -> bool:
    """A hub id is `name` or `owner/name`; anything else (absolute, relative, `~`, deeper) is a path."""
    return (source.startswith(("/", "./", "../", "~", "\\")) or source.count("/") > 1
            or (os.sep != "/" and os.sep in source))


def offline_mode() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _diagnosis(source: str, revision: str | None, exc: BaseException, offline: bool) -> tuple[str, bool]:
    """What happened, and whether that is certain (else the loader's own words are worth adding)."""
    path = Path(source).expanduser()
    if path.exists():
        return (f"the directory {path} could not be loaded as a PaliGemma checkpoint; it must hold what "
                "save_pretrained writes for the model and its processor (config.json, the weights, "
                "preprocessor_config.json, the tokenizer files)"), False
    if looks_like_path(source) or _has(exc, "HFValidationError"):
        return f"there is no directory at {path}", True
    if _has(exc, "GatedRepoError") or _says(exc, "gated repo"):
        return (f"{source} is a gated repository: accept its licence at https://huggingface.co/{source} "
                "with your Hugging Face account, then set HF_TOKEN to a token of that account"), True
    if _has(exc, "RevisionNotFoundError"):
        return f"{source} has no revision {revision!r}: fix or unset PALIGEMMA_REVISION", True
    if offline:
        return (f"HF_HUB_OFFLINE=1 and {source} is not in the hub cache (HF_HOME): download it once with "
                f"network access (e.g. `hf download {source}`), or set PALIGEMMA_MODEL to a local "
                "directory"), True
    if _has(exc, "RepositoryNotFoundError") or _says(exc, "not a valid model identifier",
                                                     "valid repository name"):
        return (f"there is no model {source} on the Hugging Face hub (or it is private: set HF_TOKEN to a "
                "token that can read it)"), True
    if _has(exc, "LocalEntryNotFoundError", "ConnectError", "ConnectionError", "TimeoutException"):
        return (f"the Hugging Face hub could not be reached to download {source}; check the network (or "
                "HF_ENDPOINT), or use a local directory with HF_HUB_OFFLINE=1"), False
    return f"{source} could not be loaded", False


def explain(source: str, revision: str | None, exc: BaseException, presets: list[str],
            offline: bool | None = None) -> str:
    """The message for a checkpoint `source` that raised `exc` while loading."""
    what, certain = _diagnosis(source, revision, exc, offline_mode() if offline is None else offline)
    close = difflib.get_close_matches(source, [demo.MODEL_NAME, *presets], n=1, cutoff=0.6)
    what_close = "the built-in model" if close and close[0] == demo.MODEL_NAME else "the preset"
    hint = f" Did you mean {what_close} {close[0]!r}?" if close else ""
    lines = [
        f"PALIGEMMA_MODEL={source!r} cannot be loaded: {what}.{hint}",
        "PALIGEMMA_MODEL takes one of:",
        f"  - {demo.MODEL_NAME}: the built-in model trained on generated shapes scenes (the default)",
        f"  - a built-in preset with random weights: {', '.join(presets)}",
        "  - a local directory written by save_pretrained (or a downloaded snapshot): it must exist",
        "  - a Hugging Face hub id, e.g. google/paligemma2-3b-mix-224: it must exist; gated ones need their "
        "licence accepted and HF_TOKEN set; with HF_HUB_OFFLINE=1 it must already be in the hub cache",
    ]
    if not certain:
        cause = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        lines.append(f"(the loader said: {cause[:300]})")
    return "\n".join(lines)
