"""Grid expansion, parameter validation and table rendering (no training: fixture metrics)."""
import json
import math
import re

import pytest

from codetr.config import get_preset
from codetr.errors import ConfigError
from experiments.ablate import Schedule, grid_from_flags, parse_baseline, resolve_base, run_grid
from experiments.grid import GridPoint, GridSpec, check_grid, default_baseline, load_spec, product_points, run_name
from experiments.params import override_text, split_values
from experiments.store import DONE, FAILED, GridLock, LockBusy, RunLock, grid_runs, open_grid, read_status, update_status
from experiments.table import load_table, render, to_csv, write_results

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
    # the paper's numbers, point by point (../shared/reference/codetr-facts.md)
    expected = {
        "supp_table1_num_convs": [({"num_convs": str(n)}, ap) for n, ap in
                                  enumerate([41.8, 42.3, 41.9, 42.1, 42.3, 42.0])],
        "supp_table2_lambdas": [({"lambda1": l1, "lambda2": l2}, ap) for l1, l2, ap in
                                [("0.25", "2", 46.2), ("0.5", "2", 46.6), ("1", "2", 46.8), ("2", "2", 46.1),
                                 ("1", "1", 46.1), ("1", "3", 46.5), ("1", "4", 46.3)]],
        "k_ablation": [({"aux_heads": "none"}, 37.1), ({"aux_heads": "atss"}, 42.3),
                       ({"aux_heads": "atss+faster_rcnn"}, 42.9), ({"aux_heads": "atss+faster_rcnn+paa"}, None),
                       ({"aux_heads": "atss+faster_rcnn+paa+retinanet+fcos+gfl"}, None)],
    }
    for name, points in expected.items():
        spec, _ = load_spec(specs[[s.stem for s in specs].index(name)])
        assert [(p.values, p.paper) for p in spec.points] == points, name


@pytest.mark.parametrize("name, epochs", [("supp_table1_num_convs", 12), ("supp_table2_lambdas", 36), ("k_ablation", 12)])
def test_repo_specs_use_the_papers_ablation_setting(name, epochs):
    """Sec. 4.4 / supplementary: plain Deformable-DETR R50 + K = 1 (ATSS), at the table's epochs; the
    default run is its CPU analogue."""
    from pathlib import Path

    from codetr.config import get_preset

    spec, schedule = load_spec(Path(__file__).resolve().parents[1] / "experiments" / f"{name}.yaml")
    assert (schedule["paper_preset"], schedule["paper_epochs"]) == ("co_deformable_detr_k1_r50_1x", epochs)
    for preset in (schedule["paper_preset"], spec.preset):
        model = get_preset(preset).model
        assert not model.two_stage and not model.with_box_refine and model.aux.heads == ["atss"], preset
    assert get_preset(schedule["paper_preset"]).model.backbone.depth == 50


def test_a_lambda_grid_of_the_old_convention_is_refused(tmp_path):
    """Grids written before Eq. 6 (no loss_convention in the manifest) had lambda1 on the auxiliary heads."""
    import json

    spec, base = resolve_base(grid_from_flags([("lambda1", "0.5,1")]), Schedule(), None)
    open_grid(tmp_path, spec, base)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["loss_convention"] == "eq6"
    del manifest["loss_convention"]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    for action in (lambda: open_grid(tmp_path, spec, base, allow_changed_base=True), lambda: load_table(tmp_path, ["AP"])):
        with pytest.raises(ConfigError, match="lambda1 now weighs the positive queries .* run the grid again"):
            action()


def test_run_names_are_canonical_safe_and_distinct():
    a = GridPoint({"lambda1": "1", "lambda2": "2"})
    assert run_name(a, 0) == run_name(GridPoint({"lambda2": "2", "lambda1": "1"}), 0) == "lambda1=1__lambda2=2__seed0"
    # unsafe characters become '_' and a hash of the exact values keeps different points apart
    slash, underscore = (run_name(GridPoint({"model.backbone.pretrained": p}), 0) for p in ("/a/b.pth", "/a_b.pth"))
    assert slash.startswith("model.backbone.pretrained=_a_b.pth__seed0-") and slash != underscore
    long = GridPoint({f"model.transformer.key{i}": "x" * 30 for i in range(6)})
    assert len(run_name(long, 0)) <= 110
    spec, base = resolve_base(GridSpec(points=[a, GridPoint({"lambda2": "2", "lambda1": "1"})]), Schedule(), None)
    with pytest.raises(ConfigError, match="same run"):
        check_grid(spec, base)


