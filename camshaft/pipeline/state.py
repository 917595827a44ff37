"""What a run has done, on disk: so that a rerun resumes, and a nightly run updates.

``OUT/_camshaft/run.json`` names the job (fingerprints), ``done/PART.json`` marks a partition whose
maps chunk, table shard and overlays are complete (written last, atomically), ``rows/PART.parquet``
holds its table shard. A partition without a marker is recomputed, overwriting whatever a killed
run left of it (a run starts by deleting the half-written temporaries of killed writes); the final
table appears only when every partition is done. ``owner`` names the run that last took the folder:
a partition of an earlier run still going on a cluster worker after its run ended writes nothing
once another run took the folder over.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

from camshaft.pipeline.plan import Partition
from camshaft.writers.atomic import atomic_path, remove_temporaries, write_json
from camshaft.writers.maps_store import remove_partial_writes

STATE_DIR = "_camshaft"
MAPS_FILE, TABLE_FILE, OVERLAYS_DIR = "maps.zarr", "results.parquet", "overlays"
# a method folder's results besides its maps: reset deletes them, an update moves them aside (none
# may stay beside the new results: exemplars ranked the old images)
RESULT_FILES = (TABLE_FILE, "metrics.parquet", "exemplars.parquet")
ARTIFACTS_DIR = "artifacts"  # models exported for the job's backend
OWNER_FILE = "owner"  # the id of the run that last took the folder


class RunState:
    """``methods`` name the job's methods: one writes into ``out``, several into ``out/METHOD``."""

    def __init__(self, out: Path, methods: tuple[str, ...] = ()):
        self.out = Path(out)
        self.dir = self.out / STATE_DIR
        self.methods = tuple(methods)

    def method_dir(self, method: str) -> Path:
        return self.out if len(self.methods) <= 1 else self.out / method

    @property
    def result_dirs(self) -> list[Path]:
        return [self.method_dir(m) for m in self.methods] or [self.out]

    @property
    def previous(self) -> Path:
        """An earlier complete run kept aside while an update reuses its unchanged images."""
        return self.dir / "previous"

    def load(self) -> dict | None:
        try:
            return json.loads((self.dir / "run.json").read_text())
        except (OSError, ValueError):
            return None

    def save(self, info: dict) -> None:
        write_json(self.dir / "run.json", info)

    def claim(self, run_id: str) -> None:
        """Make ``run_id`` the folder's owner: tasks of any other run commit nothing from now on."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.dir / OWNER_FILE) as tmp:
            tmp.write_text(run_id)

    def owner(self) -> str | None:
        """The run that last claimed the folder (None: none, or a reset under way)."""
        try:
            return (self.dir / OWNER_FILE).read_text()
        except OSError:
            return None

    def is_done(self, part: Partition) -> bool:
        return (self.dir / "done" / f"{part.name}.json").exists()

    def mark_done(self, part: Partition, summary: dict) -> None:
        write_json(self.dir / "done" / f"{part.name}.json", summary)

    def rows_path(self, part: Partition, method: str) -> Path:
        return self.dir / "rows" / method / f"{part.name}.parquet"

    def previous_dir(self, method: str) -> Path:
        return self.previous / method

    def remove_temporaries(self) -> int:
        """Delete the half-written files a killed run left (shards, markers, tables, overlays, map
        chunks, an export)."""
        removed = remove_temporaries(self.dir) + remove_temporaries(self.out / ARTIFACTS_DIR, recursive=False)
        for folder in self.result_dirs:
            removed += remove_temporaries(folder, recursive=False) + remove_temporaries(folder / OVERLAYS_DIR)
            removed += remove_partial_writes(folder / MAPS_FILE)
        return removed

    def reset(self) -> None:
        """Forget everything a run wrote in ``out`` (and nothing else) but who owns it."""
        owner = self.owner()
        shutil.rmtree(self.dir, ignore_errors=True)
        if owner is not None:
            self.claim(owner)
        for folder in self.result_dirs:
            for name in (MAPS_FILE, OVERLAYS_DIR):
                shutil.rmtree(folder / name, ignore_errors=True)
            for name in RESULT_FILES:
                (folder / name).unlink(missing_ok=True)
            if folder != self.out:  # a method's own folder, left empty: it goes too
                with contextlib.suppress(OSError):
                    folder.rmdir()

    @property
    def _moving(self) -> Path:
        """Where ``keep_previous`` gathers the results before they become ``previous`` in one rename."""
        return self.dir / "previous.partial"

    def keep_previous(self) -> None:
        """Move the finished results aside (for reuse) and clear the markers of the old plan.

        The files move one by one into a staging folder that becomes ``previous`` in one rename; a
        run killed before that rename is undone by the next run (``restore_interrupted``).
        """
        shutil.rmtree(self.previous, ignore_errors=True)
        for method in self.methods:
            (self._moving / method).mkdir(parents=True, exist_ok=True)
            for name in (MAPS_FILE, *RESULT_FILES, OVERLAYS_DIR):  # overlays: linked back under their new names
                if (self.method_dir(method) / name).exists():
                    shutil.move(str(self.method_dir(method) / name), str(self._moving / method / name))
        self._moving.rename(self.previous)
        self.clear_partitions()

    def restore_interrupted(self) -> None:
        """Put back the results that an update killed while moving them aside had moved."""
        if not self._moving.exists():
            return
        for folder in self._moving.iterdir():
            for item in folder.iterdir():
                target = self.method_dir(folder.name) / item.name
                if not target.exists():
                    shutil.move(str(item), str(target))
        shutil.rmtree(self._moving)

    def clear_partitions(self) -> None:
        """Drop the markers and shards of an old plan (and its overlays: indices move)."""
        for name in ("done", "rows", "metrics", "exemplars"):
            shutil.rmtree(self.dir / name, ignore_errors=True)
        for folder in self.result_dirs:
            shutil.rmtree(folder / OVERLAYS_DIR, ignore_errors=True)

    def drop_previous(self) -> None:
        shutil.rmtree(self.previous, ignore_errors=True)
