"""The `codetr` command end to end, and bad input: one clear line, a non-zero exit, no traceback."""
import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from tests.conftest import REPO

FAST = ["--set", "data.num_workers=0", "--set", "model.num_queries=20", "--set", "model.num_detections=20"]


def codetr(*args: str, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *map(str, args)], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, synth_root):
    """`codetr train` for one short epoch on the generated data; returns the run folder."""
    out = tmp_path_factory.mktemp("run")
    env = {**__import__("os").environ, "PYTHONUNBUFFERED": "1"}
    result = codetr("train", "--preset", "tiny", "--data", synth_root, "--epochs", "1", "--out", out, *FAST,
                    "--set", "train.max_iters_per_epoch=4", env=env)
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.slow
def test_train_eval_predict_end_to_end(trained_run, synth_root, cli_env, tmp_path):
    for name in ("config.json", "log.jsonl", "last.pt", "epoch_001.pt", "metrics.json", "detections.json"):
        assert (trained_run / name).exists(), name
    records = [json.loads(line) for line in (trained_run / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "event" not in r]
    assert len(steps) == 4 and "dec.d2.loss_giou" in steps[0] and "enc.loss_cls" not in steps[0] and "loss" in steps[0]  # tiny is plain: no proposals

    out = tmp_path / "eval"
    result = codetr("eval", "--ckpt", trained_run / "last.pt", "--data", synth_root, "--out", out, env=cli_env)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl"} <= set(metrics)
    assert len(json.loads((out / "detections.json").read_text())) > 0

    image = next((synth_root / "val2017").iterdir())
    png = tmp_path / "pred.png"
    result = codetr("predict", "--ckpt", trained_run / "last.pt", "--image", image, "--out", png,
                    "--threshold", "0.0", env=cli_env)
    assert result.returncode == 0, result.stderr
    assert Image.open(png).size == Image.open(image).size


def test_data_synth_writes_coco_layout(tmp_path, cli_env):
    result = codetr("data", "synth", "--out", tmp_path / "d", "--num-train", "3", "--num-val", "2", env=cli_env)
    assert result.returncode == 0, result.stderr
    train = json.loads((tmp_path / "d" / "annotations" / "instances_train2017.json").read_text())
    assert len(train["images"]) == 3 and len(list((tmp_path / "d" / "train2017").iterdir())) == 3


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["train", "--preset", "nope", "--out", "X"], ["unknown preset 'nope'", "tiny"]),
        (["train", "--set", "model.nope=1", "--out", "X"], ["unknown config key 'model.nope'", "model.num_queries"]),
        (["train", "--set", "optim.lr=fast", "--out", "X"], ["optim.lr", "expected a number"]),
        (["train", "--data", "/no/such/coco", "--out", "X"], ["/no/such/coco"]),
        (["eval", "--ckpt", "/no/such.pt"], ["checkpoint not found", "/no/such.pt"]),
        # brackets in a message are text, not rich markup
        (["train", "--set", "model.aux.heads=[atss,yolo]", "--out", "X"], ["model.aux.heads=['atss', 'yolo']: expected"]),
    ],
)
def test_bad_arguments(args, fragments, cli_env, tmp_path):
    args = [str(tmp_path / "X") if a == "X" else a for a in args]
    assert_one_line_error(codetr(*args, env=cli_env), *fragments)


@pytest.mark.slow
def test_checkpoint_from_another_architecture(trained_run, tmp_path, cli_env):
    state = torch.load(trained_run / "last.pt", weights_only=False)
    state["config"]["model"]["transformer"]["num_decoder_layers"] = 4
    other = tmp_path / "other.pt"
    torch.save(state, other)
    assert_one_line_error(codetr("eval", "--ckpt", other, env=cli_env), "does not fit this architecture", "decoder.layers.3")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert_one_line_error(codetr("eval", "--ckpt", tmp_path / "junk.pt", env=cli_env), "cannot read checkpoint")


@pytest.mark.slow
def test_predict_bad_images(trained_run, tmp_path, cli_env):
    ckpt = trained_run / "last.pt"
    assert_one_line_error(codetr("predict", "--ckpt", ckpt, "--image", tmp_path / "none.png", "--out", tmp_path / "o.png",
                                 env=cli_env), "image not found")
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nthis is not really a png")
    assert_one_line_error(codetr("predict", "--ckpt", ckpt, "--image", corrupt, "--out", tmp_path / "o.png", env=cli_env),
                          "cannot read image", "corrupt.png")


@pytest.mark.slow
def test_training_over_a_corrupt_image_names_the_file(synth_root, tmp_path, cli_env):
    """The error is raised in a DataLoader worker process and still reaches the user as one line."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(synth_root, root)
    victim = sorted((root / "train2017").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:100])  # truncated file
    result = codetr("train", "--preset", "tiny", "--data", root, "--epochs", "1", "--out", tmp_path / "run",
                    "--set", "data.num_workers=2", "--set", "model.num_queries=20", "--set", "model.num_detections=20",
                    env=cli_env)
    assert_one_line_error(result, victim.name)


def test_train_refuses_to_overwrite_a_run_without_resume(trained_run, cli_env):
    result = codetr("train", "--preset", "tiny", "--out", trained_run, env=cli_env)
    assert_one_line_error(result, "last.pt exists", "--resume")
