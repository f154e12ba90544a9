"""`attnsae plan`: the cost model on the published recipe, and the printed estimate."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from attnsae import config
from attnsae.cli import main
from attnsae.plan import lm_forward_flop, plan_layer

PROFILES = Path(__file__).resolve().parents[1] / "profiles"


def test_paper_layer_costs_match_design_numbers():
    params = config.read_params(PROFILES / "gpt2-small.yaml")
    lp = plan_layer(0, config.sae_config(params, 0), d_in=768)
    assert lp.steps == 488_281  # 2e9 tokens / 4096
    assert lp.tokens == 488_281 * 4096
    # ~226 MFLOP per token (docs/design.md 7): 12 * 768 * 24576
    assert lp.sae_flop / lp.tokens == 12 * 768 * 24576
    assert lp.buffer_bytes == 1_572_864 * 768 * 2
    assert lp.sae_bytes == (2 * 768 * 24576 + 24576 + 768) * 16
    wide = plan_layer(5, config.sae_config(params, 5), d_in=768)
    assert wide.d_sae == 49152 and wide.sae_flop == 2 * lp.sae_flop


def test_one_forward_for_all_layers_costs_a_twelfth():
    assert lm_forward_flop(124_439_808, 1000, 12) == 12 * lm_forward_flop(124_439_808, 1000, 1)


def test_plan_prints_every_layer_and_an_estimate():
    result = CliRunner().invoke(main, ["plan", "--params", str(PROFILES / "gpt2-small.yaml"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if line.strip().split(" ")[0].isdigit()]
    assert len(rows) == 12
    assert "488,281" in rows[0] and "49152" in rows[5]
    assert "time at the fp32 matmul roofline (optimistic" in result.output
    assert "with one pass for all layers" in result.output
    # weights + two Adam moments (12 bytes per parameter) of 10 SAEs at 24576 and 2 at 49152, plus 12 bf16 buffers
    params = 10 * (2 * 768 * 24576 + 24576 + 768) + 2 * (2 * 768 * 49152 + 49152 + 768)
    checkpoint = params * 12 + 12 * 1_572_864 * 768 * 2
    assert ("size of one training checkpoint (SAEs, Adam state, shuffled buffers): "
            f"{checkpoint / 2**30:.1f} GiB" in result.output)


def test_plan_adds_the_dashboards_cost():
    result = CliRunner().invoke(main, ["plan", "--params", str(PROFILES / "gpt2-small.yaml"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("dashboards:")))
    # every held-out row (tokenize.max_eval_rows 2560 x 128): the dashboards read what evaluate reads, and more
    assert lines[start].startswith("dashboards: 327,680 tokens per layer (2,560 evaluation rows), 30 cards")
    per_layer = lines[start + 1 : start + 13]
    assert [line.split(":")[0].strip() for line in per_layer] == [f"L{n}" for n in range(12)]
    # the model runs to layer L only: layer 11's forward costs 12 times layer 0's
    model = [float(line.split("model ")[1].split(",")[0]) for line in per_layer]
    assert model[11] == pytest.approx(12 * model[0], rel=0.01)
    assert "memory of one layer: 100.0 MiB of firings at L0 20" in lines[start + 13]


def test_plan_adds_the_evaluate_cost_with_its_shared_clean_pass():
    result = CliRunner().invoke(main, ["plan", "--params", str(PROFILES / "quickstart.yaml"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("evaluate:")]
    # layers 3, 10, 17, 24 of 30: 1 + 6 / 30 (the clean logits on from layer 24) + 2 (27 + 20 + 13 + 6) / 30 passes
    # together; apart (3 + 10 + 17 + 24) / 30 + 3 (27 + 20 + 13 + 6) / 30
    assert line.startswith("evaluate: 40,960 tokens (256 evaluation + 64 held-out rows), 5.6 model passes per token "
                           "for all layers (8.4 evaluated apart)")


def test_processes_time_is_the_slowest_ranks_layers_and_its_own_forward():
    from attnsae.plan import LayerPlan, processes_time

    plans = [LayerPlan(n, d_sae=100, tokens=1000, steps=1, sae_flop=0.0, sae_bytes=0, buffer_bytes=0)
             for n in range(12)]
    # 12 layers over 8 processes: four ranks hold two layers; each rank also runs the model over all 1000 tokens
    assert processes_time(plans, step_rate=10.0, widest=100, forward_rate=50.0, processes=8) == 2 * 100 + 20
    assert processes_time(plans, step_rate=10.0, widest=100, forward_rate=50.0, processes=1) == 12 * 100 + 20
    wide = [LayerPlan(0, d_sae=200, tokens=1000, steps=1, sae_flop=0.0, sae_bytes=0, buffer_bytes=0)]
    assert processes_time(wide + plans[:1], step_rate=10.0, widest=200, forward_rate=50.0, processes=2) == 100 + 20


def test_plan_measures_the_step_and_gives_the_time_for_n_processes():
    result = CliRunner().invoke(main, ["plan", "--params", str(PROFILES / "gpt2-small.yaml"), "--device", "cpu",
                                       "--processes", "4"])
    assert result.exit_code == 0, result.output
    assert "measured training step (standard, bf16, dense kernel, d_sae 49152, batch 64) on cpu: " in result.output
    (forward,) = [line for line in result.output.splitlines() if line.startswith("measured harvesting forward")]
    assert forward.startswith("measured harvesting forward (hook_z at layers 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, "
                              "1 rows of 128, 2 of 12 blocks timed) on cpu: ")
    assert float(forward.split(": ")[1].split(" tokens/s")[0].replace(",", "")) > 0
    (line,) = [line for line in result.output.splitlines() if line.startswith("training time at the measured step")]
    assert "1 process " in line and "4 processes " in line


def test_the_measured_forward_is_the_harvesting_forward_of_the_profiles_shape(monkeypatch):
    """Built from config.json alone, up to the last needed layer, weights zeroed: the forward the stream trainer
    runs; on a CPU through its first two blocks, scaled to all."""
    from attnsae.data import harvest
    from attnsae.plan import measure_forward

    seen = []
    original = harvest.HarvestingForward.__call__
    monkeypatch.setattr(harvest.HarvestingForward, "__call__",
                        lambda self, tokens: seen.append((self, tokens.shape)) or original(self, tokens))
    params = config.read_params(PROFILES / "pythia-70m.yaml")
    params["layers"] = [0, 2]
    params["tokenize"]["context_size"] = 512
    timing = measure_forward(params, torch.device("cpu"))
    assert timing.tokens_per_s > 0 and (timing.rows, timing.length) == (1, 128)  # one row, of at most 128 tokens
    assert (timing.blocks_timed, timing.blocks) == (2, 3)
    forward, measured = seen[-1]
    assert measured == (1, 128) and forward.layers == [0, 1]  # layer 0's hook, and the last block built
    assert len(harvest.decoder_layers(forward.model)) == 2
    assert all(float(p.detach().abs().max()) == 0 for p in forward.model.parameters())

    params["layers"] = [1]
    assert (measure_forward(params, torch.device("cpu")).blocks_timed, seen[-1][0].layers) == (2, [1])
    params["layers"] = [0]
    assert (measure_forward(params, torch.device("cpu")).blocks_timed, seen[-1][0].layers) == (1, [0])


def test_a_cpu_forward_timed_over_some_blocks_is_scaled_to_all(monkeypatch):
    """Blocks of one model cost alike: the rate through 2 of 6 blocks is a third of the rate measured over 2."""
    from attnsae import plan

    clock = iter([10.0, 10.5])  # two forwards (after the warm-up) through the two blocks built take 0.5 s
    monkeypatch.setattr(plan, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    params = config.read_params(PROFILES / "pythia-70m.yaml")
    timing = plan.measure_forward(params, torch.device("cpu"))
    assert (timing.blocks_timed, timing.blocks) == (2, 6)
    assert timing.tokens_per_s == pytest.approx(2 * 128 / 0.5 * 2 / 6)


@pytest.mark.parametrize("profile, model_line, rows, largest", [
    ("gemma-2-2b", "model: Gemma2ForCausalLM, 2,614.3M parameters, 26 layers, 8 heads x 256 (4 key/value heads), "
     "hook_z width 2048 (from its config.json)", 26, "train 64.9 GiB"),
    ("pythia-70m", "model: GPTNeoXForCausalLM, 70.4M parameters, 6 layers, 8 heads x 64 (8 key/value heads), "
     "hook_z width 512 (from its config.json)", 6, "evaluate 12.5 GiB"),
])
def test_plan_prices_a_hub_model_from_its_config_alone(profile, model_line, rows, largest):
    """No hub here (HF_HUB_OFFLINE) and no weights: the config.json attnsae ships for the profile's model is enough."""
    result = CliRunner().invoke(main, ["plan", "--params", str(PROFILES / f"{profile}.yaml"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[1] == model_line
    assert len([line for line in lines if line.strip().split(" ")[0].isdigit()]) == rows
    assert any(line.endswith(largest) and line.startswith("largest stage in memory") for line in lines)
