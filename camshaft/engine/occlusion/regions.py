"""Changed regions of occluded activations: a box per variant over the unoccluded activation.

Occluding a patch of the input changes, at every layer, only the activations inside the patch's
receptive-field cone. A ``Region`` stores just that part: for P occluded variants of one image,
the activation equals ``base`` (the unoccluded activation, cached) everywhere except inside a box
per variant, where it equals ``crop``. The boxes of all variants have one size, so crops stack into
one batch; a box bigger than the changed part is harmless (its extra cells are recomputed to the
values ``base`` already holds), which is how border boxes keep the common size (they shift inward).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Region:
    """P variants of one activation: ``base`` outside the boxes, ``crop`` inside them."""

    crop: torch.Tensor  # (P, C, h, w) the variants' values inside their boxes
    top: torch.Tensor  # (P,) long, on the CPU: each box's first row in the map
    left: torch.Tensor  # (P,) long, on the CPU: each box's first column
    base: torch.Tensor  # (1, C, H, W) the unoccluded activation

    @property
    def box(self) -> tuple[int, int]:
        return tuple(self.crop.shape[-2:])

    @property
    def map_size(self) -> tuple[int, int]:
        return tuple(self.base.shape[-2:])

    def covers(self, fraction: float) -> bool:
        """Whether the boxes cover at least ``fraction`` of the map."""
        (h, w), (mh, mw) = self.box, self.map_size
        return h * w >= fraction * mh * mw


def source(base: torch.Tensor, pad: tuple[int, int, int, int] = (0, 0, 0, 0), value: float = 0.0) -> torch.Tensor:
    """``base`` (1, C, H, W) padded by (top, bottom, left, right) cells of ``value``, as (Hp, Wp, C).

    In the (H, W, C) layout ``gather_boxes`` gathers every box's pixels in runs of C contiguous values.
    """
    top, bottom, left, right = pad
    if any(pad):
        base = torch.nn.functional.pad(base, (left, right, top, bottom), value=value)
    return base[0].permute(1, 2, 0).contiguous()


def box_starts(top: torch.Tensor, left: torch.Tensor, width: int, device) -> torch.Tensor:
    """The first cells (P,) of boxes at (``top``, ``left``) in an (H, ``width``, C) source, on ``device``."""
    return (top * width + left).to(device, non_blocking=True)


def gather_boxes(src: torch.Tensor, first: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Boxes of ``size`` starting at the cells ``first`` (see ``box_starts``) of ``src``: (P, C, h, w).

    Every box of ``size`` is a strided view of ``src`` starting at its first cell (a box starting
    near the right edge would wrap into the next rows, but none is selected), so one
    ``index_select`` copies the P boxes, in runs of C contiguous values. They come out
    channels-last, the layout CPU convolutions on small maps run fastest on.
    """
    (hp, wp, c), (h, w) = src.shape, size
    src = src.contiguous()  # the view below assumes it (``source`` makes it so)
    starts = (hp - h) * wp + (wp - w) + 1  # the first cells of boxes that lie inside the map
    boxes = src.as_strided((starts, h, w, c), (c, wp * c, c, 1))
    return boxes.index_select(0, first).permute(0, 3, 1, 2)  # (P, h, w, C) seen as (P, C, h, w)


