"""Peak memory of this process, on the device that does the work."""
from __future__ import annotations

import resource

import torch


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: the peak of allocated tensor memory (torch.cuda.max_memory_allocated). CPU: the process's
    peak resident set size (ru_maxrss, which Linux reports in KiB), so it includes the Python runtime."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
