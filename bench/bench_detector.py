"""Detector speed and memory: seconds per training iteration (forward + backward + optimizer step),
inference seconds per image, and peak memory, for a preset at a given input size.

    python bench/bench_detector.py --preset tiny --size 256x256
    python bench/bench_detector.py --preset deformable_detr_pp_r50_1x --size 800x1216 --hf \
        --mmdet ~/.cache/codetr-peer/venv

Each measurement runs in a fresh subprocess so that peak memory (CUDA max allocated, or the process's
peak RSS on CPU) belongs to that measurement alone. Two peers, each two-stage + box refine with a
ResNet-50 and no pretrained weights, on the same input (analysis.profile.synthetic_batch, seed 0):
`--hf` adds Hugging Face transformers' DeformableDetr (bench/hf_peer.py); `--mmdet VENV` adds
mmdetection 3.3's DeformableDETR, run by bench/mmdet_peer.py with VENV/bin/python (the peer venv that
../shared/peer/build_mmdet_peer.sh builds), which reads the batch from a file this script saves. All
three use the FFN width `--ffn-dim` and dropout `--dropout` (default: the preset's model.transformer values;
the peers' own defaults are dropout 0.1, HF's FFN 1024). After the table
come the ratios codetr / peer of train s/iter, infer s/image and train peak MB (below 1: codetr is
faster or smaller). On the CPU codetr keeps freed memory for reuse (train.reuse_freed_memory, on by default;
`--set train.reuse_freed_memory=false` turns it off); `--same-allocator` gives the peers that malloc setting too.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # codetr and analysis, installed or not

from analysis.profile import synthetic_batch, time_iterations  # noqa: E402
from codetr.engine.memory import keep_freed_memory_for_reuse, peak_memory_mb  # noqa: E402


def measure_ours(args, mode: str) -> dict:
    from codetr.config import apply_overrides, get_preset
    from codetr.data.collate import Batch
    from codetr.engine.optim import build_optimizer
    from codetr.engine.train import train_step
    from codetr.models.criterion import build_criterion
    from codetr.models.checkpointing import use_activation_checkpointing
    from codetr.models.detector import build_detector

    device = torch.device(args.device)
    cfg = apply_overrides(get_preset(args.preset), args.set + [f"model.transformer.ffn_dim={args.ffn_dim}",
                                                              f"model.transformer.dropout={args.dropout}"])
    if device.type == "cpu" and cfg.train.reuse_freed_memory:  # as codetr's Trainer does
        keep_freed_memory_for_reuse()
    torch.manual_seed(0)
    model = build_detector(cfg.model, args.num_classes).to(device)
    use_activation_checkpointing(model, cfg.train.activation_checkpointing)
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
    model = build_hf_deformable_detr(args.num_classes, args.ffn_dim, args.dropout).to(device)
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


def preset_transformer(args):
    """The preset's model.transformer config (with --set applied): the FFN width and dropout by default."""
    from codetr.config import apply_overrides, get_preset

    return apply_overrides(get_preset(args.preset), args.set).model.transformer


def child_args(args) -> list[str]:
    """The options of a codetr or HF measurement subprocess: this run's, less --hf and --mmdet."""
    height, width = args.size
    options = ["--preset", args.preset, "--size", f"{height}x{width}", "--batch", args.batch,
               "--num-classes", args.num_classes, "--iters", args.iters, "--warmup", args.warmup,
               "--device", args.device, "--threads", args.threads, "--ffn-dim", args.ffn_dim,
               "--dropout", args.dropout]
    return [str(option) for option in options] + [f"--set={item}" for item in args.set]


# What codetr's train.reuse_freed_memory sets through mallopt (codetr/engine/memory.py), as glibc environment
# variables for the peers' processes (--same-allocator).
PEER_ALLOCATOR_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)}


def mmdet_python(args) -> Path:
    return Path(args.mmdet).expanduser() / "bin" / "python"


def mmdet_command(args, mode: str, batch_file: Path) -> list[str]:
    options = ["--batch-file", batch_file, "--mode", mode, "--num-classes", args.num_classes,
               "--iters", args.iters, "--warmup", args.warmup, "--device", args.device,
               "--threads", args.threads, "--ffn-dim", args.ffn_dim,
               "--dropout", args.dropout]
    return [str(mmdet_python(args)), str(Path(__file__).with_name("mmdet_peer.py"))] + [str(o) for o in options]


def save_batch(args, directory: str) -> Path:
    """The synthetic batch that the codetr and HF measurements build, saved for mmdet_peer.py."""
    height, width = args.size
    path = Path(directory) / "batch.pt"
    torch.save(synthetic_batch(args.batch, height, width, args.num_classes, torch.device("cpu")), path)
    return path