def test_default_baseline_is_the_unchanged_point():
    spec, base = resolve_base(grid_from_flags([("lambda1", "0.25,1,2")]), Schedule(), None)
    assert default_baseline(spec.points, base) == {"lambda1": "1"}  # co_tiny's lambda1 is 1.0
    assert parse_baseline("lambda1=1,lambda2=2") == {"lambda1": "1", "lambda2": "2"}



def test_a_method_grid_defaults_to_the_one_to_one_baseline_whatever_the_order():
    spec, base = resolve_base(grid_from_flags([("method", "co_detr,h_detr,deformable_detr")]), Schedule(), None)
    assert default_baseline(spec.points, base) == {"method": "deformable_detr"}


# -- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("params, message", [
    ([("lamda1", "1,2")], "unknown grid parameter 'lamda1' (did you mean lambda1, lambda2?); valid: the short names lambda1, lambda2"),
    ([("model.aux.num_conv", "1")], "(did you mean model.aux.num_convs"),
    ([("lambda1", "0.5,abc")], "lambda1=abc: model.aux.lambda1='abc': expected a number"),
    ([("aux_heads", "atss+yolo")], "model.aux.heads"),
    ([("num_convs", "1,9")], "num_convs=9: model.aux.num_convs=9: expected 0..5"),
])
def test_bad_names_and_values_fail_before_running(params, message, tmp_path):
    spec, base = resolve_base(grid_from_flags(params), Schedule(), None)
    with pytest.raises(ConfigError, match=re.escape(message)):
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
    # back to the first base: its run (with its result) returns; the second base's run is kept aside
    open_grid(tmp_path, spec, base, allow_changed_base=True)
    assert (tmp_path / "lambda1=1__seed0" / "metrics.json").exists()
    open_grid(tmp_path, spec2, base2, allow_changed_base=True)
    open_grid(tmp_path, spec, base, allow_changed_base=True)
    assert (tmp_path / "lambda1=1__seed0" / "metrics.json").exists()
    assert len(list(tmp_path.glob("lambda1=1__seed0.stale-*"))) == 1


def test_epochs_knob_moves_the_lr_drop_with_the_schedule():
    """co_tiny drops after 10 of 12 epochs: 36 epochs drop after 30, 6 after 5; the R50 1x recipe (11 of 12)
    becomes 33 of 36; an explicit lr_drop_epochs in the point wins; the default 3-epoch schedule drops after
    the second (10 * 3 // 12 = 2)."""
    from experiments.params import check_point

    spec, base = resolve_base(grid_from_flags([("epochs", "36,6")]), Schedule(), None)
    assert (base.optim.epochs, base.optim.lr_drop_epochs) == (3, (2,))
    got = [check_point(p.values, base).optim for p in spec.points]
    assert [(o.epochs, o.lr_drop_epochs) for o in got] == [(36, (30,)), (6, (5,))]
    pinned = check_point({"epochs": "36", "optim.lr_drop_epochs": "[27,33]"}, base).optim
    assert pinned.lr_drop_epochs == (27, 33)
    # a drop pinned in the grid's base (--set) stays; the point equal to the base is the base
    spec, base = resolve_base(grid_from_flags([("epochs", "6,12")], overrides=["optim.lr_drop_epochs=[2]"]),
                              Schedule(epochs=6), None)
    assert [check_point(p.values, base).optim.lr_drop_epochs for p in spec.points] == [(2,), (2,)]
    assert check_point(spec.points[0].values, base).hash() == base.hash()
    _, r50 = resolve_base(GridSpec(points=[GridPoint({})], preset="co_deformable_detr_r50_1x"), Schedule(epochs=36), None)
    assert (r50.optim.epochs, r50.optim.lr_drop_epochs) == (36, (33,))


def test_changed_base_rebases_the_earlier_points_too(tmp_path):
    """A changed base run on one point must not leave the other points' old-base results in the table."""
    spec, base = resolve_base(grid_from_flags([("lambda1", "0.5,1")]), Schedule(), None)
    for run in open_grid(tmp_path, spec, base):
        update_status(run.directory, state=DONE, metrics={"AP": 0.1})
    spec2, base2 = resolve_base(grid_from_flags([("lambda1", "0.5")], overrides=["optim.lr=1e-3"]), Schedule(), None)
    open_grid(tmp_path, spec2, base2, allow_changed_base=True)
    manifest, runs = grid_runs(tmp_path)
    assert [r.name for r in runs] == ["lambda1=0.5__seed0", "lambda1=1__seed0"]
    for run in runs:  # both re-based: pending, with the new base's config; the old results kept aside
        assert read_status(run.directory)["state"] == "pending"
        assert json.loads((run.directory / "run.json").read_text())["config"]["optim"]["lr"] == 1e-3
    assert len(list(tmp_path.glob("lambda1=1__seed0.stale-*"))) == 1


