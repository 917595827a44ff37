"""Activation maximization: many objectives optimised at once as one batch.

The pieces compose: objectives (read activations by tap name, add and scale), regularizers (are
objectives), parameterizations (``(params, image_fn)``), transforms (``(x, generators) -> x``), and
``render`` the loop that runs them; ``actmax`` adds model resolution and the output folder.
"""

from camshaft.engine.actmax.job import (
    ActmaxJob,
    ActmaxSummary,
    actmax,
    load_init,
    run_actmax,
)
from camshaft.engine.actmax.objectives import (
    Activations,
    Family,
    LossPlan,
    Objective,
    Term,
    channel,
    class_logit,
    class_prob,
    direction,
    layer_norm,
    neuron,
)
from camshaft.engine.actmax.outputs import write_outputs
from camshaft.engine.actmax.param import (
    ImageParam,
    fourier_image,
    get_param,
    param_names,
    pixel_image,
    register_param,
)
from camshaft.engine.actmax.regularizers import (
    diversity,
    frequency_penalty,
    l2,
    total_variation,
)
from camshaft.engine.actmax.render import RenderConfig, Rendering, render
from camshaft.engine.actmax.spec import (
    ObjectiveKind,
    objective_kinds,
    parse_objective,
    parse_objectives,
    register_objective_kind,
    syntax_help,
)
from camshaft.engine.actmax.transforms import (
    Compose,
    Jitter,
    Pad,
    Rotate,
    Scale,
    Transform,
    gaussian_blur,
)

__all__ = [
    "Activations",
    "ActmaxJob",
    "ActmaxSummary",
    "Compose",
    "Family",
    "ImageParam",
    "Jitter",
    "LossPlan",
    "Objective",
    "ObjectiveKind",
    "Pad",
    "RenderConfig",
    "Rendering",
    "Rotate",
    "Scale",
    "Term",
    "Transform",
    "actmax",
    "channel",
    "class_logit",
    "class_prob",
    "direction",
    "diversity",
    "fourier_image",
    "frequency_penalty",
    "gaussian_blur",
    "get_param",
    "l2",
    "layer_norm",
    "load_init",
    "neuron",
    "objective_kinds",
    "param_names",
    "parse_objective",
    "parse_objectives",
    "pixel_image",
    "register_objective_kind",
    "register_param",
    "render",
    "run_actmax",
    "syntax_help",
    "total_variation",
    "write_outputs",
]