def run_measurement(impl: str, mode: str, args, batch_file: Path | None) -> dict | None:
    """One measurement in its own process: its `RESULT {json}` line, or None (and its stderr) if it failed."""
    if impl == "mmdet":
        command = mmdet_command(args, mode, batch_file)
    else:
        command = [sys.executable, __file__, "--only", f"{impl}:{mode}"] + child_args(args)
    env = dict(os.environ, **PEER_ALLOCATOR_ENV) if impl != "codetr" and args.same_allocator else None
    proc = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).parent, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        print(f"{impl} {mode} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(lines[-1][7:])


def print_ratios(results: dict[tuple[str, str], dict]) -> None:
    """codetr / peer of train s/iter, infer s/image and train peak MB, for each peer measured."""
    peers = [impl for impl in ("hf", "mmdet") if any(key[0] == impl for key in results)]
    if not peers:
        return
    columns = [("train s/iter", "train", "seconds"), ("infer s/image", "infer", "per_image"),
               ("train peak MB", "train", "peak_mb")]
    print("\ncodetr / peer (below 1: codetr faster or smaller)")
    print(f"{'peer':8s}" + "".join(f" {title:>14s}" for title, _, _ in columns))
    for peer in peers:
        cells = []
        for _, mode, key in columns:
            ours, theirs = results.get(("codetr", mode)), results.get((peer, mode))
            cells.append(f"{ours[key] / theirs[key]:14.2f}" if ours and theirs else f"{'n/a':>14s}")
        print(f"{peer:8s} " + " ".join(cells))


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
    parser.add_argument("--ffn-dim", type=int, default=0,
                        help="FFN width of codetr and the peers (0: the preset's model.transformer.ffn_dim)")
    parser.add_argument("--dropout", type=float, default=None,
                        help="dropout of codetr and the peers (default: the preset's model.transformer.dropout)")
    parser.add_argument("--hf", action="store_true", help="also run HF transformers' DeformableDetr")
    parser.add_argument("--mmdet", default="", metavar="VENV",
                        help="also run mmdetection 3.3's DeformableDETR with VENV/bin/python (bench/mmdet_peer.py)")
    parser.add_argument("--same-allocator", action="store_true",
                        help="run the peers with the malloc setting codetr uses on the CPU (train.reuse_freed_memory)")
    parser.add_argument("--only", default="", help=argparse.SUPPRESS)  # internal: one measurement
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    transformer = preset_transformer(args)
    args.ffn_dim = args.ffn_dim or transformer.ffn_dim
    args.dropout = transformer.dropout if args.dropout is None else args.dropout

    if args.only:
        impl, mode = args.only.split(":")
        result = (measure_ours if impl == "codetr" else measure_hf)(args, mode)
        print("RESULT " + json.dumps(result))
        return

    for flag, enabled in (("--hf", args.hf), ("--mmdet", args.mmdet)):
        if enabled and args.preset != "deformable_detr_pp_r50_1x":
            parser.error(f"{flag} compares against an R50 two-stage + refine DeformableDetr: use it with --preset "
                         "deformable_detr_pp_r50_1x")
    if args.mmdet and not mmdet_python(args).exists():
        parser.error(f"--mmdet {args.mmdet}: no {mmdet_python(args)} (../shared/peer/build_mmdet_peer.sh builds it)")
    impls = ["codetr"] + ["hf"] * args.hf + ["mmdet"] * bool(args.mmdet)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_detector_") as directory:
        batch_file = save_batch(args, directory) if args.mmdet else None
        for impl in impls:
            for mode in ("train", "infer"):
                result = run_measurement(impl, mode, args, batch_file)
                if result is not None:
                    results[(impl, mode)] = result

    height, width = args.size
    print(f"preset={args.preset} size={height}x{width} batch={args.batch} device={args.device} "
          f"threads={torch.get_num_threads()} iters={args.iters} (median) ffn_dim={args.ffn_dim} dropout={args.dropout}")
    print(f"{'impl':8s} {'mode':6s} {'s/iter':>9s} {'s/image':>9s} {'img/s':>8s} {'peak MB':>9s}")
    for (impl, mode), r in results.items():
        print(f"{impl:8s} {mode:6s} {r['seconds']:9.3f} {r['per_image']:9.3f} {r['images_per_s']:8.2f} {r['peak_mb']:9.0f}")
    print_ratios(results)


if __name__ == "__main__":
    main()
