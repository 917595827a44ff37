"""Activation maximization: camshaft's batched ``render`` beside a plain batched Adam loop and lucent.

camshaft runs with its defaults (Fourier parameterization, transforms, leaky dead ReLUs; on the CPU
exact runs, batch-size-invariant, and a second figure with ``exact=False``).
N class logits are optimised at once (images = classes, so images/s is classes/s and its inverse
is seconds per class). *The limit* (``actmax_limit``) is a plain batched Adam ascent on the raw
logits: pixels, no transforms, no regularizers, the same steps and size; the best of contiguous
and (convnets) channels-last images, as ``render`` uses with fast kernels. lucent's ``render_vis``
(torch-lucent, when installed) renders one class at a time, as it works.
"""

from __future__ import annotations

import copy
import importlib.util

import torch
from torch import nn

from camshaft.bench.limits import adam_loop, frozen_copy
from camshaft.bench.peers import quietly
from camshaft.bench.workload import Skipped, Workload
from camshaft.engine.backends.base import resolve_memory_format


def _camshaft(
    model: nn.Module, *, classes: int, size: int, steps: int, device: torch.device, dtype: str, exact: bool | None = None
):
    from camshaft.engine.actmax import RenderConfig, class_logit, render
    from camshaft.preprocess import Preprocess

    objectives = [class_logit(c) for c in range(classes)]
    config = RenderConfig(steps=steps, batch_size=classes, device=str(device), dtype=dtype, exact=exact)
    pre = Preprocess(input_size=(size, size))

    def fn():
        render(model, objectives, preprocess=pre, config=config, progress=False)

    return fn


def logits_layer(model: nn.Module) -> str | None:
    """The last linear layer's name as lucent hooks it (dots become underscores)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return names[-1].replace(".", "_") if names else None


def _lucent(model: nn.Module, *, classes: int, size: int, steps: int):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lucent's import warns about torch.jit.script
        from lucent.optvis import objectives, param, render

    layer = logits_layer(model)
    if layer is None:
        raise LookupError("lucent needs a named linear layer for class objectives")

    def fn():
        for c in range(classes):  # render_vis optimises one objective per call
            render.render_vis(
                model,
                objectives.channel(layer, c),
                param_f=lambda: param.image(size),
                thresholds=(steps,),
                show_image=False,
                progress=False,
                fixed_image_size=size,
            )

    return fn


def actmax_workloads(
    model: nn.Module,
    *,
    classes: int,
    size: int,
    steps: int,
    device: torch.device,
    dtype: str,
    key: str,
    attrs: dict,
    peers: bool,
) -> list[Workload | Skipped]:
    """The limit, camshaft's ``render`` and (when installed) lucent, on ``classes`` class logits."""
    attrs = {**attrs, "method": "actmax", "targets": f"{classes} classes", "k": 1, "steps": steps}
    evals = classes * steps
    formats = {"contiguous": torch.contiguous_format}
    if resolve_memory_format("auto", model) == torch.channels_last:  # as render runs convnets (fast kernels)
        formats["channels_last"] = torch.channels_last
    out: list[Workload | Skipped] = [
        Workload(
            f"{key}/actmax_limit/{variant}",
            "actmax_limit",
            adam_loop(frozen_copy(model).to(device), classes=torch.arange(classes, device=device), size=size,
                      steps=steps, device=device, memory_format=fmt),
            classes,
            classes,
            evals,
            {**attrs, "variant": variant},
        )
        for variant, fmt in formats.items()
    ]
    out += [
        Workload(
            f"{key}/actmax/eager",
            "method",
            _camshaft(copy.deepcopy(model), classes=classes, size=size, steps=steps, device=device, dtype=dtype),
            classes,
            classes,
            evals,
            {**attrs, "backend": "eager"},
        ),
    ]
    if device.type == "cpu":  # the default there is exact (batch-size-invariant) runs; time exact=False too
        fast = _camshaft(copy.deepcopy(model), classes=classes, size=size, steps=steps, device=device, dtype=dtype,
                         exact=False)
        fast_attrs = {**attrs, "backend": "eager", "variant": "no-exact"}
        out.append(Workload(f"{key}/actmax[no-exact]/eager", "method", fast, classes, classes, evals, fast_attrs))
    if not peers:
        return out
    if importlib.util.find_spec("lucent") is None:
        return out + [Skipped(f"{key}/actmax/peer:lucent", "torch-lucent is not installed", role="peer")]
    try:
        fn = _lucent(copy.deepcopy(model).to(device).eval(), classes=classes, size=size, steps=steps)
    except (ImportError, LookupError) as e:
        return out + [Skipped(f"{key}/actmax/peer:lucent", f"lucent cannot run: {e}", role="peer")]
    return out + [
        Workload(f"{key}/actmax/peer:lucent", "peer", quietly(fn), classes, classes, evals, {**attrs, "peer": "lucent"})
    ]
