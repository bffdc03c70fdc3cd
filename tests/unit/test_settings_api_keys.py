"""PALIGEMMA_API_KEYS as read from the environment: comma-separated keys; empty is no authentication; a
value that holds separators only would read as no keys and turn authentication off, so it stops
start-up naming the variable. (The served process exiting on it: tests/e2e/test_process.py.)"""

from __future__ import annotations

import pytest

from app.settings import SettingsError, load_settings


@pytest.mark.parametrize(("value", "keys"), [
    ("key-one,key-two", ("key-one", "key-two")),
    (" key-one , ,key-two, ", ("key-one", "key-two")),
    ("", ()),
    ("   ", ()),
])
def test_keys_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch, value: str,
                                            keys: tuple[str, ...]) -> None:
    monkeypatch.setenv("PALIGEMMA_API_KEYS", value)
    assert load_settings().api_keys == keys


@pytest.mark.parametrize("value", [",", " , ", ",,,", "\t,\n"])
def test_separators_without_a_key_stop_start_up(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("PALIGEMMA_API_KEYS", value)
    with pytest.raises(SettingsError) as raised:
        load_settings()
    assert "PALIGEMMA_API_KEYS" in str(raised.value) and "holds no key" in str(raised.value)
