"""A tqdm bar over input bytes (compressed, as on disk) showing documents/s and tokens/s.

Bytes are the only quantity known up front for a stream of JSONL files, so they drive the bar
and its ETA; document and token rates are what people compare runs by, so they go in the
postfix (refreshed at most twice a second to keep the parent process cheap).
"""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total_bytes: int, desc: str, enabled: bool = True) -> None:
        self.enabled = enabled
        self.bytes_done = 0
        self._t0 = time.perf_counter()
        self._last = 0.0
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total_bytes,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=str(desc)[-40:],
                file=sys.stderr,
                dynamic_ncols=True,
                mininterval=0.5,
            )

    def set_bytes(self, n: int) -> None:
        if self._bar is not None and n > self.bytes_done:
            self._bar.update(n - self.bytes_done)
        self.bytes_done = max(self.bytes_done, n)

    def update(self, documents: int, tokens: int) -> None:
        now = time.perf_counter()
        if self._bar is None or now - self._last < 0.5:
            return
        self._last = now
        dt = max(now - self._t0, 1e-9)
        self._bar.set_postfix_str(
            f"{documents / dt:,.0f} docs/s, {tokens / dt:,.0f} tok/s", refresh=False
        )

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()
