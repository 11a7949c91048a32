"""Where one training step's time and memory go (issue 14's profile; a benchmark, never a test).

    python bench/profile_step.py --preset deformable_detr_r50_1x --size 800x1216 --batch 1
    python bench/profile_step.py --preset co_tiny --size 160x160 --batch 4 --depth 3

Three tables for one step (forward + losses + backward + optimizer) on a synthetic batch, after warm-up:
  1. the step's phases: forward, losses (matcher included; the matcher also on its own), backward, optimizer;
  2. per module, to `--depth` levels of the model's tree: forward time (inclusive, synchronised) and the memory
     its forward keeps alive for backward (bytes of the tensors autograd saves, counted once per module on the
     call stack: inclusive, like the time);
  3. the operators with the most self time over the whole step (torch.profiler), backward kernels included
     (e.g. grid_sampler_2d_backward is the deformable attention's backward).
Times are medians over `--iters` steps. On CUDA every measurement synchronises, which slows the step itself.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.profile import parse_size, sync, synthetic_batch  # noqa: E402
from codetr.config import apply_overrides, get_preset  # noqa: E402
from codetr.engine.memory import keep_freed_memory_for_reuse  # noqa: E402
from codetr.engine.optim import build_optimizer  # noqa: E402
from codetr.models.criterion import build_criterion  # noqa: E402
from codetr.models.checkpointing import use_activation_checkpointing  # noqa: E402
from codetr.models.detector import build_detector  # noqa: E402
from codetr.models.total_loss import weighted_total  # noqa: E402


class ModuleProfile:
    """Forward time and saved-for-backward bytes per named module (to a depth), collected by hooks."""

    def __init__(self, model: nn.Module, depth: int, device: torch.device) -> None:
        self.device = device
        self.forward_s: dict[str, list[float]] = defaultdict(list)
        self.saved_bytes: dict[str, int] = defaultdict(int)
        self.stack: list[tuple[str, float]] = []
        self.names = {module: name for name, module in model.named_modules()
                      if name and name.count(".") < depth}
        self.handles = []
        for module in self.names:
            self.handles.append(module.register_forward_pre_hook(self._enter))
            self.handles.append(module.register_forward_hook(self._exit))

    def _enter(self, module: nn.Module, _inputs) -> None:
        sync(self.device)
        self.stack.append((self.names[module], time.perf_counter()))

    def _exit(self, module: nn.Module, _inputs, _output) -> None:
        sync(self.device)
        name, start = self.stack.pop()
        self.forward_s[name].append(time.perf_counter() - start)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        size = tensor.numel() * tensor.element_size()
        for name in {name for name, _ in self.stack}:
            self.saved_bytes[name] += size
        return tensor

    @contextmanager
    def counting_saved_tensors(self):
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor):
            yield

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def timed(device: torch.device, function, *args):
    sync(device)
    start = time.perf_counter()
    result = function(*args)
    sync(device)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="deformable_detr_r50_1x")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override KEY=VALUE")
    parser.add_argument("--size", default="800x1216", help="HxW of the synthetic images")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3, help="profiled steps (medians reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--depth", type=int, default=3, help="module tree levels shown (lists are a level)")
    parser.add_argument("--top-ops", type=int, default=15)
    parser.add_argument("--num-classes", type=int, default=80)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    cfg = apply_overrides(get_preset(args.preset), args.overrides)
    height, width = parse_size(args.size)
    if device.type == "cpu" and cfg.train.reuse_freed_memory:  # as the Trainer does
        keep_freed_memory_for_reuse()
    torch.manual_seed(0)
    model = build_detector(cfg.model, args.num_classes).to(device)
    use_activation_checkpointing(model, cfg.train.activation_checkpointing).train()
    criterion = build_criterion(model, cfg.model)
    optimizer = build_optimizer(model, cfg.optim)
    images, masks, targets = synthetic_batch(args.batch, height, width, args.num_classes, device)

    def step(profile: ModuleProfile | None = None) -> dict[str, float]:
        phases = {}
        optimizer.zero_grad(set_to_none=True)
        if profile is not None:
            with profile.counting_saved_tensors():
                outputs, phases["forward"] = timed(device, model, images, masks, targets)
        else:
            outputs, phases["forward"] = timed(device, model, images, masks, targets)
        losses, phases["losses (matcher included)"] = timed(device, criterion, outputs, targets)
        _, phases["  of which the matcher"] = timed(device, lambda: [criterion.matcher(l, b, targets)
                                                                    for l, b in outputs.layers])
        total, _ = weighted_total(losses, criterion.weights)
        _, phases["backward"] = timed(device, total.backward)
        _, phases["optimizer (clip + step)"] = timed(device, lambda: (
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_max_norm), optimizer.step()))
        return phases

    for _ in range(args.warmup):
        step()
    profile = ModuleProfile(model, args.depth, device)
    phase_runs = [step(profile) for _ in range(args.iters)]
    profile.remove()

    print(f"{args.preset}: {height}x{width} x {args.batch} on {device}, median of {args.iters} steps")
    print(f"\n{'phase':<32}{'seconds':>10}")
    for phase in phase_runs[0]:
        print(f"{phase:<32}{statistics.median(run[phase] for run in phase_runs):>10.3f}")
    print("(the matcher's line re-runs it on its own: it is inside the losses' time, not added to the step)")

    print(f"\n{'module (forward, inclusive)':<58}{'fwd s':>9}{'saved MB':>10}")
    for name in (n for n in profile.names.values() if n in profile.forward_s):  # the model's tree order
        calls = profile.forward_s[name]
        seconds = sum(calls) / args.iters
        print(f"{'  ' * name.count('.') + name:<58}{seconds:>9.3f}{profile.saved_bytes[name] / args.iters / 2**20:>10.1f}")

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        step()
    sort_key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print("\noperators of one step by self time (forward and backward):")
    print(prof.key_averages().table(sort_by=sort_key, row_limit=args.top_ops))


if __name__ == "__main__":
    main()
