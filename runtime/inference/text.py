"""Text assembly: token bytes into text that is safe to show, UTF-8 joined across tokens, with
stop strings that never leak (not even their first characters)."""

from __future__ import annotations

import codecs
from collections.abc import Sequence

__all__ = ["TextAssembler"]


class TextAssembler:
    """Turns token bytes into text that is safe to show: multi-byte characters split across
    tokens are joined (incremental UTF-8 decoding), and text that could be the start of a stop
    string is held back until it is known not to be one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False

    def push(self, data: bytes) -> str:
        """The text that can be shown now; sets `stopped` when a stop string appeared."""
        return self._accept(self._decoder.decode(data))

    def finish(self) -> str:
        """The text still held back, once generation has ended without a stop string."""
        text = self._accept(self._decoder.decode(b"", final=True))
        if self.stopped:
            return text
        text, self._held = text + self._held, ""
        return text

    def _accept(self, text: str) -> str:
        if self.stopped:
            return ""
        buffer = self._held + text
        if not self._stops:
            self._held = ""
            return buffer
        cut = min((i for i in (buffer.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, self._held = True, ""
            return buffer[:cut]
        hold = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(buffer)), hold, -1):
                if buffer.endswith(stop[:k]):
                    hold = k
                    break
        self._held = buffer[len(buffer) - hold :] if hold else ""
        return buffer[: len(buffer) - hold]
