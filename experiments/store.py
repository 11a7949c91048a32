"""The results store: one folder per grid, one sub-folder per run; results are moved aside, never deleted.

    GRID/manifest.json          base config hash, base preset + overrides, the points, seeds, version
    GRID/<run name>/run.json    the run's point, seed, overrides and resolved config
    GRID/<run name>/status.json pending | running | done | failed, with the error, timings and memory
    GRID/<run name>/...         what `codetr train` writes: config.json, log.jsonl, last.pt, metrics.json
    GRID/<run name>/run.log     the run's own output (its traceback when it failed)
    GRID/results.{csv,md,tex}, GRID/plot_<metric>.png    the rendered table (experiments/table.py)

Every write is atomic. `codetr ablate` holds `GRID/.grid.lock` while it runs, so two grid processes
never drive one folder; a run being executed holds `<run>/.lock`, so a re-run of the grid can tell an
interrupted run (no lock holder: resume it) from one still running elsewhere.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from codetr import __version__
from codetr.config import Config
from codetr.engine.folder_lock import FolderLock, LockBusy, RunFolderLock, is_locked  # noqa: F401 (re-exported)
from codetr.errors import ConfigError
from codetr.io import atomic_write_json
from experiments.grid import GridPoint, GridSpec, default_baseline, run_name
from experiments.params import check_point, point_overrides

PENDING, RUNNING, DONE, FAILED = "pending", "running", "done", "failed"


@dataclass
class RunRecord:
    """A run of the grid: where it lives and what it is."""

    directory: Path
    point: GridPoint
    seed: int

    @property
    def name(self) -> str:
        return self.directory.name

    def status(self) -> dict[str, Any]:
        return read_status(self.directory)


def read_json(path: Path, default: Any = None) -> Any:
    """A grid file's JSON object (every file of the store holds one), `default` when it does not exist."""
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        return default
    except NotADirectoryError:
        raise ConfigError(f"{path.parent} is not a folder; expected a grid folder written by `codetr ablate`") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise ConfigError(f"{path}: corrupt JSON ({error}); move it away to start that part afresh") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: expected a JSON object, got a {type(value).__name__}; move it away to start that "
                          "part afresh")
    return value


def read_status(run_dir: Path) -> dict[str, Any]:
    status = read_json(run_dir / "status.json", {"state": PENDING})
    if not isinstance(status.get("metrics") or {}, dict) or "state" not in status:
        raise ConfigError(f"{run_dir / 'status.json'}: expected a status written by `codetr ablate` (a state and a "
                          "metrics object); move it away to re-run that run")
    return status


def update_status(run_dir: Path, **fields: Any) -> dict[str, Any]:
    status = read_status(run_dir)
    status.update(fields, updated=time.time())
    atomic_write_json(run_dir / "status.json", status)
    return status


class RunLock(RunFolderLock):
    """Held by the worker executing a run. The Trainer inside it re-enters it (as a RunFolderLock); a second
    worker, even in this process, is refused."""

    reentrant = False
    busy_message = "is being executed by another process (pid {pid})"


class GridLock(FolderLock):
    name = ".grid.lock"
    busy_message = "is being run by another `codetr ablate` process (pid {pid}); wait for it, or use another --out"


# Written into every manifest. Grids made before it applied lambda1 to the auxiliary heads and lambda2 to
# the positive queries (the reverse of the paper's Eq. 6, which codetr follows now).
LOSS_CONVENTION = "eq6"
LAMBDA_KEYS = ("lambda1", "lambda2", "model.aux.lambda1", "model.aux.lambda2")


