"""The one error family. Every expected failure is a MinoError with a one-line hint.

User-facing layers print ``render()`` and never a traceback for these.
"""

from __future__ import annotations


class MinoError(Exception):
    """An expected failure: what is wrong (one line) and what to do about it."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def render(self) -> str:
        text = f"mino: {self.message}"
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text


class PodmanUnavailable(MinoError):
    """Podman is not installed, or its API service cannot be reached."""


class ImageMissing(MinoError):
    """The container image is not present locally."""


class UsageError(MinoError):
    """Bad options or arguments."""


class ConfigError(MinoError):
    """A configuration or preset file is invalid."""


class FirewallError(MinoError):
    """The allowlist firewall could not be installed or verified; nothing ran."""


class ImageBuildError(MinoError):
    """Building an image failed; no image was tagged."""
