"""Channels-last taps are read as (C, h, w), and a transformer's default tap is the last map its patches reach.

Swin keeps its stages (N, h, w, C). Read as (N, C, h, w), a tap there took the height for the channels and
explained a meaningless map without a word. The same activations are reachable channels first one node
later (Swin's ``permute`` after its final ``norm`` is a pure relayout), so the maps at the two taps must be
the same maps: for every method, backend and consumer (feature maps, exemplars, actmax).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torchvision
from conftest import fixed, open_backend, source_of
from PIL import Image
from torch import nn

import camshaft
from camshaft.engine.actmax import RenderConfig, render
from camshaft.engine.actmax.objectives import channel
from camshaft.engine.methods import check_backend, get_method
from camshaft.errors import CapabilityError, ConfigError, UnknownNameError
from camshaft.models.inspect import describe
from camshaft.models.layout import as_maps, channels_last, map_shape
from camshaft.models.sources import resolve_model
from camshaft.preprocess import Preprocess
from camshaft.report.exemplars import ExemplarCollector, ExemplarSpec

SIZE = (32, 48)  # not square: rows and columns cannot be swapped unnoticed


def tiny_swin() -> nn.Module:
    """Two Swin stages at 32x48: ``norm`` is (N, 4, 6, 32), ``permute`` the same as (N, 32, 4, 6)."""
    torch.manual_seed(0)
    return torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[1, 2],
                                              window_size=[4, 4], num_classes=5).eval()


class PointwiseNHWC(nn.Module):
    """A stem, then pointwise layers on (N, h, w, C) maps, pooled over (h, w) into a linear classifier:
    its CAM is known in closed form, W @ A[y, x, :]."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 4, stride=4)
        self.mix = nn.Linear(8, 12)
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        a = torch.relu(self.mix(self.stem(x).permute(0, 2, 3, 1)))
        return self.fc(a.mean((1, 2)))


def pointwise_nhwc() -> nn.Module:
    torch.manual_seed(0)
    return PointwiseNHWC().eval()


