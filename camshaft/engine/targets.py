"""Which classes to explain per image: ``top:K``, ``label`` or an explicit list of classes."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from camshaft.engine.backends.base import Selector
from camshaft.errors import ConfigError

SYNTAX = "top:K (K predicted classes), label (the dataset's label), or classes as 3,17,cat"


@dataclass(frozen=True)
class Targets:
    kind: str  # top | label | classes
    k: int = 1
    classes: tuple[int, ...] = ()

    @classmethod
    def parse(cls, text: str, *, class_names: Sequence[str] | None = None, num_classes: int | None = None) -> Targets:
        """Parse a ``--targets`` value, checking class names and indices against the model."""
        text = text.strip()
        if text == "label":
            return cls("label")
        if text.startswith("top:") or text == "top":
            k = text.partition(":")[2] or "1"
            if not k.isdigit() or int(k) < 1:
                raise ConfigError(f"--targets {text!r}: K must be a positive integer; use {SYNTAX}")
            if num_classes is not None and int(k) > num_classes:
                raise ConfigError(f"--targets {text!r}: the model has only {num_classes} classes")
            return cls("top", int(k))
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise ConfigError(f"--targets {text!r} names no class; use {SYNTAX}")
        indices, bad = [], []
        for item in items:
            index = class_index(item, class_names=class_names, num_classes=num_classes)
            (bad.append(item) if index is None else indices.append(index))
        if bad:
            valid = f"0..{num_classes - 1}" if num_classes else "class indices"
            listed = list(class_names or [])
            more = ", ..." if len(listed) > 5 else ""  # only when names are left out
            names = f" or names such as {', '.join(listed[:5])}{more}" if listed else ""
            raise ConfigError(f"--targets: unknown classes {bad}; use {valid}{names}")
        return cls("classes", len(indices), tuple(indices))

    def selector(self, labels: torch.Tensor | None = None) -> Selector:
        """``logits -> (B, K)`` targets; ``labels`` (B,) are needed for ``label``."""
        if self.kind == "top":
            return lambda logits: logits.topk(self.k, dim=-1).indices
        if self.kind == "label":
            if labels is None:
                raise ConfigError("--targets label needs labels: use a manifest with a label column")
            return lambda logits: labels.to(logits.device, non_blocking=True).view(-1, 1)  # labels: pinned on a GPU
        host = torch.device("cpu")
        on: dict[torch.device, torch.Tensor] = {host: torch.tensor(self.classes, dtype=torch.long)}

        def fixed(logits: torch.Tensor) -> torch.Tensor:  # copied to a device once, not at every batch
            if logits.device not in on:
                on[logits.device] = on[host].to(logits.device)
            return on[logits.device].expand(logits.shape[0], -1)

        return fixed

    def __str__(self) -> str:
        if self.kind == "top":
            return f"top:{self.k}"
        return "label" if self.kind == "label" else ",".join(map(str, self.classes))


def class_index(item: str, *, class_names: Sequence[str] | None, num_classes: int | None,
                names_first: bool = False) -> int | None:
    """A class given by index or by name -> its index, or None if it is not a class.

    Digits are an index (``--targets 3``), unless ``names_first`` and a class is named so: a label names its
    class, and an ImageFolder tree of numeric folders sorts them as text (0, 1, 10, 2, ...), so the label "10"
    is the class named "10" (index 2), not index 10.
    """
    if names_first and class_names and item in class_names:
        return list(class_names).index(item)
    if item.lstrip("-").isdigit():
        index = int(item)
        return index if num_classes is None or 0 <= index < num_classes else None
    if class_names and item in class_names:
        return list(class_names).index(item)
    whole = re.fullmatch(r"(-?\d+)\.0*", item)  # "3.0": pandas writes an int column with gaps as floats
    if whole:
        return class_index(whole.group(1), class_names=class_names, num_classes=num_classes)
    return None
