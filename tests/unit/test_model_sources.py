"""A checkpoint that cannot be loaded: one message naming PALIGEMMA_MODEL, the cause, and what to do."""

from __future__ import annotations

import importlib

import pytest

from app.model.sources import explain, looks_like_path

# `explain` lists the names it is given (the loader gives the built-in presets: tests/model/test_checkpoint.py).
PRESET_NAMES = ["tiny", "tiny-448", "tiny-gemma2", "bench"]


def _hub_error(name: str, status: int, message: str) -> Exception:
    """The hub library's own exception, as the hub would raise it for an HTTP `status`."""
    errors = importlib.import_module("huggingface_hub.errors")
    # The hub library takes the Response class of the HTTP client it is built on.
    http = importlib.import_module(errors.Response.__module__.split(".")[0])
    request = http.Request("GET", "https://huggingface.co/api/models/x")
    return getattr(errors, name)(message, response=http.Response(status, request=request))


def _as_transformers_raises(cause: Exception, message: str) -> OSError:
    try:
        raise OSError(message) from cause
    except OSError as exc:
        return exc


def _check_the_common_part(message: str, source: str) -> None:
    first = message.splitlines()[0]
    assert first.startswith(f"PALIGEMMA_MODEL={source!r} cannot be loaded: ")
    assert ", ".join(PRESET_NAMES) in message
    for words in ("save_pretrained", "HF_TOKEN", "HF_HUB_OFFLINE=1", "licence"):
        assert words in message


def test_a_gated_repository():
    exc = _as_transformers_raises(_hub_error("GatedRepoError", 403, "Access to model google/x is restricted."),
                                  "You are trying to access a gated repo.")
    message = explain("google/paligemma2-3b-mix-224", None, exc, PRESET_NAMES, offline=False)
    _check_the_common_part(message, "google/paligemma2-3b-mix-224")
    assert ("google/paligemma2-3b-mix-224 is a gated repository: accept its licence at "
            "https://huggingface.co/google/paligemma2-3b-mix-224") in message
    assert "then set HF_TOKEN" in message.splitlines()[0]
    assert "the loader said" not in message


def test_a_hub_id_that_does_not_exist():
    exc = _as_transformers_raises(_hub_error("RepositoryNotFoundError", 404, "404 Client Error."),
                                  "nobody/nothing is not a local folder and is not a valid model identifier")
    message = explain("nobody/nothing", None, exc, PRESET_NAMES, offline=False)
    _check_the_common_part(message, "nobody/nothing")
    assert "there is no model nobody/nothing on the Hugging Face hub" in message.splitlines()[0]


def test_a_revision_that_does_not_exist():
    exc = _as_transformers_raises(_hub_error("RevisionNotFoundError", 404, "Invalid rev id: v9"),
                                  "v9 is not a valid git identifier")
    message = explain("google/paligemma2-3b-mix-224", "v9", exc, PRESET_NAMES, offline=False)
    assert "has no revision 'v9': fix or unset PALIGEMMA_REVISION" in message.splitlines()[0]


def test_offline_mode_without_the_model_in_the_cache():
    message = explain("nobody/nothing", None, OSError("Can't load image processor"), PRESET_NAMES, offline=True)
    assert message.splitlines()[0] == (
        "PALIGEMMA_MODEL='nobody/nothing' cannot be loaded: HF_HUB_OFFLINE=1 and nobody/nothing is not in the "
        "hub cache (HF_HOME): download it once with network access (e.g. `hf download nobody/nothing`), or "
        "set PALIGEMMA_MODEL to a local directory.")


def test_no_network():
    cause = importlib.import_module("huggingface_hub.errors").LocalEntryNotFoundError("cannot reach the hub")
    message = explain("nobody/nothing", None, _as_transformers_raises(cause, "We couldn't connect"),
                      PRESET_NAMES, offline=False)
    assert "the Hugging Face hub could not be reached" in message
    assert message.splitlines()[-1] == "(the loader said: We couldn't connect)"


@pytest.mark.parametrize("source", ["/models/nothing", "./nothing", "../nothing", "~/nothing", "a/b/c"])
def test_a_local_directory_that_does_not_exist(source):
    message = explain(source, None, ValueError("Repo id must be in the form"), PRESET_NAMES, offline=False)
    _check_the_common_part(message, source)
    assert "there is no directory at" in message.splitlines()[0]
    assert looks_like_path(source)


def test_a_misspelt_preset_is_named():
    message = explain("tinyy", None, OSError("nope"), PRESET_NAMES, offline=True)
    assert "Did you mean the preset 'tiny'?" in message.splitlines()[0]
    assert not looks_like_path("tinyy") and not looks_like_path("google/paligemma2-3b-mix-224")

