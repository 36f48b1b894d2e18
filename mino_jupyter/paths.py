"""Where mino keeps its files on the host. Pure functions of the environment."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping


def _home(env: Mapping[str, str]) -> Path:
    return Path(env.get("HOME") or os.path.expanduser("~"))


def state_dir(env: Mapping[str, str] | None = None) -> Path:
    """Session logs, trust records, the service log: ``$XDG_STATE_HOME/mino``."""
    env = os.environ if env is None else env
    base = env.get("XDG_STATE_HOME") or str(_home(env) / ".local" / "state")
    return Path(base) / "mino"


def config_dir(env: Mapping[str, str] | None = None) -> Path:
    """User configuration and presets: ``$XDG_CONFIG_HOME/mino``."""
    env = os.environ if env is None else env
    base = env.get("XDG_CONFIG_HOME") or str(_home(env) / ".config")
    return Path(base) / "mino"


def logs_dir(env: Mapping[str, str] | None = None) -> Path:
    return state_dir(env) / "logs"
