"""One sequence's KV cache and its bookkeeping: position, tokens, and which keys may be seen.

The storage (k, v [L, G, S, d] float32) belongs to the backend (host arrays on the CPU, device
arrays under offload); everything else lives here, in one place:

* `key_ok[p]`: whether the token at position p is not padding (spec §2.3: pad keys are masked);
* the reference's decode quirk: a decode step's query sees every cached key when the new
  token is not padding, and none when it is (cached pads are not re-checked);
* `pos` and `tokens`: what the cache holds.
"""

from __future__ import annotations

import numpy as np

from .errors import ContextFullError, GrokError


class KVCache:
    def __init__(self, backend, config, context: int):
        self.backend = backend
        self.context = context
        self.pad = config.pad_token
        self.storage = backend.new_kv(context)      # opaque to everyone but the backend
        self.key_ok = np.zeros(context, np.uint8)
        self._all = np.ones(context, np.uint8)
        self._none = np.zeros(context, np.uint8)
        self.pos = 0
        self.tokens: list[int] = []

    def check_room(self, n: int) -> None:
        if self.pos + n > self.context:
            raise ContextFullError(f"{self.pos + n} tokens do not fit the context of {self.context}",
                                   hint="shorten the prompt or start a new session")

    def key_mask(self, toks: np.ndarray, decode: bool) -> np.ndarray:
        """Mark the new tokens' keys and return the mask their queries attend with."""
        p0 = self.pos
        self.key_ok[p0:p0 + toks.size] = toks > self.pad
        if decode:
            return self._all if toks[0] > self.pad else self._none
        return self.key_ok

    def advance(self, toks: np.ndarray) -> None:
        """The tokens' keys and values are in the cache: move past them."""
        self.pos += toks.size
        self.tokens.extend(toks.tolist())

    def discard(self, n: int) -> None:
        """Forget what a failed step wrote past the fill (n rows from pos on)."""
        self.backend.clear_kv(self.storage, self.pos, self.pos + n)
        self.key_ok[self.pos:self.pos + n] = 0

    def truncate(self, n: int) -> None:
        """Keep the first n positions and forget the rest."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 <= n <= self.pos:
            raise GrokError(f"cannot truncate a session of {self.pos} tokens to {n!r}",
                            hint=f"give a whole number from 0 to {self.pos}")
        n = int(n)
        self.backend.clear_kv(self.storage, n, self.pos)
        self.key_ok[n:self.pos] = 0
        self.pos = n
        del self.tokens[n:]

    def reset(self) -> None:
        self.truncate(0)
