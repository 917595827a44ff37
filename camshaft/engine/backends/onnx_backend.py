"""ONNX Runtime backend: the forward in ONNX Runtime; tap gradients through the artifact's head.

For gradients, ONNX Runtime computes only the trunk (input -> first tap: the session is asked for
that output alone) and the small head travelling in the artifact runs under torch autograd.
"""

from __future__ import annotations

import importlib.metadata
import os
import warnings

import numpy as np
import torch

from camshaft.engine.backends.base import (
    ABLE,
    FORWARD,
    INPUT_GRADIENTS,
    TAP_GRADIENTS,
    ModelInfo,
    Output,
    Selector,
    batched_tap_grads,
)
from camshaft.errors import CapabilityError, ConfigError

_NP = {torch.float32: np.float32, torch.float16: np.float16}
_TORCH = {np.dtype(v): k for k, v in _NP.items()}


def _onnxruntime():
    installed = {d for d in ("onnxruntime", "onnxruntime-gpu") if _installed(d)}
    if len(installed) > 1:
        warnings.warn(
            "both onnxruntime and onnxruntime-gpu are installed; they overwrite each other's files. "
            "Uninstall both and install exactly one (pip install 'camshaft[cpu]' or 'camshaft[gpu]')",
            stacklevel=3,
        )
    try:
        import onnxruntime
    except ImportError as e:
        raise ConfigError(
            "the onnxruntime backend needs ONNX Runtime: pip install 'camshaft[cpu]' "
            "(or 'camshaft[gpu]' for CUDA, never both)"
        ) from e
    return onnxruntime


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.version(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


TENSORRT = "CAMSHAFT_ORT_TENSORRT"  # set to 1: TensorRT's provider first on a GPU, where onnxruntime-gpu has it


def providers_for(device: torch.device) -> list:
    """The providers to ask for: only those available, CUDA first on a GPU.

    TensorRT's provider only on request (``CAMSHAFT_ORT_TENSORRT=1``): onnxruntime-gpu lists it whether or not
    TensorRT's libraries are installed, and it builds an engine for every input shape it meets (minutes each for
    a resnet50; a run's last, partial batch is another shape), which a batch job must not meet by surprise.
    """
    ort = _onnxruntime()
    available = ort.get_available_providers()
    if device.type == "cuda":
        tensorrt = os.environ.get(TENSORRT, "") not in ("", "0")
        wanted = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider")
                  if p in available and (tensorrt or p != "TensorrtExecutionProvider")]
        if not wanted:
            raise ConfigError(
                f"--device {device} with the onnxruntime backend needs onnxruntime-gpu with CUDA; "
                f"available providers: {', '.join(available)}"
            )
        index = device.index or 0
        return [(p, {"device_id": index}) for p in wanted] + ["CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def open_session(model, device: torch.device, *, threads: int | None = None):
    """An ONNX Runtime session for a path or serialized model bytes."""
    ort = _onnxruntime()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    # ONNX Runtime's threads spin after each run by default, waiting for more work; here the CPU is
    # shared with image decoding, torch (a split model's head) and other workloads, which the
    # spinning slows (a torch forward right after a run: 1.25x its time, resnet18 on 2 cores) while
    # ONNX Runtime itself runs no faster for it
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.log_severity_level = 3
    source = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(source, options, providers=providers_for(device))
    except Exception as e:  # noqa: BLE001 - onnxruntime's errors have no common public type
        if "protobuf" not in f"{type(e).__name__} {e}".lower():
            raise
        what = "the model" if isinstance(model, bytes) else model
        raise ConfigError(f"{what} is not an ONNX model ({type(e).__name__}: {e})") from e


class OnnxBackend:
    name = "onnxruntime"
    memory_format = torch.contiguous_format  # sessions take C-contiguous arrays

    def __init__(
        self, session, info: ModelInfo, *, head: torch.nn.Module | None, device: torch.device,
        tap_outputs: dict[str, str], batch: int | None = None,
    ):
        self.session, self.info, self.device = session, info, device
        self._batch = batch  # the graph's fixed batch size, if it has one: batches run in parts of that size
        self._shapes: dict[tuple, list] = {}  # (outputs, input shape) -> the outputs' (shape, dtype), once seen
        self._tap_outputs = tap_outputs  # tap -> graph output name
        self.dtype = torch.float32
        self._head = None if head is None else head.to(device)
        if self._head is not None:
            for p in self._head.parameters():
                p.requires_grad_(False)
        self._input = session.get_inputs()[0].name
        self._outputs = [o.name for o in session.get_outputs()]
        missing = [t for t in info.taps if tap_outputs[t] not in self._outputs]
        if missing:
            raise ConfigError(f"ONNX model has no outputs for taps {missing}; outputs: {self._outputs}")
        caps = {FORWARD, TAP_GRADIENTS} if self._head is not None else {FORWARD}
        self.capabilities = frozenset(caps)

    def _run(self, x: torch.Tensor, names: list[str]) -> list[torch.Tensor]:
        if self._batch is None:
            key = (tuple(names), tuple(x.shape))
            if key in self._shapes:
                return self._run_bound(x, names, self._shapes[key])
            outs = self._run_arrays(x.detach().to("cpu", torch.float32).numpy(), names)
            if all(o.dtype in _TORCH for o in outs):  # from now on, bound: the outputs' shapes are known
                self._shapes[key] = [(o.shape, _TORCH[o.dtype]) for o in outs]
        else:
            outs = self._run_arrays(x.detach().to("cpu", torch.float32).numpy(), names)
        return [torch.from_numpy(o).to(self.device) for o in outs]

    def _run_arrays(self, data: np.ndarray, names: list[str]) -> list[np.ndarray]:
        if self._batch is None or len(data) == self._batch:
            return self.session.run(names, {self._input: data})
        parts = []  # a fixed-batch graph: parts of its size, the last one filled up with copies of its last image
        for start in range(0, len(data), self._batch):
            part = data[start : start + self._batch]
            n = len(part)
            if n < self._batch:
                part = np.concatenate([part, np.repeat(part[-1:], self._batch - n, axis=0)])
            parts.append([o[:n] for o in self.session.run(names, {self._input: part})])
        return [np.concatenate(o) for o in zip(*parts, strict=True)]

    def _run_bound(self, x: torch.Tensor, names: list[str], shapes: list) -> list[torch.Tensor]:
        """The session reads ``x`` where it lies and writes into tensors allocated here (I/O binding): on a
        GPU, no copy through the host either way; the outputs are new tensors the caller owns."""
        x = x.detach().to(self.device, torch.float32).contiguous()
        outs = [torch.empty(shape, dtype=dtype, device=self.device) for shape, dtype in shapes]
        kind, index = self.device.type, self.device.index or 0
        binding = self.session.io_binding()
        binding.bind_input(self._input, kind, index, np.float32, tuple(x.shape), x.data_ptr())
        for name, out in zip(names, outs, strict=True):
            binding.bind_output(name, kind, index, _NP[out.dtype], tuple(out.shape), out.data_ptr())
        if kind == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # x is written by kernels queued on torch's stream
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()  # written before torch reads them, whatever stream ONNX Runtime ran on
        return outs

    def forward(self, x: torch.Tensor) -> Output:
        names = [self._outputs[0], *(self._tap_outputs[t] for t in self.info.taps)]
        logits, *taps = self._run(x, names)
        return Output(logits.float(), dict(zip(self.info.taps, taps, strict=True)))

    def tap_gradients(self, x: torch.Tensor, select: Selector) -> Output:
        if self._head is None:
            raise RuntimeError("this ONNX artifact carries no head; gradients are unavailable")
        (a,) = self._run(x, [self._tap_outputs[self.info.taps[0]]])
        a = a.requires_grad_(True)
        with torch.enable_grad():
            outs = self._head(a)
            logits = outs[0]
            taps = {self.info.taps[0]: a, **dict(zip(self.info.taps[1:], outs[1:], strict=True))}
            targets = select(logits.detach().float())
            grads = batched_tap_grads(logits.float(), taps, targets)
        return Output(logits.detach().float(), {k: v.detach().float() for k, v in taps.items()}, grads, targets)

    def input_gradients(self, x: torch.Tensor, select: Selector) -> Output:
        """Not served: ONNX Runtime computes no gradients, and the trunk below the tap has no torch twin."""
        raise CapabilityError(
            f"the onnxruntime backend cannot give {INPUT_GRADIENTS} for {self.info.source!r}. "
            f"Backends that can: {ABLE[INPUT_GRADIENTS]}"
        )
