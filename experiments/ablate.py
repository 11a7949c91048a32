"""`codetr ablate`: build a grid, check it, run what is missing, and tabulate the results.

    spec = grid_from_flags([("lambda1", "0.25,0.5,1,2")])          # or load_spec("experiments/x.yaml")
    table = run_grid(spec, out=Path("runs/ablate-lambda1"), schedule=Schedule())
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from codetr.config import Config, apply_overrides, epochs_overrides, get_preset
from codetr.errors import ConfigError
from codetr.io import check_writable_dir
from experiments.grid import (DEFAULT_EPOCHS, DEFAULT_MAX_ITERS, GridSpec, check_data, check_grid,
                              drop_duplicate_points, product_points)
from experiments.launchers import LaunchOptions, check_options, launch, runs_to_execute
from experiments.params import split_values
from experiments.store import DONE, FAILED, GridLock, open_grid
from experiments.table import GridTable, load_table, write_results


@dataclass
class Schedule:
    """The training schedule of every run of a grid (part of the base config).

    The default is short (3 epochs capped at 128 iterations) so a 4-point grid finishes in about 20
    minutes on a 2-core CPU; `max_iters=0` trains full epochs. Runs are evaluated once, at the end. Grids
    keep only last.pt per run (no epoch_XXX.pt copies), checkpointed every 25 iterations (1000 on full
    epochs) so an interrupted run loses little.
    """

    epochs: int = DEFAULT_EPOCHS
    max_iters: int = DEFAULT_MAX_ITERS
    checkpoint_every: int | None = None  # None: 25 on a capped schedule, 1000 on full epochs

    def overrides(self, preset: str) -> list[str]:
        every = self.checkpoint_every if self.checkpoint_every is not None else (25 if self.max_iters > 0 else 1000)
        return [*epochs_overrides(preset, self.epochs), f"train.max_iters_per_epoch={self.max_iters}",
                f"train.checkpoint_every={every}", "train.keep_epoch_checkpoints=false", "train.eval_every=0"]


def grid_from_flags(params: list[tuple[str, str]], seeds: list[int] | None = None, preset: str = "co_tiny",
                    overrides: list[str] | None = None) -> GridSpec:
    """`--param NAME --values A,B` pairs -> a product grid."""
    points = product_points([(param, split_values(values)) for param, values in params])
    names = [param for param, _ in params]
    return GridSpec(points=points, seeds=seeds or [0], preset=preset, overrides=list(overrides or []),
                    name="ablate-" + "-".join(n.replace(".", "_") for n in names), title=f"Ablation: {' x '.join(names)}")


def parse_seeds(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1,2") from None


def parse_baseline(text: str) -> dict[str, str]:
    """`--baseline lambda1=1,lambda2=2` -> {'lambda1': '1', 'lambda2': '2'}."""
    pairs = [part.split("=", 1) for part in split_values(text)]
    if any(len(pair) != 2 for pair in pairs):
        raise ConfigError(f"--baseline {text!r}: expected NAME=VALUE[,NAME=VALUE], e.g. lambda1=1")
    return {name.strip(): value.strip() for name, value in pairs}


def resolve_base(spec: GridSpec, schedule: Schedule, data: Path | None) -> tuple[GridSpec, Config]:
    """The config every point starts from: preset, data, schedule, then the grid's own --set overrides.
    Returns a copy of the spec whose overrides are all of those (the manifest records them)."""
    extra = [f"data.root={data}"] if data is not None else []
    spec = dataclasses.replace(spec, overrides=extra + schedule.overrides(spec.preset) + spec.overrides)
    return spec, apply_overrides(get_preset(spec.preset), spec.overrides)


def run_grid(spec: GridSpec, out: Path, schedule: Schedule | None = None, data: Path | None = None,
             options: LaunchOptions | None = None, retry_failed: bool = False, allow_changed_base: bool = False,
             metrics: list[str] | None = None, show_progress: bool = True, log=print) -> GridTable:
    """Run every missing run of the grid into `out` and return its table (also written to `out`).

    Everything is checked before anything runs. Finished runs are skipped, interrupted ones resume
    from their last checkpoint, failed ones are retried only with `retry_failed`.
    """
    options = options or LaunchOptions()
    check_options(options)
    spec, base = resolve_base(spec, schedule or Schedule(), data)
    check_grid(spec, base)
    spec, repeats = drop_duplicate_points(spec, base)
    check_data(base)
    out = check_writable_dir(out, "--out")
    for note in repeats:
        log(note)
    out.mkdir(parents=True, exist_ok=True)
    with GridLock(out):
        runs = open_grid(out, spec, base, allow_changed_base=allow_changed_base)
        todo, skipped = runs_to_execute(runs, retry_failed)
        skipped_text = ", ".join(f"{n} {state}" for state, n in skipped.items() if n)
        log(f"grid {out}: {len(runs)} runs ({len(spec.points)} points x {len(spec.seeds)} seeds); "
            f"{len(todo)} to run" + (f", skipping {skipped_text}" if skipped_text else "")
            + (" (pass --retry-failed to re-run failed runs)" if skipped["failed"] else ""))
        launch(todo, options, out, show_progress=show_progress)
        table = load_table(out, metrics)
        write_results(out, table)
    # every run of the grid counts, not only those this process ran: one skipped as running elsewhere is not
    # finished either (interrupted by a signal, or still executing in another process)
    table.unfinished = [run.name for run in runs if run.status()["state"] not in (DONE, FAILED)]
    return table
