"""The `method` grid parameter, the method specs, paper cost columns and a grid's checkpoints (no training)."""
import dataclasses
import math
import re
from pathlib import Path

import pytest

from codetr.config import get_preset, resolved_method
from codetr.errors import ConfigError
from experiments.ablate import Schedule, grid_from_flags, resolve_base
from experiments.grid import GridPoint, GridSpec, check_grid, load_spec
from experiments.params import check_point, point_overrides
from experiments.store import DONE, FAILED, finished_checkpoints, grid_runs, open_grid, update_status
from experiments.table import load_table, render, to_csv

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def resolve(point: dict[str, str], preset: str = "co_tiny"):
    """The config of one grid point on `preset` (as `codetr ablate` builds it)."""
    spec, base = resolve_base(GridSpec(points=[GridPoint(point)], preset=preset), Schedule(), None)
    return check_point(point, base)


# -- the method parameter -----------------------------------------------------------------------------


@pytest.mark.parametrize("value, heads", [
    ("deformable_detr", []), ("h_detr", []), ("group_detr", []), ("co_detr", ["atss"]),
])
def test_each_method_value_sets_the_method_and_its_heads(value, heads):
    model = resolve({"method": value}).model  # co_tiny: K = 1 (ATSS)
    assert (model.method, resolved_method(model), model.aux.heads) == (value, value, heads)


def test_co_detr_keeps_the_bases_heads_else_takes_atss():
    assert resolve({"method": "co_detr"}, "co_tiny_pp").model.aux.heads == ["atss", "faster_rcnn"]
    assert resolve({"method": "co_detr"}, "tiny").model.aux.heads == ["atss"]  # K = 1, the paper's comparison
    assert resolve({"method": "deformable_detr"}, "tiny_pp").model.aux.heads == []
    base = get_preset("co_tiny")
    assert point_overrides({"method": "h_detr"}, base) == ["model.method=h_detr", "model.aux.heads=[]"]


@pytest.mark.parametrize("point", [
    {"method": "co_detr", "aux_heads": "atss+faster_rcnn"},
    {"aux_heads": "atss+faster_rcnn", "method": "co_detr"},  # the order of the point's keys does not matter
    {"method": "co_detr", "model.aux.heads": "[atss,faster_rcnn]"},
])
def test_the_points_own_heads_win(point):
    model = resolve(point).model
    assert (resolved_method(model), model.aux.heads) == ("co_detr", ["atss", "faster_rcnn"])


def test_heads_that_contradict_the_method_fail_validation():
    with pytest.raises(ConfigError, match=re.escape("model.aux.heads=['atss']: expected [] with model.method=h_detr")):
        resolve({"method": "h_detr", "aux_heads": "atss"})


def test_a_product_of_method_and_another_knob():
    spec, base = resolve_base(grid_from_flags([("method", "deformable_detr,co_detr"), ("num_queries", "20,30")]),
                              Schedule(), None)
    check_grid(spec, base)
    configs = [check_point(p.values, base).model for p in spec.points]
    assert [(m.method, m.aux.heads, m.num_queries) for m in configs] == [
        ("deformable_detr", [], 20), ("deformable_detr", [], 30), ("co_detr", ["atss"], 20), ("co_detr", ["atss"], 30)]


@pytest.mark.parametrize("value", ["dino_detr", "auto", "CO_DETR"])
def test_a_bad_method_fails_before_anything_runs(value, tmp_path):
    spec, base = resolve_base(grid_from_flags([("method", f"deformable_detr,{value}")]), Schedule(), None)
    with pytest.raises(ConfigError) as info:
        check_grid(spec, base)
    message = str(info.value)
    assert message == (f"grid point method={value}: method={value!r}: expected one of deformable_detr, h_detr, "
                       "group_detr, co_detr")


