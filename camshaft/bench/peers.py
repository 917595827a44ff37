"""The same work in peer libraries — pytorch-grad-cam, captum, torchcam — when they are installed.

Peers are never camshaft dependencies: each is imported only here, and only when asked for. Each
peer is timed as its documentation uses it, doing all the work camshaft does for the same call:

- the classes are found by a forward inside the timed call (pytorch-grad-cam finds the top-1 itself;
  captum and torchcam are given the classes of a forward they do not do themselves);
- K classes per image cost what the library makes them cost: pytorch-grad-cam and captum run once
  per class (each a forward and a backward); torchcam backpropagates K times from one forward;
- each peer works on its own copy of the model (its hooks touch nothing else), with parameters
  requiring gradients as a model normally has them, on the same device, in the same process (so
  under the same allocator and thread settings);
- captum Occlusion is timed at several ``perturbations_per_eval`` and its best counts.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


class PeerUnavailable(Exception):
    """A peer cannot do this work (not installed, or the tap is not a module it can hook)."""


PEER_PACKAGES = {"pytorch-grad-cam": "pytorch_grad_cam", "captum": "captum", "torchcam": "torchcam"}
Build = Callable[["PeerTask"], Callable[[int], object]]  # task -> run(k): the work for k classes


@dataclass(frozen=True)
class PeerTask:
    """What a peer is asked to do: the method's work on ``x`` (for the top k classes per image)."""

    model: nn.Module  # the peer's own copy
    layer: str  # module path of the tap
    x: torch.Tensor
    options: dict  # the camshaft method's resolved options (window, steps, ...)

    @property
    def module(self) -> nn.Module:
        modules = dict(self.model.named_modules())
        if self.layer not in modules:
            raise PeerUnavailable(f"tap {self.layer!r} is an FX node, not a module a peer can hook")
        return modules[self.layer]

    def classes(self, k: int) -> torch.Tensor:
        """(B, k) top classes from a forward (part of the peer's timed work)."""
        with torch.no_grad():
            return self.model(self.x).topk(k, dim=-1).indices


def installed(peer: str) -> bool:
    return importlib.util.find_spec(PEER_PACKAGES[peer]) is not None


def peer_model(model: nn.Module) -> nn.Module:
    """A fresh eval-mode copy with trainable parameters (what a user hands a peer library)."""
    return copy.deepcopy(model).eval().requires_grad_(True)


# --- pytorch-grad-cam -------------------------------------------------------------------------------


def _pgc(class_name: str) -> Build:
    def build(task: PeerTask):
        lib = importlib.import_module("pytorch_grad_cam")
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        cam = getattr(lib, class_name)(model=task.model, target_layers=[task.module])

        def fn(k: int):
            if k == 1:
                cam(input_tensor=task.x, targets=None)  # finds the top-1 itself
                return
            classes = task.classes(k)
            for j in range(k):
                cam(input_tensor=task.x, targets=[ClassifierOutputTarget(int(c)) for c in classes[:, j]])

        return fn

    return build


# --- captum -----------------------------------------------------------------------------------------


def _per_class(task: PeerTask, attribute: Callable[[torch.Tensor], object]) -> Callable[[int], object]:
    """A forward for the classes, then one captum ``attribute`` call per class rank."""

    def fn(k: int):
        classes = task.classes(k)
        for j in range(k):
            attribute(classes[:, j])

    return fn


def _captum_gradcam(task: PeerTask):
    from captum.attr import LayerGradCam

    explainer = LayerGradCam(task.model, task.module)
    return _per_class(task, lambda t: explainer.attribute(task.x, target=t, relu_attributions=True))


def _captum_saliency(task: PeerTask):
    from captum.attr import Saliency

    explainer = Saliency(task.model)
    return _per_class(task, lambda t: explainer.attribute(task.x, target=t, abs=True))


def _captum_guided(task: PeerTask):
    from captum.attr import GuidedBackprop

    explainer = GuidedBackprop(task.model)
    return _per_class(task, lambda t: explainer.attribute(task.x, target=t))


def _captum_smoothgrad(task: PeerTask):
    from captum.attr import NoiseTunnel, Saliency

    explainer, o = NoiseTunnel(Saliency(task.model)), task.options
    per = max(1, o.get("samples_per_forward", 32) // task.x.shape[0])
    return _per_class(
        task,
        lambda t: explainer.attribute(
            task.x,
            nt_type="smoothgrad",
            nt_samples=o.get("samples", 16),
            nt_samples_batch_size=per,
            stdevs=float(o.get("noise", 0.15)),
            target=t,
            abs=True,
        ),
    )


def _captum_integrated(task: PeerTask):
    from captum.attr import IntegratedGradients

    explainer, o = IntegratedGradients(task.model), task.options
    return _per_class(
        task,
        lambda t: explainer.attribute(
            task.x,
            target=t,
            n_steps=o.get("steps", 32),
            method="riemann_middle",
            internal_batch_size=o.get("samples_per_forward", 32),
        ),
    )


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int | float) else (int(v[0]), int(v[-1]))


def captum_occlusion(task: PeerTask, *, per_eval: int) -> Callable[[], object]:
    from captum.attr import Occlusion

    explainer = Occlusion(task.model)
    window, stride = _pair(task.options.get("window", 32)), _pair(task.options.get("stride", 16))
    return _per_class(
        task,
        lambda t: explainer.attribute(
            task.x,
            sliding_window_shapes=(3, *window),
            strides=(3, *stride),
            baselines=0.0,
            target=t,
            perturbations_per_eval=per_eval,
        ),
    )


