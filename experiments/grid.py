"""A grid: a base configuration and a list of points (parameter values), each run once per seed.

Points come from the command line (`--param NAME --values A,B` flags form a cartesian product) or from
a YAML spec holding an explicit list (the paper's lambda table is a list, not a product):

    name: supp_table2_lambdas
    title: "Supplementary Table 2: lambda_1 and lambda_2"
    preset: co_tiny                  # optional, like --preset
    set: [optim.lr=2e-4]             # optional base overrides, like --set
    epochs: 1                        # optional, like --epochs
    max_iters: 100                   # optional, like --max-iters
    paper_preset: co_deformable_detr_k1_r50_1x   # optional: what --paper-setting trains ...
    paper_epochs: 36                 # ... and for how many full epochs
    seeds: [0]                       # optional, like --seeds
    baseline: {lambda1: 1, lambda2: 2}
    paper_metric: AP                 # what the `paper` numbers are
    points:                          # explicit points ...
      - {lambda1: 0.25, lambda2: 2, paper: 46.2}
      - {method: h_detr, paper: 48.4, paper_mem_mb: 15307, paper_gpu_h: 104}   # + the paper's training cost
    product:                         # ... or a product (not both)
      num_convs: [0, 1, 2]
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from codetr.config import Config
from codetr.errors import ConfigError
from experiments.params import check_point, format_value

# The short schedule of `codetr ablate` by default: 3 epochs capped at 128 iterations (one whole epoch of
# the generated data at batch 4), the lr drop after the second. co_tiny then reaches ~2-3 % AP, and the
# README's 4-point grid (two runs at a time on a 2-core CPU) takes about 20 minutes.
DEFAULT_EPOCHS = 3
DEFAULT_MAX_ITERS = 128


# A point's optional paper numbers beside `paper` (its metric): the training cost of the paper's cost table,
# shown beside the measured s/it and peak memory. Spec key -> table header.
PAPER_COSTS: dict[str, str] = {"paper_mem_mb": "paper MB", "paper_gpu_h": "paper GPU-h"}


@dataclass
class GridPoint:
    """One point: parameter name -> value text, plus the paper's numbers for it when a spec has them: `paper`
    (its metric) and the training cost (`paper_costs`, keys of PAPER_COSTS)."""

    values: dict[str, str]
    paper: float | None = None
    paper_costs: dict[str, float] = field(default_factory=dict)

    def label(self) -> str:
        return ", ".join(f"{name}={value}" for name, value in self.values.items()) or "base"

    def to_record(self) -> dict[str, Any]:
        """The manifest's entry; the cost keys only when known, so manifests without them keep their shape."""
        return {"values": self.values, "paper": self.paper, **self.paper_costs}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "GridPoint":
        costs = {key: record[key] for key in PAPER_COSTS if record.get(key) is not None}
        return cls(record["values"], record.get("paper"), costs)


@dataclass
class GridSpec:
    """Everything that defines a grid, before anything runs."""

    points: list[GridPoint]
    seeds: list[int] = field(default_factory=lambda: [0])
    preset: str = "co_tiny"
    overrides: list[str] = field(default_factory=list)  # base --set overrides (data root and schedule included)
    baseline: dict[str, str] | None = None  # the point the table's delta column is measured against
    name: str = "grid"
    title: str = ""
    paper_metric: str = "AP"

    @property
    def param_names(self) -> list[str]:
        names: list[str] = []
        for point in self.points:
            names.extend(n for n in point.values if n not in names)
        return names


def product_points(params: list[tuple[str, list[str]]]) -> list[GridPoint]:
    """The cartesian product of parameter value lists, first parameter slowest."""
    names = [name for name, _ in params]
    if len(set(names)) != len(names):
        raise ConfigError(f"--param given twice: {', '.join(names)}")
    return [GridPoint(dict(zip(names, combo))) for combo in itertools.product(*(values for _, values in params))]


def check_grid(spec: GridSpec, base: Config) -> None:
    """Fail before anything runs: every point must give a valid config and a distinct run folder."""
    if not spec.points:
        raise ConfigError("the grid has no points: give --param NAME --values A,B or --grid FILE.yaml")
    if not spec.seeds or len(set(spec.seeds)) != len(spec.seeds):
        raise ConfigError(f"--seeds {spec.seeds}: expected distinct integers, e.g. 0,1,2")
    seen: dict[str, str] = {}
    for point in spec.points:
        check_point(point.values, base)
        name = run_name(point, spec.seeds[0])
        if name in seen:
            raise ConfigError(f"grid points {seen[name]!r} and {point.label()!r} are the same run; remove one")
        seen[name] = point.label()
    if spec.baseline is not None and find_point(spec, spec.baseline) is None:
        raise ConfigError(f"baseline {spec.baseline} is not one of the grid's points")


def drop_duplicate_points(spec: GridSpec, base: Config) -> tuple[GridSpec, list[str]]:
    """Keep the first of points that resolve to the same config (`--values 1,1.0,1e0` is one run, not three).
    Returns the spec without the repeats and one note per dropped point."""
    kept, notes, first_of_hash = [], [], {}
    for point in spec.points:
        config_hash = check_point(point.values, base).hash()
        if config_hash in first_of_hash:
            notes.append(f"{point.label()} is the same config as {first_of_hash[config_hash].label()}: run once")
            continue
        first_of_hash[config_hash] = point
        kept.append(point)
    return dataclasses.replace(spec, points=kept), notes


