"""The denoising progress bar, ticked from inside the compiled loop."""

from __future__ import annotations

import contextlib

import jax


class StepProgress:
    """A denoising progress bar ticked from inside the compiled loop. `_tick` is a bound method, stable
    across calls, so passing it as a static argument keeps jit's cache."""

    def _tick(self, step) -> None:
        if getattr(self, "_bar", None) is not None:
            self._bar.update(1)

    @contextlib.contextmanager
    def _progress(self, total: int, enabled: bool):
        """Yields the `on_step` callback (None when disabled); waits for the last tick before closing."""
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc="denoising", unit="step", leave=False)
        try:
            yield self._tick if enabled else None
            jax.effects_barrier()
        finally:
            if self._bar is not None:
                self._bar.close()
            self._bar = None