def occlusion_per_eval(batch: int, *, quick: bool) -> tuple[int, ...]:
    """The perturbations_per_eval tried for captum Occlusion (forward batches of at most 256 images)."""
    tried = (1, 4) if quick else (1, 4, 16, 64)
    return tuple(p for p in tried if p == 1 or batch * p <= 256)


# --- torchcam ---------------------------------------------------------------------------------------


def _torchcam(class_name: str, *, gradients: bool) -> Build:
    def build(task: PeerTask):
        methods = importlib.import_module("torchcam.methods")
        h, w = task.x.shape[-2:]
        extractor = getattr(methods, class_name)(task.model, target_layer=task.layer, input_shape=(3, h, w))

        def fn(k: int):
            grad = torch.enable_grad() if gradients else torch.inference_mode()
            with grad:
                scores = task.model(task.x)
                classes = scores.detach().topk(k, dim=-1).indices
                for j in range(k):
                    kwargs = {"retain_graph": j < k - 1} if gradients else {}
                    extractor(class_idx=classes[:, j].tolist(), scores=scores, **kwargs)

        return fn

    return build


# --- the table: camshaft method -> [(peer, variant, build)] ----------------------------------------

PEERS: dict[str, list[tuple[str, Build]]] = {
    "cam": [("torchcam", _torchcam("CAM", gradients=False))],
    "gradcam": [
        ("pytorch-grad-cam", _pgc("GradCAM")),
        ("captum", _captum_gradcam),
        ("torchcam", _torchcam("GradCAM", gradients=True)),
    ],
    "gradcampp": [("pytorch-grad-cam", _pgc("GradCAMPlusPlus")), ("torchcam", _torchcam("GradCAMpp", gradients=True))],
    "xgradcam": [("pytorch-grad-cam", _pgc("XGradCAM")), ("torchcam", _torchcam("XGradCAM", gradients=True))],
    "layercam": [("pytorch-grad-cam", _pgc("LayerCAM")), ("torchcam", _torchcam("LayerCAM", gradients=True))],
    "scorecam": [("pytorch-grad-cam", _pgc("ScoreCAM"))],
    "saliency": [("captum", _captum_saliency)],
    "guided_backprop": [("captum", _captum_guided)],
    "smoothgrad": [("captum", _captum_smoothgrad)],
    "integrated_gradients": [("captum", _captum_integrated)],
}
PEERS["gradcam++"] = PEERS["gradcam_plus_plus"] = PEERS["gradcampp"]


def peers_for(method: str, *, batch: int, quick: bool) -> list[tuple[str, str, Build]]:
    """``(peer, variant, build)`` for ``method`` (occlusion: one per perturbations_per_eval)."""
    if method == "occlusion":
        return [
            ("captum", f"ppe{p}", lambda task, p=p: captum_occlusion(task, per_eval=p))
            for p in occlusion_per_eval(batch, quick=quick)
        ]
    return [(peer, "", build) for peer, build in PEERS.get(method, [])]


def versions() -> dict[str, str | None]:
    """Installed peer versions (None: not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("grad-cam", "captum", "torchcam", "torch-lucent"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def peer_workloads(
    method: str,
    *,
    model: nn.Module,
    tap: str | None,
    x: torch.Tensor,
    targets: dict[str, int],
    options: dict,
    evaluations: int,
    key: str,
    attrs: dict,
    quick: bool,
) -> list:
    """One ``peer`` workload per installed peer of ``method`` and targets (``Skipped`` for the rest).

    ``targets`` maps each targets text to its K; one peer instance (one model copy, one set of
    hooks) serves them all. ``key`` is formatted with ``peer`` (e.g. "captum:ppe4") and ``targets``.
    """
    from camshaft.bench.workload import Skipped, Workload

    b = x.shape[0]
    out = []
    for peer, variant, build in peers_for(method, batch=b, quick=quick):
        label = f"{peer}:{variant}" if variant else peer
        keys = {t: key.format(peer=label, targets=t) for t in targets}
        if not installed(peer):
            out += [
                Skipped(k_, f"{peer} is not installed (pip install 'camshaft[bench]')", role="peer")
                for k_ in keys.values()
            ]
            continue
        try:
            with quiet():
                run = build(PeerTask(peer_model(model).to(x.device), tap or "", x, options))
        except PeerUnavailable as e:
            out += [Skipped(k_, str(e), role="peer") for k_ in keys.values()]
            continue
        except Exception as e:  # noqa: BLE001 - a peer refusing a model is the peer's limit, not a failure
            why = f"{peer} cannot run this model: {type(e).__name__}: {e}"
            out += [Skipped(k_, why, role="peer") for k_ in keys.values()]
            continue
        for t, k in targets.items():
            a = {**attrs, "targets": t, "k": k, "peer": peer, "variant": variant}
            out.append(Workload(keys[t], "peer", quietly(lambda run=run, k=k: run(k)), b, b * k, evaluations, a))
    return out


@contextlib.contextmanager
def quiet():
    """Peers' warnings, log lines and progress bars (pytorch-grad-cam's ScoreCAM) kept off the report."""
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def quietly(fn: Callable[[], object]) -> Callable[[], object]:
    def run():
        with quiet():
            return fn()

    return run