class TokenPool(nn.Module):
    """Patch tokens without a class token, mean-pooled: every token reaches the logits to the end."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, 16, 8, stride=8)
        self.block = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        return self.head(self.norm(self.block(t)).mean(1))


def token_pool() -> nn.Module:
    torch.manual_seed(0)
    return TokenPool().eval()


def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                 hidden_dim=16, mlp_dim=32, num_classes=5)
    nn.init.normal_(model.heads.head.weight)  # torchvision starts the head at zero: every class scores alike
    return model.eval()


@pytest.mark.parametrize("shape, size, grid", [
    ((768, 7, 7), (224, 224), (768, 7, 7)),
    ((7, 7, 768), (224, 224), (768, 7, 7)),  # Swin's last stage
    ((56, 56, 96), (224, 224), (96, 56, 56)),  # its first
    ((56, 56, 56), (224, 224), (56, 56, 56)),  # both readings fit: channels first, as before
    ((10, 13, 512), (300, 400), (512, 10, 13)),  # rounding at stride 32
    ((512, 10, 13), (300, 400), (512, 10, 13)),
    ((64, 64, 48), (256, 192), (64, 64, 48)),  # 64 channels over a 64x48 grid
    ((224, 224, 3), (224, 224), (3, 224, 224)),
    ((3, 224, 224), (224, 224), (3, 224, 224)),
    ((1, 1, 768), (224, 224), (768, 1, 1)),  # a channels-last pool
    ((197, 768), (224, 224), (768, 14, 14)),  # ViT's tokens, the class token dropped
    ((12, 8), (224, 224), None),
    ((768,), (224, 224), None),
])
def test_map_shapes(shape, size, grid):
    assert map_shape(shape, size) == grid


def test_as_maps_moves_channels_last_maps_and_their_gradients_and_is_idempotent():
    a = torch.randn(2, 4, 6, 32)
    maps = as_maps(a, SIZE)
    assert maps.shape == (2, 32, 4, 6) and maps.data_ptr() == a.data_ptr()  # a view
    torch.testing.assert_close(maps, a.permute(0, 3, 1, 2), rtol=0, atol=0)
    assert as_maps(maps, SIZE) is maps and not channels_last(maps.shape[1:], SIZE)
    g = torch.randn(2, 3, 4, 6, 32)  # (B, K, h, w, C)
    torch.testing.assert_close(as_maps(g, SIZE, lead=2), g.permute(0, 1, 4, 2, 3), rtol=0, atol=0)
    tokens = torch.randn(2, 17, 8)
    assert as_maps(tokens, SIZE, tokens=False) is tokens and as_maps(tokens, SIZE).shape == (2, 8, 4, 4)


METHODS = {"eager": ("gradcam", "gradcam++", "xgradcam", "layercam", "scorecam"),
           "torchscript": ("gradcam", "scorecam"), "onnxruntime": ("gradcam", "scorecam")}


@pytest.mark.parametrize("backend", list(METHODS))
def test_methods_at_a_channels_last_tap_equal_those_at_its_channels_first_copy(backend, tmp_path):
    x = torch.randn(2, 3, *SIZE, generator=torch.Generator().manual_seed(3))
    select = fixed([[1, 3], [0, 2]])
    opened = {tap: open_backend(backend, source_of(tiny_swin(), size=SIZE), tmp_path / tap, taps=[tap])
              for tap in ("norm", "permute")}
    for method in METHODS[backend]:
        maps = {}
        for tap, be in opened.items():
            maps[tap], out = get_method(method).run(be, x, select, tap=tap)
            assert out.taps[tap].shape == (2, 32, 4, 6), method
        assert maps["permute"].shape == (2, 2, 4, 6) and maps["permute"].abs().amax() > 0, method
        torch.testing.assert_close(maps["norm"], maps["permute"], rtol=1e-4, atol=1e-6, msg=method)


def test_cam_at_a_channels_last_tap_is_the_closed_form(tmp_path):
    model = pointwise_nhwc()
    report = describe(model, input_size=SIZE)
    assert report.default_tap == "relu" and report.cam_head is not None and report.cam_head.linear == "fc"
    x = torch.randn(2, 3, *SIZE, generator=torch.Generator().manual_seed(4))
    be = open_backend("eager", source_of(pointwise_nhwc(), size=SIZE), tmp_path)
    assert be.info.taps == ("relu",) and be.info.cam_tap == "relu"
    maps, _ = get_method("cam").run(be, x, fixed([[0, 2], [1, 1]]), tap="relu")
    with torch.no_grad():
        a = torch.relu(model.mix(model.stem(x).permute(0, 2, 3, 1)))  # (B, h, w, C)
        scores = torch.einsum("bhwc,nc->bnhw", a, model.fc.weight)
    want = torch.stack([scores[0, [0, 2]], scores[1, [1, 1]]])
    assert maps.shape == (2, 2, 8, 12) and want.abs().amax() > 0
    torch.testing.assert_close(maps, want, rtol=1e-5, atol=1e-6)


def test_feature_maps_and_exemplars_at_a_channels_last_tap(tmp_path):
    picture = tmp_path / "p.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (*SIZE, 3), dtype=np.uint8)).save(picture)
    spec = f"{__name__}:tiny_swin"
    views = {tap: camshaft.feature_maps(spec, picture, tap=tap, top=5, backend="eager", input_size=SIZE, device="cpu")
             for tap in ("norm", "permute")}
    assert views["norm"].channels == views["permute"].channels and views["norm"].maps.shape == (5, 4, 6)
    np.testing.assert_allclose(views["norm"].maps, views["permute"].maps, rtol=1e-5, atol=1e-6)

    x = torch.randn(3, 3, *SIZE, generator=torch.Generator().manual_seed(5))
    tables = {}
    for tap in ("norm", "permute"):
        be = open_backend("eager", source_of(tiny_swin(), size=SIZE), tmp_path / tap, taps=[tap])
        collector = ExemplarCollector([ExemplarSpec(tap, (0, 7, 31))], k=2)
        collector.update(be.forward(x).taps, [10, 11, 12], input_size=SIZE)
        tables[tap] = collector.table().drop(columns="tap")
    assert len(tables["norm"]) == 6
    for column in tables["norm"].columns:
        got, want = tables["norm"][column].to_numpy(), tables["permute"][column].to_numpy()
        if got.dtype == object and not isinstance(got[0], str):  # the map of each exemplar
            np.testing.assert_allclose(np.stack(got).astype(float), np.stack(want).astype(float), rtol=1e-5, atol=1e-6)
        elif np.issubdtype(got.dtype, np.floating):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        else:
            assert (got == want).all(), column
    assert {"channel", "rank", "score"} <= set(tables["norm"].columns), tables["norm"].columns


def test_actmax_channel_objectives_at_a_channels_last_tap():
    config = RenderConfig(steps=3, batch_size=2, device="cpu", jitter=0, scale=0.0, rotate=0.0, exact=True)
    pre = Preprocess(input_size=SIZE, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), resize="stretch")
    out = {tap: render(tiny_swin(), [channel(tap, 3), channel(tap, 30)], preprocess=pre, config=config)
           for tap in ("norm", "permute")}
    assert out["norm"].images.shape[-2:] == SIZE
    torch.testing.assert_close(out["norm"].values, out["permute"].values, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["norm"].images, out["permute"].images, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="channel 32 is out of range 0..31 of tap 'norm'"):
        render(tiny_swin(), [channel("norm", 32)], preprocess=pre, config=config)


def test_default_taps_of_transformers():
    """ViT reads its class token alone after the last block's attention: the last map its patches reach is
    that block's ``ln_1``. A model pooling every token: its last tokens. Swin: its last map, channels first."""
    assert describe(tiny_vit(), input_size=(32, 32)).default_tap == "encoder.layers.encoder_layer_1.ln_1"
    untrained = tiny_vit()
    nn.init.zeros_(untrained.heads.head.weight)  # torchvision's start: the logits move with nothing
    assert describe(untrained, input_size=(32, 32)).default_tap == "encoder.layers.encoder_layer_1.ln_1"
    frozen = tiny_vit().requires_grad_(False)  # as the backends hold it: the position embedding is off the tape
    assert describe(frozen, input_size=(32, 32)).default_tap == "encoder.layers.encoder_layer_1.ln_1"
    assert not any(p.requires_grad for p in frozen.parameters())
    live = tiny_vit()  # the check takes the weights off the tape meanwhile, and gives them back
    assert describe(live, input_size=(32, 32)).default_tap and all(p.requires_grad for p in live.parameters())
    assert describe(token_pool(), input_size=(32, 32)).default_tap == "norm"
    assert describe(tiny_swin(), input_size=SIZE).default_tap == "permute"


