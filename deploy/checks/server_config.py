"""The `PALIGEMMA_*` values a deployment file sets, read by the server's own settings class.

A ConfigMap or a Compose `environment` is checked the way the server would read it at start-up: a
variable the server no longer reads (it would warn) or never read (it would ignore), or a value it
would refuse, is a problem here rather than a surprise on the first rollout. What the checks then need
(the drain timeout, the liveness stall limit) comes from the parsed settings, defaults included.
"""

from __future__ import annotations

from collections.abc import Mapping

from app.settings import ENV_PREFIX, REMOVED_VARIABLES, Settings, SettingsError, load_settings

# Set to paths inside the container or to the secret's values: not checkable from the files.
NOT_CHECKED = {f"{ENV_PREFIX}MASK_DECODER", f"{ENV_PREFIX}API_KEYS"}


def server_settings(where: str, env: Mapping[str, object]) -> tuple[Settings | None, list[str]]:
    """(the settings the server would start with, problems) for the PALIGEMMA_* entries of `env`."""
    problems = []
    fields = {f"{ENV_PREFIX}{name.upper()}": name for name in Settings.model_fields}
    values: dict[str, object] = {}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or name in NOT_CHECKED or value is None:
            continue
        if name in REMOVED_VARIABLES:
            problems.append(f"{where}: {name} is no longer read by the server ({REMOVED_VARIABLES[name]}); "
                            "remove it")
        elif name not in fields:
            problems.append(f"{where}: {name} is not a setting of the server (app/settings.py)")
        else:
            values[fields[name]] = str(value)
    try:
        # Init values only: the checker's own environment must not leak into what the file says.
        settings = load_settings(_env_prefix="PALIGEMMA_IGNORED_BY_DEPLOY_CHECKS_", **values)
    except SettingsError as exc:
        return None, [*problems, f"{where}: the server would refuse to start: {exc}"]
    return settings, problems
