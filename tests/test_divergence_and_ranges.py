"""Issue 15, defects 4 and 6: a diverged model is never scored, divergence in training ends in one line, and
config values and devices outside their range are refused by validation (one line naming the key)."""
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cli import app
from codetr.config import apply_overrides, get_preset
from codetr.engine.distributed import init_distributed
from codetr.engine.evaluate import detections_to_coco
from codetr.engine.train import check_parameters_finite
from codetr.errors import ConfigError, DivergenceError
from codetr.models.matcher import match_cost_matrix


@pytest.mark.parametrize("override, key", [
    ("model.transformer.num_heads=0", "model.transformer.num_heads"),  # was a ZeroDivisionError in validation
    ("data.num_workers=-1", "data.num_workers"),
    ("model.num_classes=-2", "model.num_classes"),
    ("data.test_size=0", "data.test_size"),  # was found only after a whole training epoch
    ("optim.lr=inf", "optim.lr"),  # one step made every weight non-finite
    ("optim.lr=nan", "optim.lr"),
    ("optim.weight_decay=nan", "optim.weight_decay"),
    ("model.transformer.ffn_dim=0", "model.transformer"),
])
def test_out_of_range_config_values_are_one_line_naming_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as error:
        apply_overrides(get_preset("tiny"), [override])
    message = str(error.value)
    assert message.startswith(key) and "\n" not in message


@pytest.mark.parametrize("device, expected", [("tpu", "expected cpu, cuda"), ("gpu0", "expected cpu, cuda")]
                         + ([("cuda", "no CUDA GPU")] if not torch.cuda.is_available() else []))
def test_unusable_devices_are_refused(device: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        init_distributed(device)


def test_non_finite_predictions_are_refused_not_scored() -> None:
    finite = {"scores": torch.tensor([0.9]), "labels": torch.tensor([0]), "boxes": torch.tensor([[1.0, 2.0, 30.0, 40.0]])}
    assert len(detections_to_coco([finite], [7], [1])) == 1
    for field, bad in (("boxes", torch.tensor([[1.0, math.nan, 30.0, 40.0]])), ("scores", torch.tensor([math.inf]))):
        with pytest.raises(DivergenceError, match="image 7: the model predicts NaN/inf"):
            detections_to_coco([{**finite, field: bad}], [7], [1])


def test_parameter_check_names_non_finite_weights_only() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    with torch.no_grad():
        model[1].weight.fill_(3e30)  # finite, although its squared norm overflows float32
    check_parameters_finite(model, "at iteration 3")
    with torch.no_grad():
        model[0].bias[1] = math.nan
    with pytest.raises(DivergenceError, match=r"at iteration 3: 1 parameters hold NaN/inf .*\(0\.bias\)"):
        check_parameters_finite(model, "at iteration 3")


def test_matcher_divergence_is_a_training_error() -> None:
    cost = torch.tensor([[0.1, math.nan], [0.3, 0.2]])
    with pytest.raises(DivergenceError, match="non-finite matching cost"):
        match_cost_matrix(cost)


def test_eval_of_a_diverged_checkpoint_exits_2_without_metrics(tiny_ckpt: Path, synth_root: Path,
                                                               tmp_path: Path) -> None:
    state = torch.load(tiny_ckpt, weights_only=False)
    for key in ("model", "ema"):
        if isinstance(state.get(key), dict):
            for name, tensor in state[key].items():
                if name.endswith("class_branches.0.bias") or name.endswith("class_branch.bias"):
                    tensor.fill_(math.nan)
    diverged = tmp_path / "diverged.pt"
    torch.save(state, diverged)
    out = tmp_path / "eval"
    result = CliRunner().invoke(app, ["eval", "--ckpt", str(diverged), "--data", str(synth_root), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "NaN/inf" in result.output and "Traceback" not in result.output
    assert not (out / "metrics.json").exists()


def test_training_that_diverges_stops_with_one_line(synth_root: Path, tmp_path: Path) -> None:
    """optim.lr=1e30 (finite, so validation lets it through): the next forward pass is NaN and the matcher finds
    it; this used to end in a 190-line traceback."""
    result = CliRunner().invoke(app, [
        "train", "--preset", "tiny", "--data", str(synth_root), "--out", str(tmp_path / "run"), "--set", "optim.lr=1e30",
        "--set", "optim.epochs=1", "--set", "train.max_iters_per_epoch=4", "--set", "data.batch_size=2",
        "--set", "data.train_scales=[128]", "--set", "data.max_size=160", "--set", "data.augment=false"])
    assert result.exit_code == 2, result.output
    assert "diverged at epoch 0 iteration" in result.output and "Traceback" not in result.output


def test_fresh_start_drops_a_killed_runs_log_and_temp_files(synth_root: Path, tmp_path: Path) -> None:
    """Issue 15 defects 3 and 9: a run killed before its first checkpoint leaves log.jsonl (and maybe a
    half-written checkpoint's temp file); starting again must not append to that log or keep the file."""
    from codetr.engine.train import Trainer

    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text('{"epoch": 0, "iter": 0, "step": 1, "loss": 9.0}\n')
    (out / ".last.pt.abc123.tmp").write_bytes(b"x" * 1000)
    cfg = apply_overrides(get_preset("tiny"), [
        f"data.root={synth_root}", "optim.epochs=1", "train.max_iters_per_epoch=2", "data.batch_size=2",
        "data.train_scales=[128]", "data.max_size=160", "data.augment=false", "train.eval_every=0"])
    trainer = Trainer(cfg, out, progress=False)
    assert not (out / ".last.pt.abc123.tmp").exists()
    assert (out / "log.jsonl").read_text() == ""
    del trainer


def test_predict_refuses_a_nan_threshold(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["predict", "--ckpt", str(tmp_path / "none.pt"), "--image",
                                      str(tmp_path / "none.png"), "--out", str(tmp_path / "o.png"), "--threshold", "nan"])
    assert result.exit_code == 2 and "--threshold nan: expected a score in [0, 1]" in result.output