def check_loss_convention(manifest: dict[str, Any], manifest_path: Path) -> None:
    """Refuse a grid over lambda1 / lambda2 made before codetr followed Eq. 6: its values mean the other term."""
    if manifest.get("loss_convention") == LOSS_CONVENTION or not set(manifest.get("params", [])) & set(LAMBDA_KEYS):
        return
    raise ConfigError(
        f"{manifest_path}: this grid was made by a codetr whose lambda1 weighed the auxiliary heads and lambda2 the "
        "positive queries; lambda1 now weighs the positive queries and lambda2 the auxiliary heads (the paper's Eq. 6), "
        "so its values would be misread: run the grid again into another --out"
    )


def base_config_summary(spec: GridSpec, base: Config) -> dict[str, Any]:
    return {"preset": spec.preset, "overrides": spec.overrides, "hash": base.hash()}


def open_grid(root: Path, spec: GridSpec, base: Config, allow_changed_base: bool = False) -> list[RunRecord]:
    """Create or re-open the grid folder and return this invocation's runs (point x seed), creating their
    folders. The caller holds the folder's GridLock.

    A re-opened grid must have the same base config (hash); points and seeds may be added, and the
    manifest keeps the earlier ones (and their baseline). With `allow_changed_base`, the new base is
    recorded, and every run of the grid (this invocation's and the manifest's earlier points and seeds)
    whose resolved config changed is moved aside to `<run>.stale-<old hash>` (never deleted) and starts
    over as pending; a run moved aside earlier with exactly the new config comes back. So the table never
    mixes runs of two base configs.
    """
    root.mkdir(parents=True, exist_ok=True)
    manifest_path = root / "manifest.json"
    manifest = read_json(manifest_path)
    base_summary = base_config_summary(spec, base)
    if manifest is not None:
        check_loss_convention(manifest, manifest_path)
    if manifest is not None and manifest["base"]["hash"] != base_summary["hash"] and not allow_changed_base:
        old = manifest["base"]
        raise ConfigError(
            f"{manifest_path}: this grid was made with a different base config (preset {old['preset']}, "
            f"--set {old['overrides']}, hash {old['hash']}; now {base_summary['hash']}); use another --out, "
            f"or pass --allow-changed-base to re-run the points whose config changed"
        )
    points = _merge_points(manifest, spec)
    merged = GridSpec(points=points, seeds=spec.seeds)
    baseline = spec.baseline or (manifest or {}).get("baseline") or default_baseline(points, base)
    rebase = manifest is not None and manifest["base"]["hash"] != base_summary["hash"]
    if rebase:  # every earlier point must be valid under the new base before anything is moved
        for point in points:
            check_point(point.values, base)
    runs = [_prepare_run(root, point, seed, spec, base) for point in spec.points for seed in spec.seeds]
    if rebase:
        mine = {run_name(p, seed) for p in spec.points for seed in spec.seeds}
        for point in points:  # the earlier points and seeds are re-based too (their runs wait for a re-run)
            for seed in manifest.get("seeds", []):
                if run_name(point, seed) not in mine and (root / run_name(point, seed)).exists():
                    _prepare_run(root, point, seed, spec, base)
    atomic_write_json(manifest_path, {  # written last: it describes runs that exist
        "version": __version__,
        "loss_convention": LOSS_CONVENTION,
        "created": (manifest or {}).get("created", time.time()),
        "base": base_summary,
        "name": spec.name,
        "title": spec.title,
        "paper_metric": spec.paper_metric,
        "baseline": baseline,
        "params": merged.param_names,
        "points": [p.to_record() for p in points],
        "seeds": sorted(set((manifest or {}).get("seeds", [])) | set(spec.seeds)),
    })
    return runs


def _merge_points(manifest: dict | None, spec: GridSpec) -> list[GridPoint]:
    points = [GridPoint.from_record(p) for p in (manifest or {}).get("points", [])]
    for point in spec.points:
        match = next((p for p in points if p.values == point.values), None)
        if match is None:
            points.append(point)
            continue
        if point.paper is not None:
            match.paper = point.paper
        match.paper_costs.update(point.paper_costs)
    return points