def test_a_bad_method_through_the_command_line(tmp_path):
    from typer.testing import CliRunner

    from cli import app

    out = tmp_path / "grid"
    result = CliRunner().invoke(app, ["ablate", "--param", "method", "--values", "h_detr,yolo", "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "method='yolo': expected one of deformable_detr, h_detr, group_detr, co_detr" in result.output
    assert not out.exists()  # nothing ran, nothing was written


# -- presets -------------------------------------------------------------------------------------------


def test_cpu_presets_scale_the_one_to_many_queries_and_the_method_presets():
    for name in ("tiny", "co_tiny", "tiny_pp", "co_tiny_pp"):
        cfg = get_preset(name)
        assert cfg.model.hybrid.num_queries == 5 * cfg.model.num_queries == 250, name
    hybrid = get_preset("h_deformable_detr_pp_r50_1x").model
    assert (resolved_method(hybrid), hybrid.num_queries, hybrid.hybrid.num_queries, hybrid.hybrid.repeats) == (
        "h_detr", 300, 1500, 6)
    assert hybrid.two_stage and hybrid.with_box_refine and hybrid.aux.heads == []
    group = get_preset("group_deformable_detr_r50_1x").model
    assert (resolved_method(group), group.group.num_groups, group.two_stage, group.aux.heads) == (
        "group_detr", 3, False, [])


# -- the specs -----------------------------------------------------------------------------------------


def _spec(name: str, paper_setting: bool = False):
    spec, schedule = load_spec(EXPERIMENTS / f"{name}.yaml")
    if paper_setting:  # what --paper-setting trains
        resolved, base = resolve_base(dataclasses.replace(spec, preset=schedule["paper_preset"]),
                                      Schedule(epochs=schedule["paper_epochs"], max_iters=0), None)
    else:
        resolved, base = resolve_base(spec, Schedule(), None)
    check_grid(resolved, base)
    return spec, schedule, [check_point(p.values, base).model for p in spec.points]


@pytest.mark.parametrize("paper_setting", [False, True])
def test_method_comparison_spec(paper_setting):
    """Plain Deformable-DETR, 12 epochs: main Table 2's K = 0 / 1 / 2; no number where the setting has none."""
    spec, schedule, models = _spec("method_comparison", paper_setting)
    assert (spec.preset, schedule["paper_preset"], schedule["paper_epochs"]) == (
        "co_tiny", "co_deformable_detr_k1_r50_1x", 12)
    assert [(resolved_method(m), m.aux.heads) for m in models] == [
        ("deformable_detr", []), ("group_detr", []), ("h_detr", []), ("co_detr", ["atss"]),
        ("co_detr", ["atss", "faster_rcnn"])]
    assert all(not m.two_stage and not m.with_box_refine for m in models)
    assert [p.paper for p in spec.points] == [37.1, None, None, 42.3, 42.9]
    assert models[2].hybrid.num_queries == 5 * models[2].num_queries and models[1].group.num_groups == 3
    assert spec.baseline == {"method": "deformable_detr"}


@pytest.mark.parametrize("paper_setting", [False, True])
def test_method_cost_spec(paper_setting):
    """Deformable-DETR++, 12 epochs: the paper's cost table, memory MB / GPU-hours / AP per row."""
    spec, schedule, models = _spec("method_cost", paper_setting)
    assert (spec.preset, schedule["paper_preset"], schedule["paper_epochs"]) == (
        "co_tiny_pp", "co_deformable_detr_r50_1x", 12)
    assert [(resolved_method(m), len(m.aux.heads)) for m in models] == [
        ("deformable_detr", 0), ("h_detr", 0), ("co_detr", 1), ("co_detr", 2), ("co_detr", 6)]
    assert all(m.two_stage and m.with_box_refine and m.mixed_selection and m.look_forward_twice for m in models)
    rows = [(p.paper, p.paper_costs["paper_mem_mb"], p.paper_costs["paper_gpu_h"]) for p in spec.points]
    assert rows == [(47.1, 12808, 70), (48.4, 15307, 104), (48.7, 13947, 86), (49.5, 14387, 120), (48.9, 19385, 280)]
    if paper_setting:
        assert (models[1].num_queries, models[1].hybrid.num_queries, models[1].hybrid.repeats) == (300, 1500, 6)


def test_bad_paper_cost_in_a_spec(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("points: [{method: h_detr, paper_mem_mb: lots}]\n")
    with pytest.raises(ConfigError, match=re.escape("points[0].paper_mem_mb='lots': expected a number")):
        load_spec(path)


# -- the table's paper cost columns --------------------------------------------------------------------


def _cost_grid(tmp_path, with_costs: bool = True):
    """method in {deformable_detr (baseline), h_detr, co_detr}; hand-set metrics and costs; co_detr failed."""
    spec = grid_from_flags([("method", "deformable_detr,h_detr,co_detr")])
    if with_costs:
        for point, (ap, mem, hours) in zip(spec.points, [(47.1, 12808, 70), (48.4, 15307, 104), (48.7, 13947, 86)]):
            point.paper, point.paper_costs = ap, {"paper_mem_mb": float(mem), "paper_gpu_h": float(hours)}
    spec, base = resolve_base(spec, Schedule(), None)
    for run, ap in zip(open_grid(tmp_path, spec, base), (0.02, 0.03, None)):
        if ap is None:
            update_status(run.directory, state=FAILED, error="TrainingError: non-finite loss")
        else:
            update_status(run.directory, state=DONE, metrics={"AP": ap}, sec_per_iter=1.25, peak_mem_mb=1500.0)
    return tmp_path


def test_table_shows_the_papers_cost_beside_ours(tmp_path):
    table = load_table(_cost_grid(tmp_path), ["AP"])
    markdown = render(table, "md")
    assert "| method | AP | ΔAP | paper AP | s/it | paper GPU-h | peak MB | paper MB | seeds |" in markdown
    assert "| deformable_detr * | 2.00 | 0 | 47.1 | 1.25 | 70 | 1500 | 12808 | 1/1 |" in markdown
    assert "| h_detr | 3.00 | +1.00 | 48.4 | 1.25 | 104 | 1500 | 15307 | 1/1 |" in markdown
    assert "| co_detr | - | - | 48.7 | - | 86 | - | 13947 | 0/1 |" in markdown
    assert "paper MB / GPU-h: the paper's training memory and GPU-hours" in markdown
    header = to_csv(table).splitlines()[0]
    assert header == ("method,AP_mean,AP_std,delta_AP,paper,paper_mem_mb,paper_gpu_h,sec_per_iter,peak_mem_mb,"
                      "seeds_done,seeds,is_baseline,errors")
    manifest, _ = grid_runs(tmp_path)
    assert manifest["points"][1] == {"values": {"method": "h_detr"}, "paper": 48.4, "paper_mem_mb": 15307.0,
                                     "paper_gpu_h": 104.0}


def test_table_without_paper_costs_is_unchanged(tmp_path):
    table = load_table(_cost_grid(tmp_path, with_costs=False), ["AP"])
    markdown = render(table, "md")
    assert "| method | AP | ΔAP | s/it | peak MB | seeds |" in markdown and "paper" not in markdown
    assert to_csv(table).splitlines()[0] == ("method,AP_mean,AP_std,delta_AP,paper,sec_per_iter,peak_mem_mb,"
                                             "seeds_done,seeds,is_baseline,errors")
    manifest, _ = grid_runs(tmp_path)
    assert manifest["points"][0] == {"values": {"method": "deformable_detr"}, "paper": None}
    assert math.isnan(table.points["paper_mem_mb"].iloc[0])


def test_rerunning_a_spec_adds_its_paper_costs_to_the_manifest(tmp_path):
    _cost_grid(tmp_path, with_costs=False)
    spec = grid_from_flags([("method", "h_detr")])
    spec.points[0].paper_costs = {"paper_gpu_h": 104.0}
    spec, base = resolve_base(spec, Schedule(), None)
    open_grid(tmp_path, spec, base)
    manifest, _ = grid_runs(tmp_path)
    assert manifest["points"][1]["paper_gpu_h"] == 104.0 and "paper_gpu_h" not in manifest["points"][0]


# -- a grid's checkpoints for the analyses ------------------------------------------------------------


def test_finished_checkpoints_are_labelled_by_point(tmp_path):
    spec = grid_from_flags([("method", "deformable_detr,h_detr,co_detr")], seeds=[0, 1])
    spec, base = resolve_base(spec, Schedule(), None)
    runs = {(r.point.values["method"], r.seed): r for r in open_grid(tmp_path, spec, base)}
    for key in (("deformable_detr", 0), ("co_detr", 0), ("h_detr", 1)):
        update_status(runs[key].directory, state=DONE)
        (runs[key].directory / "last.pt").write_bytes(b"")
    update_status(runs[("h_detr", 0)].directory, state=DONE)  # done but its checkpoint is gone
    found, missing = finished_checkpoints(tmp_path)
    assert found == [("method=deformable_detr", tmp_path / "method=deformable_detr__seed0" / "last.pt"),
                     ("method=co_detr", tmp_path / "method=co_detr__seed0" / "last.pt")]
    assert missing == ["method=h_detr"]
    assert [label for label, _ in finished_checkpoints(tmp_path, seed=1)[0]] == ["method=h_detr"]
    with pytest.raises(ConfigError, match="no seed 7 in this grid"):
        finished_checkpoints(tmp_path, seed=7)


def test_a_grid_without_finished_runs_is_one_error(tmp_path):
    spec, base = resolve_base(grid_from_flags([("method", "h_detr")]), Schedule(), None)
    open_grid(tmp_path, spec, base)
    with pytest.raises(ConfigError, match="no finished run with seed 0"):
        finished_checkpoints(tmp_path)
    with pytest.raises(ConfigError, match="no manifest.json here"):
        finished_checkpoints(tmp_path / "elsewhere")


def test_iof_iob_labels_must_match_the_checkpoints(tmp_path):
    from analysis.iof_iob import run_iof_iob

    paths = [tmp_path / "a.pt", tmp_path / "b.pt"]
    for path in paths:
        path.write_bytes(b"")
    for labels in (["method=h_detr"], ["x", "x"]):
        with pytest.raises(ConfigError, match="expected 2 distinct names, one per checkpoint"):
            run_iof_iob(paths, labels=labels, progress=False)
