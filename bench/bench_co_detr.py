"""Training cost of Co-DETR's auxiliary heads, side by side (the shape of the paper's cost table):
seconds per training iteration and peak memory for K = 0 (the baseline), 1 (ATSS), 2 (ATSS +
Faster-RCNN) and all available heads, in one run.

    python bench/bench_co_detr.py --preset tiny --size 256x256 --batch 4
    python bench/bench_co_detr.py --preset deformable_detr_r50_1x --size 800x1216 --batch 1
    python bench/bench_co_detr.py --preset co_dino_tiny --size 160x160 --batch 4      # K = 0 is DINO
    python bench/bench_co_detr.py --preset co_dino_5scale_r50_1x --size 512x512 --without-all

Each configuration runs in its own subprocess (bench_detector.py --only codetr:train), so its peak
memory is its own. Inference cost is the same for all K (the auxiliary parts are training-only).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from codetr.models.co_detr.heads import AUX_HEADS

CONFIGS = {
    "K=0 (baseline)": [],
    "K=1 ATSS": ["atss"],
    "K=2 ATSS+Faster-RCNN": ["atss", "faster_rcnn"],
    f"K={len(tuple(AUX_HEADS))} all": list(tuple(AUX_HEADS)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--size", default="256x256")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--num-classes", type=int, default=80)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="")
    parser.add_argument("--without-all", action="store_true", help="skip the configuration with every head")
    args = parser.parse_args()

    script = Path(__file__).with_name("bench_detector.py")
    rows = []
    for name, heads in CONFIGS.items():
        if args.without_all and name.endswith(" all"):
            continue
        command = [sys.executable, str(script), "--only", "codetr:train", "--preset", args.preset, "--size", args.size,
                   "--batch", str(args.batch), "--num-classes", str(args.num_classes), "--iters", str(args.iters),
                   "--warmup", str(args.warmup), "--set", f"model.aux.heads=[{','.join(heads)}]"]
        if args.device:
            command += ["--device", args.device]
        proc = subprocess.run(command, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(f"{name} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append((name, json.loads(lines[-1][7:])))

    print(f"preset={args.preset} size={args.size} batch={args.batch} iters={args.iters} (median), training step")
    base = rows[0][1]["seconds"] if rows else None
    print(f"{'config':24s} {'s/iter':>8s} {'x base':>7s} {'peak MB':>9s}")
    for name, r in rows:
        print(f"{name:24s} {r['seconds']:8.3f} {r['seconds'] / base:7.2f} {r['peak_mb']:9.0f}")


if __name__ == "__main__":
    main()
