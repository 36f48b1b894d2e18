"""Masking secret values in streamed text, across chunk boundaries."""

from __future__ import annotations

from typing import Iterable

MASK = "********"


class Redactor:
    """Feed text chunks; get them back with every secret value replaced by MASK.

    A chunk's tail that could be the start of a secret is held back until the next chunk (or
    `flush`) shows whether it is one, so a value split across two writes is still masked.
    """

    def __init__(self, secrets: Iterable[str]):
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)
        self._held = ""

    def _mask(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, MASK)
        return text

    def feed(self, text: str) -> str:
        if not self.secrets:
            return text
        text = self._mask(self._held + text)
        hold = 0
        for secret in self.secrets:
            for n in range(min(len(secret) - 1, len(text)), hold, -1):
                if text.endswith(secret[:n]):
                    hold = n
                    break
        self._held = text[len(text) - hold:] if hold else ""
        return text[: len(text) - hold] if hold else text

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


def mask(text: str, secrets: Iterable[str]) -> str:
    r = Redactor(secrets)
    return r.feed(text) + r.flush()
