"""The same bytes from every x86-64 CPU: the kernels and the thread count a stage's float arithmetic runs with.

A float sum depends on the order of its terms, and on a CPU torch chooses that order by machine: its own kernels
come in SSE, AVX2 and AVX-512 builds picked by what the CPU has, MKL picks a code path by CPU vendor and model,
and a reduction is split over as many threads as there are cores. So the quickstart made on an Intel Xeon and
rerun on an AMD EPYC (both AVX-512, both 2 cores) gave other activations and, downstream, other SAEs (loss
recovered 0.787 against 0.778 at layer 10; docs/design.md 8). attnsae pins both choices on a CPU: the AVX2
kernels, which every x86-64 CPU made since 2013 runs (torch's own, and MKL's in its strict reproducible mode: fp32
matmuls and attention go through MKL), and ``CPU_THREADS`` threads. The kernels are chosen once per process, at
torch's first operation, so the CLI pins them before it imports anything else (``pin_kernels``); the thread count
is set where a stage picks its device (``data.models.resolve_device``). Not covered: GPUs (their results differ by
card and driver), and bf16 on a CPU (never the default): oneDNN runs it, on AVX512-BF16 or AMX where the CPU has
them, and pinning oneDNN to AVX2 made it 150x slower (0.6 against 92 GFLOP/s, measured here).
"""

from __future__ import annotations

import os
import platform
import warnings

# The quickstart's machine has 2 cores; a larger machine runs the same 2 threads, so its bytes are the same.
CPU_THREADS = 2
# Read by torch (its vectorized kernels) and MKL (BLAS: STRICT makes it independent of the thread count too) at their
# first use in a process.
PORTABLE_KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2,STRICT"}
PINNED_CAPABILITY = "AVX2"  # what torch.backends.cpu.get_cpu_capability() says once the pin took effect


def is_x86() -> bool:
    return platform.machine().lower() in {"x86_64", "amd64"}


def pin_kernels() -> None:
    """Make torch and MKL use their AVX2 kernels in this process, whatever the environment says. Call it
    before torch runs any operation: torch reads its choice once, at the first."""
    if is_x86():
        os.environ.update(PORTABLE_KERNELS)


def pin_cpu_threads() -> None:
    """Run torch's CPU operations on ``CPU_THREADS`` threads, and say once if the kernels were not pinned in time
    (torch ran an operation before ``pin_kernels``, as a program that imports attnsae's stages may)."""
    import torch

    torch.set_num_threads(CPU_THREADS)
    if is_x86() and torch.backends.cpu.get_cpu_capability() != PINNED_CAPABILITY:
        warnings.warn(f"torch runs its {torch.backends.cpu.get_cpu_capability()} kernels, not the "
                      f"{PINNED_CAPABILITY} ones attnsae pins: call attnsae.numerics.pin_kernels() before torch's "
                      "first operation, or float results may differ from other machines'", stacklevel=2)
