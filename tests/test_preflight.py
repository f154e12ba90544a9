"""The params check's judgements beyond each value's range (preflight.py): the model's bounds, the devices, and each
stage's memory and the cache's disk against a machine. Machines are made up, so the table holds on any machine."""

from __future__ import annotations

import copy

import pytest
import yaml
from click.testing import CliRunner

from attnsae import preflight
from attnsae.cli import main
from attnsae.errors import UserError
from attnsae.preflight import Machine
from test_params_ranges import with_value

GIB = 2**30
LAPTOP = Machine(memory_bytes=16 * GIB, cuda_memory_bytes=None, cache_disk_bytes=100 * GIB)
GPU_BOX = Machine(memory_bytes=128 * GIB, cuda_memory_bytes=80 * GIB, cache_disk_bytes=1000 * GIB)


def with_layers(params: dict, layers: list[int]) -> dict:
    params["layers"] = layers
    params["per_layer"] = {f"L{layer}": {} for layer in layers}
    return params


def with_values(params: dict, values: dict) -> dict:
    for key_path, value in values.items():
        with_value(params, key_path, value)
    return params


# (change to tiny.yaml, machine, what the one line must say): tiny-gpt2 has 4 layers, 256 positions, 257 tokens,
# hook_z width 64; tiny.yaml trains d_sae 256 at layers 1 and 2.
REFUSED = [
    # the model's bounds (measured by a user: the activations and tokenize stages' outputs deleted, then a failure)
    (lambda p: with_layers(p, [1, 2, 99]), LAPTOP,
     "params.yaml: bad value for 'layers': layer 99 is not in tiny-gpt2 (allowed: 0 to 3)"),
    (lambda p: with_layers(p, [4]), LAPTOP, "layer 4 is not in tiny-gpt2 (allowed: 0 to 3)"),
    (lambda p: with_value(p, "tokenize.context_size", 100000), LAPTOP,
     "params.yaml: bad value for 'tokenize.context_size': tiny-gpt2 takes at most 256 positions (allowed: 2 to 256, "
     "got 100000)"),
    (lambda p: with_value(p, "dashboards.logit_tokens", 300), LAPTOP,
     "params.yaml: bad value for 'dashboards.logit_tokens': tiny-gpt2 has 257 tokens (allowed: 1 to 257, got 300)"),
    # the report's reference (the report stage checked it after DVC had deleted the report)
    (lambda p: with_value(p, "report.compare", "published"), LAPTOP,
     "report.compare: 'published' is the GPT-2 Small table, but this run's model is tiny-gpt2"),
    (lambda p: with_value(p, "report.compare", "runs/earlier/metrics"), LAPTOP,
     "params.yaml: bad value for 'report.compare': 'runs/earlier/metrics' is not a folder (allowed: auto, published, "
     "none, or a folder of L<n>.json metrics files)"),
    # the devices (measured: evaluate's git-tracked metrics deleted, then a failure)
    *[(lambda p, key=key: with_value(p, key, "cuda"), LAPTOP,
       f"params.yaml: bad value for '{key}': this machine has no CUDA device (allowed here: auto, cpu; got 'cuda')")
      for key in preflight.DEVICE_KEYS],
    # memory: a lower bound per stage, against the memory of the device the stage runs on
    (lambda p: with_value(p, "sae.buffer_rows", 2**31), LAPTOP,
     "params.yaml: stage train@1 needs at least 256.0 GiB of machine memory and this machine has 16.0 GiB; the largest "
     "part is the shuffled buffer of 2,147,483,648 bf16 rows (256.0 GiB): lower 'sae.buffer_rows'"),
    (lambda p: with_value(p, "sae.buffer_rows", 2**30), GPU_BOX,
     "stage train@1 needs at least 128.0 GiB of CUDA memory and this machine has 80.0 GiB"),
    (lambda p: with_values(p, {"per_layer.L2.d_sae": 2**25, "sae.batch_size": 16}), LAPTOP,
     "stage train@2 needs at least 70.5 GiB of machine memory and this machine has 16.0 GiB; the largest part is the "
     "SAE of width 33554432 with Adam state (64.5 GiB): lower 'per_layer.L2.d_sae'"),
    (lambda p: with_values(p, {"sae.d_sae": 2**14, "sae.batch_size": 2**20, "sae.train_tokens": 2**20,
                               "sae.buffer_rows": 2**21}), LAPTOP,
     "stage train@1 needs at least 192.3 GiB of machine memory and this machine has 16.0 GiB; the largest part is one "
     "batch's pre-activations, activations and their gradient (192.0 GiB): lower 'sae.batch_size'"),
    (lambda p: with_values(p, {"dashboards.null_directions": 2**16, "dashboards.batch_rows": 2**16}), LAPTOP,
     "stage dashboards@1 needs at least 1.0 TiB of machine memory"),
    # disk: the activation cache (bf16 hook_z of every layer)
    (lambda p: with_value(p, "activations.tokens", 10**12), LAPTOP,
     "params.yaml: bad value for 'activations.tokens': the activation cache needs 232.8 TiB of disk "
     "and data/activations has 100.0 GiB"),
]


@pytest.mark.parametrize(("change", "machine", "expected"), REFUSED,
                         ids=[expected[:60] for _, _, expected in REFUSED])