def test_a_worker_killed_by_a_signal_is_interrupted_not_failed(tmp_path):
    from experiments.launchers import _record_exit

    spec, base = resolve_base(grid_from_flags([("lambda1", "0.5,1")]), Schedule(), None)
    killed, crashed = open_grid(tmp_path, spec, base)
    for run in (killed, crashed):
        update_status(run.directory, state="running")
    _record_exit(killed, -9)  # SIGKILL, e.g. the out-of-memory killer: resumable
    _record_exit(crashed, 1)  # died without recording why: failed
    assert read_status(killed.directory)["state"] == "pending"
    assert "signal 9" in read_status(killed.directory)["error"]
    assert read_status(crashed.directory)["state"] == FAILED
    update_status(killed.directory, state="running", attempts=3)  # killed in every one of 3 attempts
    _record_exit(killed, -9)
    assert read_status(killed.directory)["state"] == FAILED
    assert "in 3 attempts" in read_status(killed.directory)["error"]


def test_extending_a_grid_keeps_its_points_baseline_and_columns(tmp_path):
    spec, base = resolve_base(grid_from_flags([("lambda1", "0.25,1")]), Schedule(), None)
    open_grid(tmp_path, spec, base)
    spec, base = resolve_base(grid_from_flags([("lambda1", "4")]), Schedule(), None)
    open_grid(tmp_path, spec, base)
    spec, base = resolve_base(grid_from_flags([("lambda2", "3")]), Schedule(), None)
    open_grid(tmp_path, spec, base)
    manifest, runs = grid_runs(tmp_path)
    assert manifest["baseline"] == {"lambda1": "1"}  # chosen first, among the merged points
    assert manifest["params"] == ["lambda1", "lambda2"]
    assert [r.name for r in runs] == ["lambda1=0.25__seed0", "lambda1=1__seed0", "lambda1=4__seed0", "lambda2=3__seed0"]


def test_a_second_grid_process_on_the_same_folder_is_refused(tmp_path):
    spec = grid_from_flags([("lambda1", "1")])
    tmp_path.mkdir(exist_ok=True)
    with GridLock(tmp_path):  # another `codetr ablate` holds the folder
        with pytest.raises(LockBusy, match="is being run by another `codetr ablate` process"):
            run_grid(spec, tmp_path, show_progress=False, log=lambda text: None)


def test_worker_leaves_a_run_executing_elsewhere_untouched(tmp_path):
    from experiments.worker import LOCK_BUSY_EXIT, main

    spec, base = resolve_base(grid_from_flags([("lambda1", "1")]), Schedule(), None)
    run = open_grid(tmp_path, spec, base)[0]
    with RunLock(run.directory, retry_s=0):
        assert main([str(run.directory)]) == LOCK_BUSY_EXIT
    assert read_status(run.directory)["state"] == "pending"


