"""Detector speed and memory: seconds per training iteration (forward + backward + optimizer step),
inference seconds per image, and peak memory, for a preset at a given input size.

    python bench/bench_detector.py --preset tiny --size 256x256
    python bench/bench_detector.py --preset deformable_detr_pp_r50_1x --size 800x1216 --hf

Each measurement runs in a fresh subprocess so that peak memory (CUDA max allocated, or the process's
peak RSS on CPU) belongs to that measurement alone. `--hf` adds Hugging Face transformers'
DeformableDetr (two-stage + box refine, ResNet-50, no pretrained weights) on the same input as a peer.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from codetr.engine.memory import peak_memory_mb

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.profile import synthetic_batch, time_iterations  # noqa: E402


def measure_ours(args, mode: str) -> dict:
    from codetr.config import apply_overrides, get_preset
    from codetr.data.collate import Batch
    from codetr.engine.optim import build_optimizer
    from codetr.engine.train import train_step
    from codetr.models.criterion import build_criterion
    from codetr.models.detector import build_detector

    device = torch.device(args.device)
    cfg = apply_overrides(get_preset(args.preset), args.set)
    torch.manual_seed(0)
    model = build_detector(cfg.model, args.num_classes).to(device)
    height, width = args.size
    images, masks, targets = synthetic_batch(args.batch, height, width, args.num_classes, device)
    if mode == "train":
        criterion = build_criterion(model, cfg.model)
        optimizer = build_optimizer(model, cfg.optim)
        batch = Batch(images, masks, targets)
        model.train()
        step = lambda: train_step(model, criterion, batch, optimizer, cfg)  # noqa: E731
    else:
        model.eval()

        def step():
            with torch.no_grad(), torch.autocast(device.type, enabled=cfg.train.amp and device.type == "cuda",
                                                 dtype=torch.bfloat16):
                out = model(images, masks)
                model.postprocess(out, torch.tensor([[height, width]] * args.batch, device=device))

    return time_steps(step, device, args)


def measure_hf(args, mode: str) -> dict:
    from hf_peer import build_hf_deformable_detr, hf_labels

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_hf_deformable_detr(args.num_classes).to(device)
    height, width = args.size
    images, masks, targets = synthetic_batch(args.batch, height, width, args.num_classes, device)
    pixel_mask = (~masks).long()
    if mode == "train":
        optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=1e-4)
        labels = hf_labels(targets)
        model.train()

        def step():
            loss = model(pixel_values=images, pixel_mask=pixel_mask, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            optimizer.step()
    else:
        model.eval()

        def step():
            with torch.no_grad():
                model(pixel_values=images, pixel_mask=pixel_mask)

    return time_steps(step, device, args)


def time_steps(step, device: torch.device, args) -> dict:
    times = time_iterations(step, device, args.iters, args.warmup)
    median = sorted(times)[len(times) // 2]
    return {"seconds": median, "per_image": median / args.batch, "images_per_s": args.batch / median,
            "peak_mb": peak_memory_mb(device)}


def parse_size(text: str) -> tuple[int, int]:
    height, width = text.lower().split("x")
    return int(height), int(width)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--size", type=parse_size, default=(256, 256), help="HxW, e.g. 800x1216")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--num-classes", type=int, default=80)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: default)")
    parser.add_argument("--set", action="append", default=[], help="config override KEY=VALUE")
    parser.add_argument("--hf", action="store_true", help="also run HF transformers' DeformableDetr")
    parser.add_argument("--only", default="", help=argparse.SUPPRESS)  # internal: one measurement
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.only:
        impl, mode = args.only.split(":")
        result = (measure_ours if impl == "codetr" else measure_hf)(args, mode)
        print("RESULT " + json.dumps(result))
        return

    runs = [("codetr", "train"), ("codetr", "infer")]
    if args.hf and args.preset != "deformable_detr_pp_r50_1x":
        parser.error("--hf compares against an R50 two-stage + refine DeformableDetr: use it with --preset "
                     "deformable_detr_pp_r50_1x")
    if args.hf:
        runs += [("hf", "train"), ("hf", "infer")]
    rows = []
    for impl, mode in runs:
        command = [sys.executable, __file__, "--only", f"{impl}:{mode}"] + [a for a in sys.argv[1:] if a != "--hf"]
        proc = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).parent)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(f"{impl} {mode} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append((impl, mode, json.loads(lines[-1][7:])))

    height, width = args.size
    print(f"preset={args.preset} size={height}x{width} batch={args.batch} device={args.device} "
          f"threads={torch.get_num_threads()} iters={args.iters} (median)")
    print(f"{'impl':8s} {'mode':6s} {'s/iter':>9s} {'s/image':>9s} {'img/s':>8s} {'peak MB':>9s}")
    for impl, mode, r in rows:
        print(f"{impl:8s} {mode:6s} {r['seconds']:9.3f} {r['per_image']:9.3f} {r['images_per_s']:8.2f} {r['peak_mb']:9.0f}")


if __name__ == "__main__":
    main()
