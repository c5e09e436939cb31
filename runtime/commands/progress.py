"""Progress bars on stderr for the library pipelines that report by stage (prune_model, pull)."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from tqdm import tqdm


class StageBars:
    """A pipeline's progress callback (slim.runtime.pipeline.Progress): one tqdm bar per stage,
    named after it, closed when the next stage begins. units: each stage's unit, or one for all."""

    def __init__(self, units: Mapping[str, str] | str, *, disable: bool, **bar_options: Any) -> None:
        self._units = units
        self._disable = disable or None  # None: tqdm shows no bar when stderr is not a terminal
        self._options = bar_options
        self._stage: str | None = None
        self._bar: Any = None

    def __call__(self, stage: str, done: int, total: int | None, *, loss: float | None = None) -> None:
        if stage != self._stage:
            self.close()
            unit = self._units if isinstance(self._units, str) else self._units.get(stage, "it")
            self._bar = tqdm(desc=stage, unit=unit, disable=self._disable, file=sys.stderr, **self._options)
            self._stage = stage
        bar = self._bar
        if done < bar.n:  # the stage started over (a download the server would not resume)
            bar.reset()
        bar.total = total
        if loss is not None:
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        bar.update(done - bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._bar, self._stage = None, None

    def __enter__(self) -> StageBars:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
