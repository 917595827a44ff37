"""A benchmark run's results: the JSON document (saved and reloaded) and the printed table.

The table is printed from the JSON form, so a saved run prints exactly as it did live.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from camshaft.bench.ratios import derive
from camshaft.bench.workload import ROLES, Figure, Skipped
from camshaft.errors import ConfigError
from camshaft.writers.atomic import atomic_path, cannot_write

SCHEMA = "camshaft-bench/1"


@dataclass
class BenchReport:
    settings: dict
    machine: dict
    figures: list[Figure] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    complete: bool = True  # False while a run is still measuring (what it saves after each group)

    def to_dict(self) -> dict:
        derived = derive(self.figures)
        return {
            "schema": SCHEMA,
            "created": self.created,
            "complete": self.complete,
            "machine": self.machine,
            "settings": self.settings,
            "figures": [{**f.to_dict(), **derived[f.key]} for f in self.figures],
            "skipped": [s.to_dict() for s in self.skipped],
        }


def save_json(data: dict, path: str | Path) -> Path:
    """Write ``data`` to ``path`` atomically (a temporary name, then a rename; no temporary left on failure)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


def output_problem(path: str | Path) -> str | None:
    """Why results cannot be saved to ``path`` (None: they can), found before any work by creating a file there."""
    path = Path(path)
    if path.is_dir():
        return f"{path} is a folder; give a file name, e.g. {path / 'bench.json'}"
    if not path.parent.is_dir():
        return f"folder {path.parent} does not exist"
    why = cannot_write(path.parent)
    return None if why is None else f"cannot write in {path.parent}: {why}"