def _prepare_run(root: Path, point: GridPoint, seed: int, spec: GridSpec, base: Config) -> RunRecord:
    run_dir = root / run_name(point, seed)
    overrides = spec.overrides + point_overrides(point.values, base) + [f"train.seed={seed}"]
    config_hash = check_point({**point.values, "train.seed": str(seed)}, base).hash()
    existing = read_json(run_dir / "run.json")
    if existing is not None and existing["config_hash"] != config_hash:
        if is_locked(run_dir):
            raise ConfigError(f"{run_dir}: its config changed but it is running elsewhere; wait or use another --out")
        _move_aside(run_dir, existing["config_hash"])
        earlier = run_dir.with_name(f"{run_dir.name}.stale-{config_hash}")
        if earlier.exists():  # this exact config ran before: its results are valid again
            os.replace(earlier, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = check_point({**point.values, "train.seed": str(seed)}, base)
    atomic_write_json(run_dir / "run.json", {
        "point": point.values, "seed": seed, "preset": spec.preset, "overrides": overrides,
        "config_hash": config_hash, "config": cfg.to_dict(),
    })
    if not (run_dir / "status.json").exists():
        update_status(run_dir, state=PENDING, attempts=0)
    return RunRecord(run_dir, point, seed)


def _move_aside(run_dir: Path, config_hash: str) -> None:
    target = run_dir.with_name(f"{run_dir.name}.stale-{config_hash}")
    suffix = 2
    while target.exists():
        target = run_dir.with_name(f"{run_dir.name}.stale-{config_hash}-{suffix}")
        suffix += 1
    os.replace(run_dir, target)


def grid_runs(root: Path) -> tuple[dict[str, Any], list[RunRecord]]:
    """Re-read a grid folder (for `codetr table`): its manifest and every run of its points and seeds."""
    manifest = read_json(root / "manifest.json")
    if manifest is None:
        raise ConfigError(f"{root}: no manifest.json here; expected a folder written by `codetr ablate`")
    check_loss_convention(manifest, root / "manifest.json")
    missing = [key for key in ("points", "seeds", "params", "base") if key not in manifest]
    if missing:
        raise ConfigError(f"{root / 'manifest.json'}: lacks {', '.join(missing)}; expected a manifest written by "
                          "`codetr ablate`")
    runs = []
    for item in manifest["points"]:
        point = GridPoint.from_record(item)
        for seed in manifest["seeds"]:
            run_dir = root / run_name(point, seed)
            if run_dir.exists():
                runs.append(RunRecord(run_dir, point, seed))
    return manifest, runs


def finished_checkpoints(root: Path, seed: int | None = None) -> tuple[list[tuple[str, Path]], list[str]]:
    """Each point's checkpoint for analyses over a grid (e.g. `codetr iof-iob --grid`), in the manifest's order.

    Returns ([(point label, run/last.pt)] for the points whose run with `seed` (default: the grid's lowest,
    normally 0) is done and has its last.pt, [labels of the other points]). The label names the point, e.g.
    "method=h_detr", so curves of several methods read as the grid's table does.
    """
    root = Path(root)
    manifest, _ = grid_runs(root)
    seed = min(manifest["seeds"]) if seed is None else seed
    if seed not in manifest["seeds"]:
        raise ConfigError(f"{root}: no seed {seed} in this grid (its seeds: {', '.join(map(str, manifest['seeds']))})")
    found, missing = [], []
    for item in manifest["points"]:
        point = GridPoint.from_record(item)
        run_dir = root / run_name(point, seed)
        checkpoint = run_dir / "last.pt"
        if read_status(run_dir)["state"] == DONE and checkpoint.is_file():
            found.append((point.label(), checkpoint))
        else:
            missing.append(point.label())
    if not found:
        raise ConfigError(f"{root}: no finished run with seed {seed} (a done run with its last.pt); "
                          "run `codetr ablate` first")
    return found, missing
