"""Several methods on one batch share its forward: a backend view that computes it once.

Every method of a job sees this view instead of the backend. The batch's own forward (with the
tap gradients, when any method of the job needs them) runs on first request and is served to the
others; anything else (masked or noisy inputs, input gradients) goes to the backend.
"""

from __future__ import annotations

import torch

from camshaft.engine.backends.base import Backend, Output, Selector


class SharedBatch:
    def __init__(self, backend: Backend, x: torch.Tensor, select: Selector, *, gradients: bool):
        self._backend, self._x, self._select, self._gradients = backend, x, select, gradients
        self._out: Output | None = None
        self.calls = 0  # how many shared passes actually ran (at most one)

    def __getattr__(self, name):  # info, device, capabilities, module, name, dtype
        return getattr(self._backend, name)

    def _shared(self) -> Output:
        if self._out is None:
            self.calls += 1
            if self._gradients:
                self._out = self._backend.tap_gradients(self._x, self._select)
            else:
                self._out = self._backend.forward(self._x)
                self._out.targets = self._select(self._out.logits)
        return self._out

    def forward(self, x: torch.Tensor) -> Output:
        return self._shared() if x is self._x else self._backend.forward(x)

    def tap_gradients(self, x: torch.Tensor, select: Selector) -> Output:
        if x is self._x and select is self._select and self._gradients:
            return self._shared()
        return self._backend.tap_gradients(x, select)

    def input_gradients(self, x: torch.Tensor, select: Selector) -> Output:
        return self._backend.input_gradients(x, select)