def test_refused_in_one_line(tiny_params, change, machine, expected):
    with pytest.raises(UserError) as err:
        preflight.check(change(tiny_params), machine)
    assert "\n" not in str(err.value)
    assert expected in str(err.value)


@pytest.mark.parametrize("machine", [LAPTOP, GPU_BOX])
def test_the_tiny_and_quickstart_profiles_pass(tiny_params, machine):
    from attnsae import config
    from helpers import REPO

    preflight.check(tiny_params, machine)
    preflight.check(config.read_params(REPO / "profiles" / "quickstart.yaml"), machine)


@pytest.mark.parametrize("name", ["gpt2-small", "gpt2-small-topk"])
def test_the_paper_profiles_fit_one_80_gib_gpu_and_not_a_laptop(name):
    """12 layers train in one process: every SAE and buffer at once (37.6 GiB) beside GPT-2 Small."""
    from attnsae import config
    from helpers import REPO

    params = config.read_params(REPO / "profiles" / f"{name}.yaml")
    preflight.check(params, GPU_BOX)
    with pytest.raises(UserError, match="stage train needs at least 37.6 GiB of machine memory"):
        preflight.check(params, LAPTOP)


def test_gemma_2_2b_fits_one_80_gib_gpu_and_not_a_laptop():
    """26 layers stream into one process: every SAE and (smaller) buffer at once, beside Gemma 2 2B's weights."""
    from attnsae import config
    from helpers import REPO

    params = config.read_params(REPO / "profiles" / "gemma-2-2b.yaml")
    preflight.check(params, GPU_BOX)
    with pytest.raises(UserError, match="stage train needs at least 64.9 GiB of machine memory"):
        preflight.check(params, LAPTOP)


def test_a_reference_folder_that_a_stage_makes_need_not_exist_yet(tiny_params):
    preflight.check(with_value(tiny_params, "report.compare", "reports/imported/metrics"), LAPTOP)


def test_cuda_is_fine_on_a_machine_with_one(tiny_params):
    for key in preflight.DEVICE_KEYS:
        with_value(tiny_params, key, "cuda")
    preflight.check(tiny_params, GPU_BOX)


def test_a_stage_on_the_cpu_is_set_against_machine_memory_even_beside_a_gpu(tiny_params):
    # 96 GiB: fits the machine
    with_value(with_value(tiny_params, "sae.device", "cpu"), "sae.buffer_rows", 2**29 + 2**28)
    preflight.check(tiny_params, GPU_BOX)  # though not the GPU
    with pytest.raises(UserError, match="of CUDA memory"):
        preflight.check(with_value(tiny_params, "sae.device", "auto"), GPU_BOX)


def test_the_stream_pipeline_holds_every_layer_at_once(tiny_params):
    """Two layers each within memory alone, but not together: refused for one streamed train stage, not for two."""
    with_value(tiny_params, "sae.buffer_rows", 2**26 + 2**25)  # 12 GiB per layer on a 16 GiB machine
    preflight.check(tiny_params, LAPTOP)
    with pytest.raises(UserError, match="stage train needs at least 24.0 GiB"):
        preflight.check(with_value(tiny_params, "activations.source", "stream"), LAPTOP)


def test_stage_needs_are_lower_bounds_that_grow_with_every_size(tiny_params):
    shape = preflight.check_params(tiny_params)
    base = {stage.stage: stage.bytes for stage in preflight.stage_needs(tiny_params, shape)}
    for key, value in [("sae.buffer_rows", 2**20), ("sae.batch_size", 2**12), ("sae.resample_inputs", 2**20)]:
        grown = {s.stage: s.bytes
                 for s in preflight.stage_needs(with_value(copy.deepcopy(tiny_params), key, value), shape)}
        assert grown["train@1"] > base["train@1"], key


def test_check_params_refuses_before_writing_and_keeps_the_old_file(tiny_params, tmp_path, monkeypatch):
    monkeypatch.setattr(preflight, "this_machine", lambda root=".": LAPTOP)
    params, out = tmp_path / "params.yaml", tmp_path / "params-check.txt"
    out.write_text("earlier\n")
    params.write_text(yaml.safe_dump(with_value(tiny_params, "sae.buffer_rows", 2**31)))
    result = CliRunner().invoke(main, ["check-params", "--params", str(params), "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert result.stderr.strip().splitlines() == [
        "Error: params.yaml: stage train@1 needs at least 256.0 GiB of machine memory and this machine has 16.0 GiB; "
        "the largest part is the shuffled buffer of 2,147,483,648 bf16 rows (256.0 GiB): lower 'sae.buffer_rows'"]
    assert out.read_text() == "earlier\n"


def test_a_binary_params_file_is_one_line(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_bytes(b"\xff\xfe")
    result = CliRunner().invoke(main, ["check-params", "--params", str(path), "--out", str(tmp_path / "out.txt")])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        f"Error: {path}: not a text file (byte 0 is not UTF-8); params files are UTF-8 YAML"]


def test_this_machine_reads_real_numbers(tmp_path):
    machine = preflight.this_machine(tmp_path)
    assert machine.memory_bytes > GIB and machine.cache_disk_bytes > 0