def test_gradcam_at_vits_default_tap_runs_and_file_backends_name_the_tap_they_cannot_differentiate(tmp_path):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    be = open_backend("eager", source_of(tiny_vit(), size=(32, 32)), tmp_path / "e")
    tap = be.info.taps[0]
    assert tap == "encoder.layers.encoder_layer_1.ln_1"
    maps, _ = get_method("gradcam").run(be, x, fixed([[0], [1]]), tap=tap)
    assert maps.shape == (2, 1, 4, 4)
    ts = open_backend("torchscript", source_of(tiny_vit(), size=(32, 32)), tmp_path / "t")
    assert ts.info.taps == (tap,)
    with pytest.raises(CapabilityError, match=f"at tap '{tap}'"):
        check_backend(get_method("gradcam"), ts, tap=tap)
    maps, _ = get_method("scorecam").run(ts, x, fixed([[0], [1]]), tap=tap)  # forward methods run there
    assert maps.shape == (2, 1, 4, 4)


def test_inspect_marks_channels_last_layers(capsys):
    from camshaft.cli import main

    assert main(["inspect", f"{__name__}:tiny_swin", "--input-size", "32,48"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert rows["norm"].split()[2:] == ["4x6x32", "(channels", "last:", "h", "x", "w", "x", "C)"]
    assert rows["permute"].split()[2:] == ["32x4x6", "<-", "default", "tap", "(permute)"]


def test_actmax_diversity_on_tokens_compares_the_gram_of_their_features():
    """Tokens that reach the diversity term as tokens (a tap of tokens that tile no square): its Gram matrix is
    (C, C) over their features, as over a map."""
    from camshaft.engine.actmax.regularizers import _similarity

    tokens = torch.randn(4, 16, 8, generator=torch.Generator().manual_seed(7))  # (R, T, C), no class token
    maps = as_maps(tokens, (32, 32))
    assert maps.shape == (4, 8, 4, 4)
    torch.testing.assert_close(_similarity(tokens, 2), _similarity(maps, 2))
    assert not torch.allclose(_similarity(tokens, 2), _similarity(tokens.transpose(1, 2), 2))


def test_feature_maps_of_vits_default_tap_are_its_patch_tokens_on_their_grid(tmp_path):
    from camshaft.preprocess import normalize, prepare

    path = tmp_path / "v.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
    plain = {"input_size": 32, "mean": 0.0, "std": 1.0, "resize": "stretch", "device": "cpu"}
    fm = camshaft.feature_maps(f"{__name__}:tiny_vit", path, channels=[3, 0], **plain)
    assert fm.tap == "encoder.layers.encoder_layer_1.ln_1" and fm.maps.shape == (2, 4, 4)
    model, seen = tiny_vit(), {}
    model.encoder.layers.encoder_layer_1.ln_1.register_forward_hook(lambda m, i, o: seen.setdefault("t", o.detach()))
    x, _ = prepare(Image.open(path).convert("RGB"), fm.preprocess)
    with torch.no_grad():
        model(normalize(x[None], fm.preprocess))
    tokens = seen["t"][0]  # (1 + 16, 16): the class token, then the patches row by row
    want = tokens[1:, [3, 0]].T.reshape(2, 4, 4).numpy()
    np.testing.assert_allclose(fm.maps, want, rtol=1e-5, atol=1e-6)


def test_actmax_channel_objectives_on_vit_tokens_are_means_over_the_patch_tokens():
    from camshaft.engine.actmax.render import as_saved

    tap = "encoder.layers.encoder_layer_1.mlp"  # (1 + 16, 16) per image
    config = RenderConfig(steps=3, batch_size=2, device="cpu", jitter=0, scale=0.0, rotate=0.0)
    pre = Preprocess(input_size=(32, 32), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), resize="stretch")
    r = render(tiny_vit(), [channel(tap, 3), channel(tap, 11)], preprocess=pre, config=config)
    model, seen = tiny_vit(), {}
    model.encoder.layers.encoder_layer_1.mlp.register_forward_hook(lambda m, i, o: seen.setdefault("t", o.detach()))
    with torch.no_grad():
        model((as_saved(r.images) - 0.5) / 0.25)  # the images in [0, 1], normalized as render does
    tokens = seen["t"]
    want = torch.stack([tokens[0, 1:, 3].mean(), tokens[1, 1:, 11].mean()])  # the class token left out
    assert not torch.allclose(want, torch.stack([tokens[0, :, 3].mean(), tokens[1, :, 11].mean()]))
    torch.testing.assert_close(r.values, want, rtol=1e-4, atol=1e-5)


def test_inspect_marks_token_layers_with_their_grid(capsys):
    from camshaft.cli import main

    assert main(["inspect", f"{__name__}:tiny_vit", "--input-size", "32"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert rows["encoder.layers.encoder_layer_1.ln_1"].split()[2:] == [
        "17x16", "(tokens:", "1", "+", "4x4)", "<-", "default", "tap", "(encoder.layers.encoder_layer_1.ln_1)"]


def test_an_onnx_vit_from_elsewhere_is_tapped_at_its_tokens(tmp_path):
    """Score-CAM at the ONNX graph's tensor of the last ``ln_1`` equals Score-CAM at that module of the torch model."""
    pytest.importorskip("onnxruntime")
    path = tmp_path / "vit.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(tiny_vit(), (torch.randn(1, 3, 32, 32),), str(path), dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "b"}})
    tensor = "/encoder/layers/encoder_layer_1/ln_1/LayerNormalization_output_0"
    source = resolve_model(str(path), preprocess={"mean": (0.0,) * 3, "std": (1.0,) * 3})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_be = open_backend("onnxruntime", source, tmp_path / "o", taps=[tensor])
    assert onnx_be.info.tap_shapes[tensor] == (17, 16)
    eager = open_backend("eager", source_of(tiny_vit(), size=(32, 32)), tmp_path / "e",
                         taps=["encoder.layers.encoder_layer_1.ln_1"])
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    select = fixed([[0, 3], [2, 1]])
    got, out = get_method("scorecam").run(onnx_be, x, select, tap=tensor)
    want, _ = get_method("scorecam").run(eager, x, select, tap="encoder.layers.encoder_layer_1.ln_1")
    assert got.shape == (2, 2, 4, 4) and out.taps[tensor].shape == (2, 16, 4, 4) and want.abs().amax() > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().amax().item())
    with pytest.raises(UnknownNameError, match="tokens \\(N, T, C\\) that tile a square"):
        open_backend("onnxruntime", source, tmp_path / "p", taps=["/encoder/layers/encoder_layer_1/Gather_output_0"])
