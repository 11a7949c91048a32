"""`codetr export`: the ONNX graph (run by onnxruntime) and the torch.export program against PyTorch's own outputs of
the same checkpoint on generated images, and weights-only checkpoints (smaller, same evaluation, no resume)."""
from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner, Result

import codetr.engine.export as export_module
from cli import app
from codetr.engine.checkpoint import load_checkpoint, save_checkpoint
from codetr.engine.export import (INPUT_NAMES, METADATA_FILE, OUTPUT_NAMES, GraphInputs, eager_outputs, export_program,
                                  export_torch, graph_inputs, load_exported, weights_only_state)
from codetr.engine.inference import load_detector, open_image
from codetr.errors import CheckpointError

# Largest absolute difference allowed between the exported graph and PyTorch (float32, same weights). Measured on
# the tiny fixture: onnxruntime scores 1.9e-7, boxes 9.2e-5 px (images ~280 px), logits 1.7e-6, pred_boxes 2.4e-7;
# the .pt2 program 0 (the same kernels).
TOLERANCE = {"scores": 1e-5, "boxes": 1e-3, "logits": 1e-4, "pred_boxes": 1e-5}
# Ranks whose scores lie this close to a neighbour's may swap between runtimes: their labels / boxes are not compared.
TIE = 1e-5