def load_json(path: str | Path) -> dict:
    """A saved run; anything else is a ConfigError that says what was found."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read benchmark results {path}: {e}") from e
    if not isinstance(data, dict) or data.get("schema") != SCHEMA or not isinstance(data.get("figures"), list):
        found = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise ConfigError(f"{path} is not a camshaft benchmark result (schema {SCHEMA!r}); found {found!r}")
    bad = [i for i, f in enumerate(data["figures"]) if not _is_figure(f)]
    if bad:
        raise ConfigError(
            f"{path}: figures {bad[:10]}{' ...' if len(bad) > 10 else ''} of {len(data['figures'])} are not benchmark "
            "figures (each is an object with a text 'key' and a 'role'); save the run again with camshaft bench --json"
        )
    odd = [name for name in ("machine", "settings") if not isinstance(data.get(name, {}), dict)]
    if odd:
        raise ConfigError(f"{path}: {' and '.join(odd)} must be objects; save the run again with camshaft bench --json")
    return data


def _is_figure(f) -> bool:
    return isinstance(f, dict) and isinstance(f.get("key"), str) and f.get("role") in ROLES


# --- the table ----------------------------------------------------------------------------------


def _num(v, spec: str = ".1f", suffix: str = "") -> str:
    return "-" if v is None else f"{v:{spec}}{suffix}"


def _group(f: dict) -> str:
    h, w = f.get("input_size") or ("?", "?")
    return f"{Path(str(f.get('model'))).name} {h}x{w} b{f.get('batch')}"


def _method(f: dict) -> str:
    return f"{f['method']}[{f['variant']}]" if f.get("variant") and f["role"] != "peer" else f["method"]


def _table(headers: list[str], rows: list[list[str]], *, labels: int = 4) -> str:
    """Columns aligned: the first ``labels`` (text) to the left, the numbers to the right."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=True)]
    left = set(range(min(labels, len(headers))))

    def line(cells):
        return "  ".join(
            str(c).ljust(w) if i in left else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def _limit_variants(figures: list[dict]) -> list[str]:
    """The limit table's columns: every variant, and the graphed, CPU-only and compiled ones of a run that has them."""
    from camshaft.bench.limits import COMPILED_VARIANTS, CPU_VARIANTS, GRAPH_VARIANTS, VARIANTS

    seen = {f.get("variant") for f in figures if f["role"] == "limit"}
    return [*VARIANTS, *(v for v in (*CPU_VARIANTS, *COMPILED_VARIANTS, *GRAPH_VARIANTS) if v in seen)]


def _limit_group(f: dict) -> str:
    """A limit's group, with the batch of its forwards where a method runs larger ones than the group's batch."""
    n = f.get("forward_batch")
    return _group(f) + (f" (forwards of {n})" if n and n != f.get("batch") else "")


def _limit_rows(figures: list[dict]) -> list[list[str]]:
    columns = _limit_variants(figures)
    by_group: dict[str, dict] = {}
    for f in figures:
        if f["role"] == "limit":
            by_group.setdefault(_limit_group(f), {})[f["variant"]] = f["images_per_second"]
    rows = []
    for g, variants in by_group.items():
        best = max(variants, key=variants.get)
        rows.append([g, *(_num(variants.get(v)) for v in columns), f"{variants[best]:.1f} ({best})"])
    return rows


def _method_rows(figures: list[dict]) -> list[list[str]]:
    rows = []
    for f in figures:
        if f["role"] != "method":
            continue
        peers = ", ".join(f"{p} {v['speedup']:.2f}x" for p, v in (f.get("peers") or {}).items())
        evals = f["evaluations_per_second"] if f["evaluations"] != f["images"] else None
        rows.append(
            [
                _group(f),
                _method(f),
                f["targets"],
                f["backend"],
                _num(f["images_per_second"]),
                _num(f["pairs_per_second"]),
                _num(evals),
                _ratio(f),
                _num(f.get("ratio_to_gradient_limit"), ".2f"),
                peers or "-",
            ]
        )
    return rows


def _ratio(f: dict) -> str:
    """The ratio to the limit, with the batch of the limit where it is not the figure's own."""
    text = _num(f.get("ratio_to_limit"), ".2f")
    return text + (f" (b{f['limit_batch']})" if f.get("limit_batch") and f.get("ratio_to_limit") else "")


def _gradient_rows(figures: list[dict]) -> list[list[str]]:
    """The gradient limits' parts: each head or input backward (images/s, with its ratio to the limit)."""
    rows = []
    for f in figures:
        if f["role"] in ("head_backward", "input_backward"):
            what = "head above the tap" if f["role"] == "head_backward" else f"input ({f.get('variant') or 'eager'})"
            rows.append([_limit_group(f), what, f"top:{f.get('k')}", _num(f["images_per_second"]), _ratio(f)])
    return rows


def _actmax_rows(figures: list[dict]) -> list[list[str]]:
    return [
        [_group(f), f.get("variant") or "-", _num(f["images_per_second"], ".2f"),
         _num(f["best_seconds"] / max(1, f["images"]), ".3f")]
        for f in figures
        if f["role"] == "actmax_limit"
    ]


def _other_rows(figures: list[dict]) -> list[list[str]]:
    rows = []
    for f in figures:
        if f["role"] == "peer":
            label = f["peer"] + (f" ({f['variant']})" if f.get("variant") else "")
            rows.append(
                [
                    _group(f),
                    f["method"],
                    f["targets"],
                    label,
                    _num(f["images_per_second"]),
                    _num(f["pairs_per_second"]),
                    _ratio(f),
                    "-",
                ]
            )
        elif f["role"] == "pipeline":
            rows.append(
                [
                    _group(f),
                    _method(f),
                    f["targets"],
                    f"pipeline/{f['backend']}",
                    _num(f["images_per_second"]),
                    _num(f["pairs_per_second"]),
                    _ratio(f),
                    _num(f.get("ratio_to_method"), ".2f"),
                ]
            )
    return rows


def _header(data: dict) -> str:
    m, s = data.get("machine", {}), data.get("settings", {})
    timing = s.get("timing", {})
    load = ", ".join(f"{x:.1f}" for x in m.get("load_average") or [])
    quick = " (quick mode: sizes too small to mean anything)" if s.get("quick") else ""
    if data.get("complete") is False:
        quick += "\nINCOMPLETE: the run stopped before it measured everything it was asked for"
    return (
        f"camshaft bench on {m.get('device_name')} ({m.get('device')}, {m.get('dtype')}"
        f"{', CUDA graphs' if s.get('cuda_graphs') else ''}), "
        f"{m.get('usable_cores')} cores, torch threads {m.get('torch_threads')}, load average {load or '?'}, "
        f"GLIBC_TUNABLES={'set' if m.get('glibc_tunables') else 'unset'}; best of {timing.get('repeats')} rounds "
        f"after {timing.get('warmup')} warm-up calls{quick}"
    )


def format_table(data: dict, *, skipped: bool = True) -> str:
    """The printed report of a run (from its JSON form)."""
    figures = data["figures"]
    parts = [_header(data)]
    if any(f["role"] == "limit" for f in figures):
        parts += [
            "",
            "limit: plain batched forward, inference mode (images/s)",
            _table(["model", *_limit_variants(figures), "limit"], _limit_rows(figures), labels=1),
        ]
    gradient = _gradient_rows(figures)
    if gradient:
        parts += [
            "",
            "gradient limits: a forward and a batched backward of K scores (images/s; x limit: of the forward)",
            _table(["model", "backward to", "targets", "img/s", "x limit"], gradient, labels=3),
        ]
    actmax = _actmax_rows(figures)
    if actmax:
        parts += [
            "",
            "activation maximization limit: a plain batched Adam loop, no regularization",
            _table(["model (classes)", "variant", "classes/s", "s/class"], actmax, labels=2),
        ]
    if any(f["role"] == "method" for f in figures):
        headers = [
            "model",
            "method",
            "targets",
            "backend",
            "img/s",
            "pairs/s",
            "evals/s",
            "x limit",
            "x grad-limit",
            "speed-up over peers",
        ]
        parts += ["", "camshaft", _table(headers, _method_rows(figures))]
    other = _other_rows(figures)
    if other:
        parts += [
            "",
            "peers and pipeline (same run)",
            _table(["model", "method", "targets", "who", "img/s", "pairs/s", "x limit", "x method"], other),
        ]
    if skipped and data.get("skipped"):
        parts += ["", f"skipped ({len(data['skipped'])}):"]
        parts += [
            f"  {x['key']}: {'FAILED ' if x.get('failed') else ''}{_first_line(x['reason'])}" for x in data["skipped"]
        ]
    return "\n".join(parts)


def _first_line(text: str, limit: int = 160) -> str:
    line = str(text).strip().splitlines()[0] if str(text).strip() else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."
