"""A stage's CPU arithmetic does not depend on the machine: the CLI pins torch's kernels and thread count
(numerics.py), so an environment that picks other kernels or threads leaves every byte as it was."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from attnsae import numerics

pytestmark = pytest.mark.skipif(not numerics.is_x86(), reason="the pinned kernels are x86-64's (AVX2)")

# Three computations whose bytes depend on the kernels or the thread count when nothing is pinned: a long sum
# (split over threads), attention (torch's vectorized kernel) and a matmul (MKL).
PROBE = """
import hashlib, json, torch
torch.manual_seed(0)
digest = lambda t: hashlib.md5(t.contiguous().numpy().tobytes()).hexdigest()
q, k, v = (torch.randn(2, 4, 96, 64) for _ in range(3))
print(json.dumps({
    "sum": digest(torch.randn(3_000_000).sum().reshape(1)),
    "attention": digest(torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)),
    "matmul": digest(torch.randn(256, 576) @ torch.randn(576, 2304)),
    "capability": torch.backends.cpu.get_cpu_capability(),
    "threads": torch.get_num_threads(),
}))
"""
# The way every stage starts: the CLI module first (it pins the kernels), then the stage picks its device.
AS_A_STAGE = "import attnsae.cli\nfrom attnsae.data.models import resolve_device\nresolve_device('cpu')\n"
# What other machines choose: torch's scalar kernels, MKL's oldest code path, one thread.
ANOTHER_MACHINE = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "OMP_NUM_THREADS": "1"}


def probe(code: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in ANOTHER_MACHINE and k not in numerics.PORTABLE_KERNELS}
    done = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout.splitlines()[-1])


def test_a_stage_computes_the_same_bytes_whatever_kernels_and_threads_the_environment_picks():
    here, elsewhere = probe(AS_A_STAGE + PROBE), probe(AS_A_STAGE + PROBE, **ANOTHER_MACHINE)
    assert here == elsewhere
    assert here["capability"] == numerics.PINNED_CAPABILITY and here["threads"] == numerics.CPU_THREADS


def test_without_the_pin_those_choices_change_the_bytes():
    """The control: the same probe without attnsae differs under the other machine's choices, so the test above
    can fail."""
    here, elsewhere = probe(PROBE), probe(PROBE, **ANOTHER_MACHINE)
    changed = [name for name in ("sum", "attention", "matmul") if here[name] != elsewhere[name]]
    assert changed, (here, elsewhere)


def test_a_program_that_ran_torch_before_the_pin_is_told():
    code = ("import torch\ntorch.ones(1).sum()\nimport warnings\nwarnings.simplefilter('error')\n"
            "from attnsae.data.models import resolve_device\n"
            "try:\n    resolve_device('cpu')\nexcept UserWarning as w:\n    print(w)\n")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "ATEN_CPU_CAPABILITY": "default"},
                          capture_output=True, text=True, check=True)
    assert "attnsae.numerics.pin_kernels()" in done.stdout
