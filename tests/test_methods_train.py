"""H-DETR and Group-DETR through the real training loop: their terms in the log, EMA, an exact resume, evaluation
of the deployed one-to-one detector (without the training-only query rows)."""
import json

import pytest
import torch

from codetr.config import apply_overrides, get_preset
from codetr.engine.checkpoint import load_checkpoint
from codetr.engine.inference import load_detector
from codetr.engine.train import train


def run_config(preset: str, method: str, data_root, epochs: int):
    return apply_overrides(get_preset(preset), [
        f"model.method={method}", "model.num_queries=20", "model.hybrid.num_queries=40", "model.group.num_groups=2",
        f"data.root={data_root}", f"optim.epochs={epochs}", "optim.lr_drop_epochs=[5]", "train.max_iters_per_epoch=2",
        "data.batch_size=2", "data.train_scales=[160]", "data.max_size=200", "data.augment=false",
        "data.test_size=160", "data.test_max_size=200", "data.num_workers=0", "train.seed=0", "train.ema=true",
        "train.eval_every=0",
    ])


@pytest.mark.slow
@pytest.mark.parametrize("preset, method, group", [("tiny_pp", "h_detr", "o2m"), ("tiny", "group_detr", "grp")])
def test_method_trains_resumes_and_deploys_as_the_baseline(synth_root, tmp_path, preset, method, group):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(run_config(preset, method, synth_root, 2), straight, progress=False)
    train(run_config(preset, method, synth_root, 1), resumed, progress=False)
    train(run_config(preset, method, synth_root, 2), resumed, resume=True, progress=False)

    records = [json.loads(line) for line in (straight / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "step" in r and r.get("event") != "eval"]
    assert len(steps) == 4 and all(f"{group}.d2.loss_cls" in r and "dec.d2.loss_cls" in r for r in steps)
    # the interrupted-and-resumed run ends with the very same weights (EMA included)
    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(resumed / "last.pt")
    assert "transformer.extra_queries.weight" in a["model"]
    for part in ("model", "ema"):
        assert all(torch.equal(value, b[part][key]) for key, value in a[part].items()), part
    deployed = load_detector(straight / "last.pt").model
    assert deployed.query_method is None and deployed.transformer.extra_queries is None
    assert json.loads((straight / "metrics.json").read_text())["AP"] >= 0
