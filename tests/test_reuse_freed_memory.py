"""train.reuse_freed_memory: with glibc keeping freed memory, a step's large tensors come back without page
faults. Measured in fresh processes (the setting changes the process's allocator)."""
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    from codetr.engine.memory import keep_freed_memory_for_reuse
    if sys.argv[1] == "reuse":
        assert keep_freed_memory_for_reuse()
    SIZES_MB = [20, 164, 40, 20, 82]  # a training step's large activations, alive together, then all freed
    def step():
        tensors = [torch.empty(mb * 2**20 // 4) for mb in SIZES_MB]  # most above glibc's mmap threshold (32 MB)
        for tensor in tensors:
            tensor.fill_(1.0)  # touch every page
    step()
    step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        step()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def page_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True).stdout
    return int(out.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_reused_without_page_faults() -> None:
    default, reuse = page_faults("default"), page_faults("reuse")
    pages = 3 * (20 + 164 + 40 + 20 + 82) * 2**20 // 4096  # 3 steps in 4 KiB pages
    assert default > 0.5 * pages  # unmapped and faulted in again every step
    assert reuse < 0.25 * pages  # reused (glibc may still place one block afresh)
