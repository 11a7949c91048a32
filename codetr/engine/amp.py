"""Mixed precision on CUDA: bf16 where the GPU has it natively, else fp16 with a GradScaler; nothing on CPU.

Training and evaluation use the same choice, so a model trained in bf16 is never evaluated in fp16
(whose range, 65504, bf16 activations can exceed).
"""
from __future__ import annotations

from contextlib import nullcontext

import torch


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `device`, or None for no autocast (CPU)."""
    if device.type != "cuda":
        return None
    # including_emulation=False: GPUs without bf16 units (V100, T4) report bf16 as "supported" through
    # slow emulation; they get fp16 instead.
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def autocast_context(device: torch.device, enabled: bool):
    dtype = amp_dtype(device) if enabled else None
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else nullcontext()


def needs_grad_scaler(device: torch.device, enabled: bool) -> bool:
    return enabled and amp_dtype(device) == torch.float16