def test_worker_command_lines():
    from experiments.launchers import LaunchOptions, SlurmRun, worker_command

    run = type("Run", (), {"directory": "G/r"})()
    single = worker_command(run, LaunchOptions(device="cuda"))
    assert single[1:6] == ["-m", "experiments.worker", "G/r", "--device", "cuda"] and "--grid-pid" in single
    ddp = worker_command(run, LaunchOptions(gpus_per_run=4))
    assert ddp[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4"]
    assert ddp[ddp.index("--device") + 1] == ""  # each rank picks cuda:LOCAL_RANK
    resubmission = SlurmRun().checkpoint("G/r", "cuda")
    assert resubmission.args == ("G/r", "cuda") and isinstance(resubmission.function, SlurmRun)


@pytest.mark.parametrize("text, message", [
    ("seeds: 0,1\npoints: [{lambda1: 1}]\n", "seeds: '0,1' is not a list of integers"),
    ("epochs: one\npoints: [{lambda1: 1}]\n", "epochs: 'one' is not an integer"),
    ("points: [{lambda1: 1, paper: n/a}]\n", "points[0].paper='n/a': expected a number"),
    ("points: [{lambda1: 1}]\nproduct: {lambda2: [1]}\n", "exactly one of `points:`"),
    ("colour: red\npoints: []\n", "unknown key(s) colour"),
])
def test_bad_yaml_specs_give_one_line(tmp_path, text, message):
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_spec(path)


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
            metrics["APs"] = -1.0 if key == ("2", 0) else metrics["APs"]  # COCOeval: no small objects
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
    assert rows.loc["2", "delta_AP"] == pytest.approx(0.30 - 0.45, abs=1e-12)  # over seed 0, the common one
    assert rows.loc["1", "sec_per_iter"] == pytest.approx(2.0)
    assert list(rows["seeds_done"]) == [2, 2, 1]

    markdown = render(table, "md")
    assert "| lambda1 | AP | AP50 | ΔAP | paper AP | s/it | peak MB | seeds |" in markdown
    assert "| 0.5 | 41.00 ± 1.41 | 61.00 ± 1.41 | -5.00 | 46.6 | 2.00 | 1000 | 2/2 |" in markdown
    assert "| 1 * | 46.00 ± 1.41 | 66.00 ± 1.41 | 0 | 46.8 |" in markdown
    assert "| 2 | 30.00 | 50.00 | -15.00 | - | 1.50 | 1000 | 1/2 |" in markdown
    assert "failed at lambda1=2: TrainingError: non-finite loss" in markdown

    latex = render(table, "latex")
    assert "\n{}0.5 & 41.00 $\\pm$ 1.41 & 61.00 $\\pm$ 1.41 & -5.00 & 46.6 & 2.00 & 1000 & 2/2 \\\\\n" in latex
    assert latex.startswith(r"\begin{tabular}{lrrrrrrr}") and r"$\Delta$AP" in latex

    lines = to_csv(table).splitlines()
    assert lines[0].startswith("lambda1,AP_mean,AP_std,AP50_mean,AP50_std,delta_AP,paper")
    assert math.isnan(load_table(tmp_path, ["APs"]).points.set_index("lambda1").loc["2", "APs_mean"])  # -1: no value
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


def test_terminal_table_shows_list_values(tmp_path):
    from rich.console import Console

    from experiments.table import rich_table

    spec, base = resolve_base(grid_from_flags([("model.aux.heads", "[atss],[atss,fcos]")]), Schedule(), None)
    for run in open_grid(tmp_path, spec, base):
        update_status(run.directory, state=DONE, metrics={"AP": 0.1})
    console = Console(width=120, record=True)
    console.print(rich_table(load_table(tmp_path, ["AP"])))
    text = console.export_text()
    assert "[atss,fcos]" in text and "[atss]" in text
    # LaTeX: "{}" keeps a leading "[" from being read as \\[...]; special characters are escaped
    latex = render(load_table(tmp_path, ["AP"]), "latex")
    assert "\n{}[atss] * & 10.00 &" in latex and "\n{}[atss,fcos] & 10.00 &" in latex
    from experiments.table import _latex_escape
    assert _latex_escape("a_{b}^$~%&#\\") == r"a\_\{b\}\textasciicircum{}\$\textasciitilde{}\%\&\#\textbackslash{}"


def test_plot_series_for_a_product_of_two_params(tmp_path):
    """A full product with a numeric first parameter plots one line per value of the second; an explicit
    list of pairs (the paper's lambda table) and a single parameter plot one line."""
    from experiments.plots import product_series

    def table_of(spec):
        spec, base = resolve_base(spec, Schedule(), None)
        folder = tmp_path / spec.name
        for run in open_grid(folder, spec, base):
            update_status(run.directory, state=DONE, metrics={"AP": 0.1})
        table = load_table(folder, ["AP"])
        write_results(folder, table)  # the plot renders
        return table

    product = table_of(grid_from_flags([("lambda1", "0.5,1"), ("num_convs", "0,1,2")]))
    assert product_series(product) == [("num_convs=0", [0, 3]), ("num_convs=1", [1, 4]), ("num_convs=2", [2, 5])]
    pairs = GridSpec(points=[GridPoint({"lambda1": "1", "lambda2": "2"}), GridPoint({"lambda1": "0.5", "lambda2": "2"}),
                             GridPoint({"lambda1": "1", "lambda2": "1"})], name="pairs")
    assert product_series(table_of(pairs)) is None
    assert product_series(table_of(grid_from_flags([("lambda1", "0.5,1")]))) is None
