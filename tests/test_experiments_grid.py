"""Grid expansion, parameter validation and table rendering (no training: fixture metrics)."""
import json
import math

import pytest

from codetr.config import get_preset
from codetr.errors import ConfigError
from experiments.ablate import Schedule, default_baseline, grid_from_flags, parse_baseline, resolve_base
from experiments.grid import GridPoint, GridSpec, check_grid, load_spec, product_points, run_name
from experiments.params import override_text, split_values
from experiments.store import DONE, FAILED, open_grid, update_status
from experiments.table import load_table, render, to_csv

# -- expansion ---------------------------------------------------------------------------------


def test_product_of_two_params_first_slowest():
    points = product_points([("lambda1", ["0.5", "1"]), ("num_convs", ["0", "1", "2"])])
    assert [p.values for p in points] == [
        {"lambda1": a, "num_convs": b} for a in ("0.5", "1") for b in ("0", "1", "2")
    ]


def test_split_values_respects_brackets():
    assert split_values("0.25,0.5,1,2") == ["0.25", "0.5", "1", "2"]
    assert split_values("[224,256],[320]") == ["[224,256]", "[320]"]
    with pytest.raises(ConfigError, match="comma-separated"):
        split_values("1,,2")


def test_short_names_and_heads_syntax():
    cfg = get_preset("co_tiny")
    assert override_text("lambda1", "0.5", cfg) == "model.aux.lambda1=0.5"
    assert override_text("aux_heads", "atss+fcos", cfg) == "model.aux.heads=[atss,fcos]"
    assert override_text("aux_heads", "none", cfg) == "model.aux.heads=[]"
    assert override_text("optim.lr", "1e-4", cfg) == "optim.lr=1e-4"


def test_explicit_points_and_seeds_from_yaml(tmp_path):
    spec_file = tmp_path / "lambdas.yaml"
    spec_file.write_text(
        "name: lam\nseeds: [0, 1, 2]\nbaseline: {lambda1: 1, lambda2: 2}\nmax_iters: 7\n"
        "points:\n  - {lambda1: 0.25, lambda2: 2, paper: 46.2}\n  - {lambda1: 1, lambda2: 2, paper: 46.8}\n"
        "  - {lambda1: 1, lambda2: 4}\n"
    )
    spec, schedule = load_spec(spec_file)
    assert [p.values for p in spec.points] == [
        {"lambda1": "0.25", "lambda2": "2"}, {"lambda1": "1", "lambda2": "2"}, {"lambda1": "1", "lambda2": "4"}]
    assert [p.paper for p in spec.points] == [46.2, 46.8, None]
    assert spec.seeds == [0, 1, 2] and schedule == {"max_iters": 7}
    spec, base = resolve_base(spec, Schedule(), None)
    runs = open_grid(tmp_path / "grid", spec, base)
    assert len(runs) == 9  # 3 points x 3 seeds
    assert runs[0].name == "lambda1=0.25__lambda2=2__seed0" and runs[-1].name == "lambda1=1__lambda2=4__seed2"
    assert json.loads((runs[0].directory / "run.json").read_text())["config"]["model"]["aux"]["lambda1"] == 0.25


def test_repo_specs_are_valid():
    from pathlib import Path

    specs = sorted((Path(__file__).resolve().parents[1] / "experiments").glob("*.yaml"))
    assert {s.stem for s in specs} >= {"supp_table1_num_convs", "supp_table2_lambdas", "k_ablation"}
    for path in specs:
        spec, _ = load_spec(path)
        spec, base = resolve_base(spec, Schedule(), None)
        check_grid(spec, base)
    lambdas, _ = load_spec(specs[[s.stem for s in specs].index("supp_table2_lambdas")])
    assert len(lambdas.points) == 7 and sum(p.paper for p in lambdas.points) == pytest.approx(324.6)


def test_run_names_are_deterministic_and_safe():
    point = GridPoint({"model.aux.heads": "[atss,fcos]", "lr": "1e-4"})
    assert run_name(point, 3) == run_name(GridPoint(dict(point.values)), 3) == "model.aux.heads=_atss_fcos___lr=1e-4__seed3"


def test_default_baseline_is_the_unchanged_point():
    spec, base = resolve_base(grid_from_flags([("lambda1", "0.25,1,2")]), Schedule(), None)
    assert default_baseline(spec, base) == {"lambda1": "1"}  # co_tiny's lambda1 is 1.0
    assert parse_baseline("lambda1=1,lambda2=2") == {"lambda1": "1", "lambda2": "2"}


# -- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("params, message", [
    ([("lamda1", "1,2")], "unknown grid parameter 'lamda1'; valid: the short names lambda1, lambda2"),
    ([("lambda1", "0.5,abc")], "lambda1=abc: model.aux.lambda1='abc': expected a number"),
    ([("aux_heads", "atss+yolo")], "model.aux.heads"),
    ([("num_convs", "1,9")], "num_convs=9: model.aux.num_convs=9: expected 0..5"),
])
def test_bad_names_and_values_fail_before_running(params, message, tmp_path):
    spec, base = resolve_base(grid_from_flags(params), Schedule(), None)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_grid(spec, base)


def test_duplicate_points_and_seeds_are_rejected():
    spec, base = resolve_base(GridSpec(points=[GridPoint({"lambda1": "1"}), GridPoint({"lambda1": "1"})]),
                              Schedule(), None)
    with pytest.raises(ConfigError, match="same run"):
        check_grid(spec, base)
    spec.points, spec.seeds = spec.points[:1], [0, 0]
    with pytest.raises(ConfigError, match="distinct"):
        check_grid(spec, base)