def codetr(*args: object) -> Result:
    """The `codetr` command in this process (a fresh interpreter per call would double the file's time)."""
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_one_line_error(result: Result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert all(fragment in lines[0] for fragment in fragments), lines[0]


@pytest.fixture(scope="module")
def val_images(synth_root: Path) -> list[Path]:
    return sorted((synth_root / "val2017").iterdir())[:3]


@pytest.fixture(scope="module")
def onnx_export(tiny_ckpt: Path, val_images: list[Path], tmp_path_factory) -> tuple[Path, str, object]:
    """`codetr export --out model.onnx --image IMG` on the tiny fixture checkpoint: (the file, the command's output,
    the torch.export program it traced, which the .pt2 test saves instead of tracing again)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    traced = []

    def recording(detector):
        traced.append(export_program(detector))
        return traced[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(export_module, "export_program", recording)
        result = codetr("export", "--ckpt", tiny_ckpt, "--out", out, "--image", val_images[0])
    assert result.exit_code == 0, result.output
    return out, result.output, traced[0]


@pytest.fixture(scope="module")
def program(request, tiny_ckpt: Path):
    """The torch.export program of the tiny checkpoint: the ONNX export's when onnxruntime is there, else traced."""
    try:
        return request.getfixturevalue("onnx_export")[2]
    except pytest.skip.Exception:
        return export_program(load_detector(tiny_ckpt, "cpu"))


def input_sets(detector, val_images: list[Path]) -> list[GraphInputs]:
    """One image alone, and two of other sizes padded into one batch (the graph's B, H, W are dynamic)."""
    pictures = [open_image(path) for path in val_images]
    sets = [graph_inputs(detector, pictures[:1]), graph_inputs(detector, pictures[1:3])]
    assert sets[0].images.shape[-2:] != sets[1].images.shape[-2:] and sets[1].masks.any()
    return sets


def untied(scores: torch.Tensor) -> torch.Tensor:
    """[B, K] True where a rank's score is at least TIE from its neighbours' (its detection cannot swap)."""
    gaps = (scores[:, 1:] - scores[:, :-1]).abs() < TIE
    tied = torch.zeros_like(scores, dtype=torch.bool)
    tied[:, 1:] |= gaps
    tied[:, :-1] |= gaps
    assert (~tied).float().mean() > 0.8  # the comparisons cover most ranks
    return ~tied


def assert_matches(exported: list[torch.Tensor], eager: list[torch.Tensor]) -> None:
    outputs = dict(zip(OUTPUT_NAMES, exported))
    reference = dict(zip(OUTPUT_NAMES, eager))
    assert outputs["labels"].dtype == torch.int64 and all(outputs[n].shape == reference[n].shape for n in OUTPUT_NAMES)
    keep = untied(reference["scores"])
    for name, tolerance in TOLERANCE.items():
        got, want = (outputs[name][keep], reference[name][keep]) if name == "boxes" else (outputs[name], reference[name])
        error = float((got - want).abs().max())
        assert error <= tolerance, f"{name}: largest difference {error:.3g} > {tolerance}"
    assert torch.equal(outputs["labels"][keep], reference["labels"][keep])


def test_onnx_export_matches_pytorch_on_generated_images(onnx_export, tiny_ckpt, val_images):
    onnx = pytest.importorskip("onnx")
    path, output, _ = onnx_export
    detector = load_detector(tiny_ckpt, "cpu")  # the checkpoint's own attention setting: the reference
    run = load_exported(path, "onnx")
    for inputs in input_sets(detector, val_images):
        exported = run(inputs)
        assert_matches(exported, eager_outputs(detector, inputs))
        # the graph's top-k is model.postprocess's (what codetr eval and predict report)
        with torch.no_grad():
            results = detector.model.postprocess(detector.model(inputs.images, inputs.masks), inputs.orig_sizes)
        keep = untied(exported[0])
        for index, result in enumerate(results):
            assert float((exported[0][index] - result["scores"]).abs().max()) <= TOLERANCE["scores"]
            boxes = exported[2][index][keep[index]] - result["boxes"][keep[index]]
            assert float(boxes.abs().max()) <= TOLERANCE["boxes"]
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == list(INPUT_NAMES)
    assert [o.name for o in model.graph.output] == list(OUTPUT_NAMES)
    assert any(op.domain in ("", "ai.onnx") and op.version >= 16 for op in model.opset_import)  # GridSample
    assert "GridSample" in {node.op_type for node in model.graph.node}  # the pure-PyTorch attention
    meta = {prop.key: prop.value for prop in model.metadata_props}
    assert json.loads(meta["class_names"]) == detector.class_names and json.loads(meta["cat_ids"]) == detector.cat_ids
    assert f"wrote {path}: onnx" in output and "onnxruntime against PyTorch" in output and "0 labels differ" in output


def test_torch_export_program_matches_pytorch(program, tiny_ckpt, val_images, tmp_path):
    detector = load_detector(tiny_ckpt, "cpu")
    out = tmp_path / "model.pt2"
    export_torch(detector, out, tiny_ckpt, program)
    run = load_exported(out, "torch-export")
    for inputs in input_sets(detector, val_images):
        assert_matches(run(inputs), eager_outputs(detector, inputs))
    with zipfile.ZipFile(out) as archive:  # a .pt2 is a zip: read the metadata without loading the program again
        name = next(n for n in archive.namelist() if n.endswith(f"/extra/{METADATA_FILE}"))
        meta = json.loads(archive.read(name))
    assert json.loads(meta["class_names"]) == detector.class_names and meta["inputs"] == ", ".join(INPUT_NAMES)


def test_weights_only_checkpoint_is_smaller_and_evaluates_the_same(tiny_ckpt, synth_root, tmp_path):
    small = tmp_path / "small.pt"
    result = codetr("export", "--ckpt", tiny_ckpt, "--weights-only", "--out", small)
    assert result.exit_code == 0, result.output
    full_size, small_size = tiny_ckpt.stat().st_size, small.stat().st_size
    assert small_size < full_size / 2, (small_size, full_size)  # AdamW's two moments were twice the weights
    state = load_checkpoint(small)
    assert set(state) == {"format_version", "model", "config", "num_classes", "cat_ids", "class_names", "position",
                          "weights_only"}
    for name, ckpt in (("full", tiny_ckpt), ("small", small)):
        evaluated = codetr("eval", "--ckpt", ckpt, "--data", synth_root, "--out", tmp_path / name)
        assert evaluated.exit_code == 0, evaluated.output
    metrics = [json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("full", "small")]
    for m in metrics:
        m.pop("checkpoint")
    assert metrics[0] == metrics[1]
    assert (tmp_path / "full" / "detections.json").read_text() == (tmp_path / "small" / "detections.json").read_text()

    run = tmp_path / "run"  # a finished run's last.pt shrunk in place is no training state any more
    run.mkdir()
    shutil.copy(tiny_ckpt, run / "last.pt")
    result = codetr("export", "--ckpt", run / "last.pt", "--weights-only", "--out", run / "last.pt")
    assert result.exit_code == 0 and "replaced" in result.output, result.output
    assert (run / "last.pt").stat().st_size == pytest.approx(small_size, rel=0.01)
    resumed = codetr("train", "--preset", "tiny", "--data", synth_root, "--out", run, "--resume")
    assert_one_line_error(resumed, "cannot resume", "model weights only")


def test_weights_only_keeps_the_ema_weights(tiny_ckpt, tmp_path):
    state = load_checkpoint(tiny_ckpt)
    ema = {f"module.{k}": v + 0.01 if v.is_floating_point() else v for k, v in state["model"].items()}
    state["ema"] = {**ema, "n_averaged": torch.tensor(3)}
    with_ema = tmp_path / "ema.pt"
    save_checkpoint(with_ema, {k: v for k, v in state.items() if k != "format_version"})

    exported = weights_only_state(load_checkpoint(with_ema), use_ema=True, source=with_ema)
    assert exported["weights_only"]["weights"] == "ema" and "ema" not in exported and "optimizer" not in exported
    assert all(torch.equal(exported["model"][k], ema[f"module.{k}"]) for k in state["model"])
    small = tmp_path / "small.pt"
    save_checkpoint(small, exported)
    a, b = load_detector(with_ema, "cpu").model.state_dict(), load_detector(small, "cpu").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(CheckpointError, match="weights-only export of the EMA weights"):
        load_detector(small, "cpu", use_ema=False)
    raw = weights_only_state(load_checkpoint(with_ema), use_ema=False, source=with_ema)  # --no-ema
    assert raw["weights_only"]["weights"] == "raw"
    assert all(torch.equal(raw["model"][k], state["model"][k]) for k in state["model"])


@pytest.mark.parametrize("args, fragments", [
    (["--ckpt", "/no/such.pt", "--out", "OUT/m.onnx"], ["checkpoint not found", "/no/such.pt"]),
    (["--ckpt", "JUNK", "--out", "OUT/m.onnx"], ["cannot read checkpoint", "junk.pt"]),
    (["--ckpt", "JUNK", "--out", "JUNK/m.onnx"], ["cannot write --out", "is not a folder"]),
    (["--ckpt", "JUNK", "--out", "OUT/m.onnx", "--format", "tflite"], ["--format 'tflite'", "onnx, torch-export"]),
    (["--ckpt", "JUNK", "--out", "OUT/m.bin"], ["give --format"]),
    (["--ckpt", "JUNK", "--out", "JUNK", "--format", "onnx"], ["is the checkpoint itself"]),
])
def test_bad_export_arguments(args, fragments, tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    args = [a.replace("JUNK", str(junk)).replace("OUT", str(tmp_path / "out")) for a in args]
    assert_one_line_error(codetr("export", *args), *fragments)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
