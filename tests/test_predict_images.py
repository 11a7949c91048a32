"""`codetr predict --images` (batch inference to a COCO results file) and the output-location checks of `predict`.

The commands run in-process (typer's CliRunner) on the session's barely-trained `tiny` checkpoint: fast, and the
disk-full case can patch the file system. Tolerances: none; batch prediction on the validation folder must give
`codetr eval`'s detections record for record and the same 12 COCOeval numbers exactly (the same preprocessing,
batches and forward pass). Batch composition alone moves this checkpoint's scores by up to 4e-3, so the
comparison fails if predict batched, padded or resized differently from evaluation.
"""
import errno
import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import Result
from PIL import Image
from typer.testing import CliRunner

from cli import app
from codetr.data.coco import CocoDetection
from codetr.engine.evaluate import METRIC_NAMES, coco_evaluate
from codetr.errors import ConfigError
from codetr.io import check_writable_dir, check_writable_file


def run(*args) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *fragments: str) -> str:
    """Exit 2, no traceback, and exactly one non-empty stderr line, an `error:` line holding every fragment."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def val_annotations(root: Path) -> Path:
    return root / "annotations" / "instances_val2017.json"


@pytest.fixture(scope="module")
def evaluated(tiny_ckpt, tmp_path_factory) -> Path:
    """`codetr eval` of the tiny checkpoint on its validation split: the folder with metrics.json, detections.json."""
    out = tmp_path_factory.mktemp("eval")
    result = run("eval", "--ckpt", tiny_ckpt, "--out", out)
    assert result.exit_code == 0, result.output
    return out


def test_batch_predict_on_the_val_folder_equals_eval(tiny_ckpt, synth_root, evaluated, tmp_path):
    out = tmp_path / "pred"
    result = run("predict", "--ckpt", tiny_ckpt, "--images", synth_root / "val2017", "--out", out)
    assert result.exit_code == 0, result.output
    assert "predicted 8 images" in result.stderr and "Traceback" not in result.output

    predicted = json.loads((out / "detections.json").read_text())
    evaluated_records = json.loads((evaluated / "detections.json").read_text())
    assert len(predicted) > 0 and predicted == evaluated_records  # exactly, record for record

    # no --ann: ids 1..N in file-name order, listed in images.json; the generated files are named by their ids
    ann = json.loads(val_annotations(synth_root).read_text())
    listed = json.loads((out / "images.json").read_text())["images"]
    assert listed == sorted(({k: image[k] for k in ("id", "file_name", "width", "height")} for image in ann["images"]),
                            key=lambda image: image["file_name"])

    # scored by pycocotools against the val annotations: eval's 12 numbers exactly (tolerance 0)
    dataset = CocoDetection(synth_root / "val2017", val_annotations(synth_root))
    metrics = coco_evaluate(dataset.coco, predicted, verbose=False)
    written = json.loads((evaluated / "metrics.json").read_text())
    assert {name: metrics[name] for name in METRIC_NAMES} == {name: written[name] for name in METRIC_NAMES}
    assert max(metrics.values()) > 0  # not a vacuous comparison of two all-zero tables


def test_glob_with_ann_takes_its_ids_and_draws(tiny_ckpt, synth_root, evaluated, tmp_path):
    """A glob over renamed copies of images 1, 2, 5, 6 (the same batches of 2 as eval's) with --ann: the files
    keep their annotation ids, the records equal eval's for those images, and --draw writes one PNG each."""
    folder = tmp_path / "subset"
    folder.mkdir()
    chosen = {1: "000000000001.png", 2: "000000000002.png", 5: "000000000005.png", 6: "000000000006.png"}
    for name in chosen.values():
        shutil.copy(synth_root / "val2017" / name, folder / name)
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "pred"
    result = run("predict", "--ckpt", tiny_ckpt, "--images", f"{folder}/*", "--ann", val_annotations(synth_root),
                 "--out", out, "--draw", "--threshold", "0.0")
    assert result.exit_code == 0, result.output
    assert "warning" not in result.stderr  # notes.txt is not an image file: not read at all
    predicted = json.loads((out / "detections.json").read_text())
    expected = [r for r in json.loads((evaluated / "detections.json").read_text()) if r["image_id"] in chosen]
    assert len(predicted) > 0 and predicted == expected
    assert not (out / "images.json").exists()  # the ids are the annotation file's
    drawn = sorted(p.name for p in (out / "drawn").iterdir())
    assert drawn == sorted(chosen.values())
    assert Image.open(out / "drawn" / chosen[5]).size == Image.open(folder / chosen[5]).size


def test_unreadable_images_are_skipped_with_one_warning_each(tiny_ckpt, synth_root, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name in ("000000000001.png", "000000000003.png"):
        shutil.copy(synth_root / "val2017" / name, folder / name)
    (folder / "000000000002.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    whole = (synth_root / "val2017" / "000000000004.png").read_bytes()
    (folder / "000000000004.png").write_bytes(whole[: len(whole) // 3])  # truncated
    out = tmp_path / "pred"
    result = run("predict", "--ckpt", tiny_ckpt, "--images", folder, "--out", out)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2 and "000000000002.png" in warnings[0] and "000000000004.png" in warnings[1], warnings
    assert "skipped 2 unreadable image(s)" in result.stderr
    # ids follow the sorted file names, unreadable files included, so a file's id never depends on the others
    assert [image["id"] for image in json.loads((out / "images.json").read_text())["images"]] == [1, 3]
    assert {record["image_id"] for record in json.loads((out / "detections.json").read_text())} <= {1, 3}


def test_no_readable_image_is_an_error(tiny_ckpt, tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"junk")
    (folder / "b.png").write_bytes(b"")
    result = run("predict", "--ckpt", tiny_ckpt, "--images", folder, "--out", tmp_path / "pred")
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert [line.split()[0] for line in lines] == ["warning:", "warning:", "error:"], lines
    assert "none of the 2 image(s) could be read" in lines[-1] and "a.jpg" in lines[-1]
    assert not (tmp_path / "pred" / "detections.json").exists()


def _unwritable_dir(tmp_path: Path) -> Path:
    """A folder nothing can be created in: a read-only folder, or for root (who ignores permissions) /proc."""
    if os.geteuid() == 0:
        return Path("/proc")
    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(0o500)
    return folder


# Each case runs with a checkpoint that does not exist: the error must name the bad location, so it was checked
# before the checkpoint was even opened.
@pytest.mark.parametrize("case", ["both", "neither", "empty folder", "glob matches nothing", "no such folder",
                                  "batch out is a file", "batch out under a file", "batch out unwritable",
                                  "single out is a folder", "single out under a file", "single out unwritable",
                                  "ann without the image", "ann missing"])
def test_bad_arguments_are_one_line_before_the_model_loads(case, synth_root, tmp_path):
    a_file = tmp_path / "a_file.txt"
    a_file.write_text("x")
    (tmp_path / "empty").mkdir()
    image = synth_root / "val2017" / "000000000001.png"
    ckpt = ["--ckpt", tmp_path / "missing.pt"]
    images = ["--images", synth_root / "val2017"]
    unwritable = _unwritable_dir(tmp_path) / "sub" / "out"
    one_image_ann = tmp_path / "one.json"
    one_image_ann.write_text(json.dumps({"images": [{"id": 5, "file_name": "000000000001.png"}], "categories": []}))
    args, fragments = {
        "both": ([*ckpt, "--image", image, *images, "--out", tmp_path / "o"], ["not both", "--image", "--images"]),
        "neither": ([*ckpt, "--out", tmp_path / "o"], ["--image", "--images"]),
        "empty folder": ([*ckpt, "--images", tmp_path / "empty", "--out", tmp_path / "o"], [str(tmp_path / "empty")]),
        "glob matches nothing": ([*ckpt, "--images", f"{tmp_path}/*.jpg", "--out", tmp_path / "o"], [f"{tmp_path}/*.jpg"]),
        "no such folder": ([*ckpt, "--images", tmp_path / "nope", "--out", tmp_path / "o"], [str(tmp_path / "nope")]),
        "batch out is a file": ([*ckpt, *images, "--out", a_file], [str(a_file), "not a folder"]),
        "batch out under a file": ([*ckpt, *images, "--out", a_file / "sub"], [str(a_file / "sub"), "not a folder"]),
        "batch out unwritable": ([*ckpt, *images, "--out", unwritable], [str(unwritable), "not writable"]),
        "single out is a folder": ([*ckpt, "--image", image, "--out", tmp_path], [str(tmp_path), "is a folder"]),
        "single out under a file": ([*ckpt, "--image", image, "--out", a_file / "o.png"], [str(a_file / "o.png")]),
        "single out unwritable": ([*ckpt, "--image", image, "--out", unwritable / "o.png"], [str(unwritable / "o.png"),
                                                                                              "not writable"]),
        "ann without the image": ([*ckpt, *images, "--ann", one_image_ann, "--out", tmp_path / "o"],
                                  ["one.json", "7 image(s) are not in its 'images' list", "000000000002.png"]),
        "ann missing": ([*ckpt, *images, "--ann", tmp_path / "no.json", "--out", tmp_path / "o"], [str(tmp_path / "no.json")]),
    }[case]
    line = assert_one_line_error(run("predict", *args), *fragments)
    assert "missing.pt" not in line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("mode", ["batch", "single"])
def test_disk_full_is_one_line(mode, tiny_ckpt, synth_root, tmp_path, monkeypatch):
    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    out = tmp_path / "pred" if mode == "batch" else tmp_path / "pred.png"
    image = synth_root / "val2017" / "000000000001.png"
    source = ["--images", synth_root / "val2017"] if mode == "batch" else ["--image", image]
    line = assert_one_line_error(run("predict", "--ckpt", tiny_ckpt, *source, "--out", out), "no space left on device")
    assert str(out) in line
    leftovers = list(out.iterdir()) if out.is_dir() else list(tmp_path.glob(".pred.png.*"))
    assert leftovers == []  # the atomic write removed its temporary file


def test_single_image_predict_still_draws_a_png(tiny_ckpt, synth_root, tmp_path):
    image = synth_root / "val2017" / "000000000002.png"
    out = tmp_path / "new" / "pred.png"
    result = run("predict", "--ckpt", tiny_ckpt, "--image", image, "--out", out, "--threshold", "0.0")
    assert result.exit_code == 0, result.output
    assert "drawn to" in result.stderr and Image.open(out).size == Image.open(image).size


def test_check_writable_helpers(tmp_path):
    assert check_writable_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # checking creates nothing
    assert check_writable_file(tmp_path / "new" / "f.json") == tmp_path / "new" / "f.json"
    assert list(tmp_path.iterdir()) == []  # the probe file is gone
    a_file = tmp_path / "f"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match="cannot write the output folder .*/f: .*/f is not a folder"):
        check_writable_dir(a_file)
    with pytest.raises(ConfigError, match="cannot write --log .*/f/x.jsonl: .*/f is not a folder"):
        check_writable_file(a_file / "x.jsonl", "--log")
    with pytest.raises(ConfigError, match="it is a folder, expected a file name"):
        check_writable_file(tmp_path)
    with pytest.raises(ConfigError, match="not writable"):
        check_writable_dir(_unwritable_dir(tmp_path) / "x")