def boxes_of(src: torch.Tensor, top: torch.Tensor, left: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Boxes of ``size`` at (``top``, ``left``) (P,) of an (H, W, C) ``source``: (P, C, h, w)."""
    return gather_boxes(src, box_starts(top, left, src.shape[1], src.device), size)


@dataclass(frozen=True)
class ReadPlan:
    """Where ``read`` takes each value from, for one geometry: index tensors on the device.

    The geometry (boxes, crops, padding) of a batch of variants is the same for every image, so a
    sweep plans each read once per batch of positions and applies it to every image's activations.
    """

    size: tuple[int, int]
    first: torch.Tensor | None  # box_starts of the boxes; None: the boxes are the crop's own
    runs: torch.Tensor | None = None  # each crop row's first value in the flat boxes (crops inside boxes)
    cells: torch.Tensor | None = None  # otherwise: the box cells the crop covers
    rows: torch.Tensor | None = None  # and the crop cells they take


def plan_read(r: Region, top: torch.Tensor, left: torch.Tensor, size: tuple[int, int], *, pad=(0, 0, 0, 0)) -> ReadPlan:
    """The plan of ``read(r, top, left, size, src, pad=pad)``: geometry only, no activation is read."""
    (h, w), (ch, cw) = size, r.box
    dev = r.crop.device
    dy, dx = r.top + pad[0] - top, r.left + pad[2] - left  # (P,) the crop's corner inside each box
    if (h, w) == (ch, cw) and not bool(dy.any() or dx.any()):
        return ReadPlan(size, None)  # the boxes are the crop's own: nothing of the base shows
    first = box_starts(top, left, r.map_size[1] + pad[2] + pad[3], dev)
    p = len(top)
    if bool((dy >= 0).all() and (dy <= h - ch).all() and (dx >= 0).all() and (dx <= w - cw).all()):
        runs = (torch.arange(p)[:, None] * h + dy[:, None] + torch.arange(ch)) * w + dx[:, None]  # (P, ch)
        return ReadPlan(size, first, runs=runs.view(-1).to(dev, non_blocking=True))
    ri = torch.arange(h) - dy[:, None]  # (P, h): row inside the crop
    ci = torch.arange(w) - dx[:, None]  # (P, w)
    inside = ((ri >= 0) & (ri < ch))[:, :, None] & ((ci >= 0) & (ci < cw))[:, None, :]  # (P, h, w)
    v, y, x = inside.nonzero(as_tuple=True)  # the box cells the crop covers
    if not len(v):
        return ReadPlan(size, first)
    rows = ((v * ch + ri[v, y]) * cw + ci[v, x]).to(dev, non_blocking=True)
    return ReadPlan(size, first, cells=((v * h + y) * w + x).to(dev, non_blocking=True), rows=rows)


def apply_read(plan: ReadPlan, crop: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``read`` by its plan: the variants' activation (P, C, h, w) from their ``crop`` and ``src``."""
    if plan.first is None:
        return crop
    out = gather_boxes(src, plan.first, plan.size)
    (p, c), (h, w), (ch, cw) = out.shape[:2], plan.size, crop.shape[-2:]
    if plan.runs is not None:
        # each crop row is a run of cw * C values of ``out`` (channels-last, contiguous): copy the
        # P * ch runs at once through a view whose rows start at every cell
        starts = out.as_strided((p * h * w - cw + 1, cw * c), (c, 1))
        starts.index_copy_(0, plan.runs, crop.permute(0, 2, 3, 1).reshape(p * ch, cw * c).to(out.dtype))
    elif plan.cells is not None:
        cells = out.permute(0, 2, 3, 1).view(p * h * w, c)  # ``out`` is channels-last: a view
        values = crop.permute(0, 2, 3, 1).reshape(p * ch * cw, c).index_select(0, plan.rows)
        cells.index_copy_(0, plan.cells, values.to(cells.dtype))
    return out


def read(
    r: Region, top: torch.Tensor, left: torch.Tensor, size: tuple[int, int], src: torch.Tensor, *, pad=(0, 0, 0, 0)
) -> torch.Tensor:
    """The variants' activation inside boxes of ``size`` at (``top``, ``left``): (P, C, h, w).

    ``src`` is ``source(r.base, pad, ...)``: box coordinates are those of the map padded by ``pad``
    (top, bottom, left, right). Cells inside a variant's own box come from ``r.crop``. Where the
    boxes are the crop's own, the result is ``r.crop`` itself: never write into it.
    """
    return apply_read(plan_read(r, top, left, size, pad=pad), r.crop, src)


def plan_full(r: Region) -> ReadPlan:
    """The plan of reading the whole map of ``r`` (for ``materialize``)."""
    zeros = torch.zeros_like(r.top)
    return plan_read(r, zeros, zeros, r.map_size)


def materialize(
    plan: ReadPlan, crop: torch.Tensor, src: torch.Tensor, memory_format: torch.memory_format = torch.contiguous_format
) -> torch.Tensor:
    """The full activations (P, C, H, W) of the variants, in the layout a plain forward's would have.

    ``plan`` is ``plan_full`` of their Region, ``crop`` its crop and ``src`` ``source(r.base)``.
    """
    out = apply_read(plan, crop, src)
    return out.clone(memory_format=memory_format) if out is crop else out.contiguous(memory_format=memory_format)


def _ceil_div(a: torch.Tensor, b: int) -> torch.Tensor:
    return -torch.div(-a, b, rounding_mode="floor")


def window_range(
    start: torch.Tensor,
    length: int,
    *,
    kernel: int,
    stride: int,
    padding: int,
    dilation: int,
    size_in: int,
    size_out: int,
) -> tuple[torch.Tensor, int, int]:
    """Along one axis of a sliding-window op (conv, pool): the outputs a changed input span affects.

    The inputs ``[start, start + length)`` change; returns (first output (P,), count R, right
    padding): outputs ``[first, first + R)`` hold every changed output and lie inside the map. They
    read the padded input ``[first * stride, first * stride + (R - 1) * stride + span)``, where the
    input is padded by ``padding`` on the left and by the returned amount on the right.
    """
    span = (kernel - 1) * dilation + 1
    lo = _ceil_div(start + padding - span + 1, stride).clamp(min=0)
    hi = (torch.div(start + length - 1 + padding, stride, rounding_mode="floor") + 1).clamp(max=size_out)
    count = int((hi - lo).max()) if lo.numel() else 1
    count = min(max(count, 1), size_out)
    first = torch.minimum(lo, torch.full_like(lo, size_out - count))
    right = max(0, (size_out - 1) * stride + span - size_in - padding)
    return first, count, right


def union(regions: list[Region]) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """One box per variant holding the boxes of every region (same map): (top, left, size)."""
    (mh, mw) = regions[0].map_size
    top = torch.stack([r.top for r in regions]).amin(0)
    left = torch.stack([r.left for r in regions]).amin(0)
    bottom = torch.stack([r.top + r.box[0] for r in regions]).amax(0)
    right = torch.stack([r.left + r.box[1] for r in regions]).amax(0)
    h, w = min(int((bottom - top).max()), mh), min(int((right - left).max()), mw)
    return top.clamp(max=mh - h), left.clamp(max=mw - w), (h, w)