def check_data(base: Config) -> None:
    """The data every run reads exists (a missing --data was found only inside each worker)."""
    from codetr.data.loaders import resolve_split

    for split in ("train", "val"):
        resolve_split(base.data, split)


def default_baseline(points: list[GridPoint], base: Config) -> dict[str, str]:
    """The point that leaves the base config unchanged (e.g. lambda1=1.0 on co_tiny), else the one-to-one baseline
    of a method grid (method=deformable_detr: the paper's comparisons are against it), else the first."""
    for point in points:
        if check_point(point.values, base).hash() == base.hash():
            return point.values
    for point in points:
        if point.values.get("method") == "deformable_detr":
            return point.values
    return points[0].values


def find_point(spec: GridSpec, values: dict[str, str]) -> GridPoint | None:
    for point in spec.points:
        if point.values == values:
            return point
    return None


def run_name(point: GridPoint, seed: int) -> str:
    """The run folder's name: deterministic in the point's values and seed, so a re-run finds it.

    e.g. {'lambda1': '0.25'} seed 0 -> 'lambda1=0.25__seed0'. Parameters are sorted, so the order they
    were written in does not matter. When characters unsafe in file names had to become '_', or the name
    is long, a short hash of the exact values is appended so two different points never share a folder.
    """
    pairs = [f"{name}={point.values[name]}" for name in sorted(point.values)]
    raw = "__".join(pairs + [f"seed{seed}"])
    safe = re.sub(r"[^A-Za-z0-9._=+-]", "_", raw)
    if safe != raw or len(safe) > 120:
        digest = hashlib.sha1(raw.encode()).hexdigest()[:8]
        safe = f"{safe[:100]}-{digest}"
    return safe


# ----------------------------------------------------------------------------------------------
# YAML specs
# ----------------------------------------------------------------------------------------------

SPEC_KEYS = {"name", "title", "preset", "set", "epochs", "max_iters", "seeds", "baseline", "paper_metric", "points",
             "product", "paper_preset", "paper_epochs"}


def load_spec(path: Path) -> tuple[GridSpec, dict[str, Any]]:
    """Read a YAML grid spec. Returns the spec and its schedule options (`epochs`, `max_iters`, and the
    paper's own setting `paper_preset`, `paper_epochs`), which the command line may override."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: grid file not found") from None
    except (IsADirectoryError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: expected a YAML grid file (UTF-8 text): {error}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(error).split())})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with `points:` or `product:`")
    unknown = set(data) - SPEC_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; valid: {', '.join(sorted(SPEC_KEYS))}")
    if ("points" in data) == ("product" in data):
        raise ConfigError(f"{path}: give exactly one of `points:` (an explicit list) or `product:`")
    if "points" in data:
        points = [_spec_point(item, path, i) for i, item in enumerate(data["points"] or [])]
    else:
        product = data["product"]
        if not isinstance(product, dict):
            raise ConfigError(f"{path}: `product:` must map parameter names to value lists")
        points = product_points([(name, [format_value(v) for v in _as_list(values)]) for name, values in product.items()])
    baseline = data.get("baseline")
    if baseline is not None and not isinstance(baseline, dict):
        raise ConfigError(f"{path}: `baseline:` must map parameter names to values, e.g. {{lambda1: 1}}")
    spec = GridSpec(
        points=points,
        seeds=[_integer(s, path, "seeds", "a list of integers such as [0, 1, 2]") for s in _as_list(data.get("seeds", [0]))],
        preset=str(data.get("preset", "co_tiny")),
        overrides=[str(item) for item in _as_list(data.get("set", []))],
        baseline={name: format_value(v) for name, v in baseline.items()} if baseline else None,
        name=str(data.get("name") or Path(path).stem),
        title=str(data.get("title", "")),
        paper_metric=str(data.get("paper_metric", "AP")),
    )
    schedule = {key: _integer(data[key], path, key, "an integer") for key in ("epochs", "max_iters", "paper_epochs")
                if key in data}
    if "paper_preset" in data:
        schedule["paper_preset"] = str(data["paper_preset"])
    return spec, schedule


def _spec_point(item: Any, path: Path, index: int) -> GridPoint:
    if not isinstance(item, dict):
        raise ConfigError(f"{path}: points[{index}] must be a mapping such as {{lambda1: 0.5, paper: 46.6}}")
    paper_keys = ("paper", *PAPER_COSTS)
    values = {name: format_value(value) for name, value in item.items() if name not in paper_keys}
    numbers: dict[str, float] = {}
    for key in paper_keys:
        number = item.get(key)
        if number is None:
            continue
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise ConfigError(f"{path}: points[{index}].{key}={number!r}: expected a number (the paper's value) "
                              f"or no `{key}:`")
        numbers[key] = float(number)
    paper = numbers.pop("paper", None)
    return GridPoint(values, paper=paper, paper_costs=numbers)


def _integer(value: Any, path: Path, key: str, expected: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{path}: {key}: {value!r} is not {expected}")
    return value


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]