def test_changed_base_is_refused_unless_allowed(tmp_path):
    spec, base = resolve_base(grid_from_flags([("lambda1", "1")]), Schedule(), None)
    open_grid(tmp_path, spec, base)
    spec2, base2 = resolve_base(grid_from_flags([("lambda1", "1")], overrides=["optim.lr=1e-3"]), Schedule(), None)
    with pytest.raises(ConfigError, match="different base config"):
        open_grid(tmp_path, spec2, base2)
    (tmp_path / "lambda1=1__seed0" / "metrics.json").write_text("{}")  # a result of the old base
    open_grid(tmp_path, spec2, base2, allow_changed_base=True)
    stale = list(tmp_path.glob("lambda1=1__seed0.stale-*"))
    assert len(stale) == 1 and (stale[0] / "metrics.json").exists()  # kept aside, never deleted


# -- tables from fixture metrics -------------------------------------------------------------------


def _fixture_grid(tmp_path):
    """lambda1 in {0.5, 1 (baseline), 2} x seeds {0, 1}; hand-set metrics; lambda1=2 seed 1 failed."""
    spec = grid_from_flags([("lambda1", "0.5,1,2")], seeds=[0, 1])
    spec.points[0].paper, spec.points[1].paper = 46.6, 46.8
    spec, base = resolve_base(spec, Schedule(), None)
    spec.baseline = {"lambda1": "1"}
    runs = open_grid(tmp_path, spec, base)
    ap = {("0.5", 0): 0.40, ("0.5", 1): 0.42, ("1", 0): 0.45, ("1", 1): 0.47, ("2", 0): 0.30}
    for run in runs:
        key = (run.point.values["lambda1"], run.seed)
        if key in ap:
            metrics = {name: ap[key] for name in ("AP", "AP50", "AP75", "APs", "APm", "APl")}
            metrics["AP50"] = ap[key] + 0.2
            update_status(run.directory, state=DONE, metrics=metrics, sec_per_iter=1.5 + run.seed, peak_mem_mb=1000.0)
        else:
            update_status(run.directory, state=FAILED, error="TrainingError: non-finite loss")
    return tmp_path


def test_table_mean_std_delta_by_hand(tmp_path):
    table = load_table(_fixture_grid(tmp_path), ["AP", "AP50"])
    rows = table.points.set_index("lambda1")
    assert rows.loc["0.5", "AP_mean"] == pytest.approx(0.41, abs=1e-12)
    assert rows.loc["0.5", "AP_std"] == pytest.approx(math.sqrt(2) * 0.01, abs=1e-12)  # sample std of 0.40, 0.42
    assert rows.loc["2", "AP_mean"] == pytest.approx(0.30) and math.isnan(rows.loc["2", "AP_std"])
    assert rows.loc["0.5", "delta_AP"] == pytest.approx(0.41 - 0.46, abs=1e-12)
    assert rows.loc["1", "sec_per_iter"] == pytest.approx(2.0)
    assert list(rows["seeds_done"]) == [2, 2, 1]

    markdown = render(table, "md")
    assert "| lambda1 | AP | AP50 | ΔAP | paper AP | s/it | peak MB | seeds |" in markdown
    assert "| 0.5 | 41.00 ± 1.41 | 61.00 ± 1.41 | -5.00 | 46.6 | 2.00 | 1000 | 2/2 |" in markdown
    assert "| 1 * | 46.00 ± 1.41 | 66.00 ± 1.41 | 0 | 46.8 |" in markdown
    assert "| 2 | 30.00 | 50.00 | -16.00 | - | 1.50 | 1000 | 1/2 |" in markdown
    assert "failed at lambda1=2: TrainingError: non-finite loss" in markdown

    latex = render(table, "latex")
    assert r"0.5 & 41.00 $\pm$ 1.41 & 61.00 $\pm$ 1.41 & -5.00 & 46.6 & 2.00 & 1000 & 2/2 \\" in latex
    assert latex.startswith(r"\begin{tabular}{lrrrrrrr}") and r"$\Delta$AP" in latex

    lines = to_csv(table).splitlines()
    assert lines[0].startswith("lambda1,AP_mean,AP_std,AP50_mean,AP50_std,delta_AP,paper")
    first = lines[1].split(",")
    assert first[0] == "0.5" and float(first[1]) == pytest.approx(0.41, abs=1e-12)
    assert float(first[2]) == pytest.approx(0.01 * math.sqrt(2), abs=1e-12)


def test_table_command_writes_files_and_rejects_bad_metric(tmp_path):
    from typer.testing import CliRunner

    from cli import app

    grid = _fixture_grid(tmp_path)
    result = CliRunner().invoke(app, ["table", str(grid), "--format", "csv", "--metrics", "AP,APs"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0].startswith("lambda1,AP_mean,AP_std,APs_mean")
    for name in ("results.csv", "results.md", "results.tex", "plot_AP.png", "plot_APs.png"):
        assert (grid / name).stat().st_size > 0
    bad = CliRunner().invoke(app, ["table", str(grid), "--metrics", "AP,mAP"])
    assert bad.exit_code == 2 and "unknown mAP; valid: AP, AP50" in bad.output
    missing = CliRunner().invoke(app, ["table", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "no manifest.json here" in missing.output
