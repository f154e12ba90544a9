"""The streaming pipeline end to end: the gpt2-small profile, shrunk to tiny-gpt2 and a tiny budget."""

from __future__ import annotations

import json

import pytest
import yaml

from attnsae.profiles import profile_pipeline
from attnsae.sae.autoencoder import load_sae
from helpers import REPO, pipeline_repository, run, stages_run, status_after_changing

pytestmark = pytest.mark.integration


def test_gpt2_small_profile_streams_end_to_end_on_tiny_gpt2(tmp_path):
    import os

    root = tmp_path / "repo"
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    pipeline_repository(root, env, "gpt2-small", commit=False)
    assert "attnsae train --stream --all-layers" in (root / "dvc.yaml").read_text()

    params = yaml.safe_load((root / "params.yaml").read_text())
    params["model"]["source"] = "tiny-gpt2"
    params["corpus"] = {"sources": ["synthetic"], "max_documents": 0, "synthetic_documents": 80}
    params["tokenize"].update(context_size=64, eval_fraction=0.1, max_eval_rows=8)
    params["activations"]["batch_rows"] = 16
    params["layers"] = [1, 3]
    params["per_layer"] = {"L1": {"l1_coeff": 0.01}, "L3": {"l1_coeff": 0.02, "d_sae": 192}}
    params["sae"].update(d_sae=128, batch_size=256, train_tokens=256 * 24, warmup_steps=4, resample_every=10,
                         dead_window=5, max_resamples=1, resample_inputs=512, buffer_rows=2048, log_every=4)
    params["evaluate"].update(batch_rows=8, max_rows=8)
    params["dashboards"].update(batch_rows=8, first_n=4, probe_prompts=4, null_directions=32)
    params["report"]["compare"] = "none"  # the published table is GPT-2 Small's, not tiny-gpt2's
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # tiny-gpt2 has no published SAEs: the profile's pipeline for it has no stages for them.
    (root / "dvc.yaml").write_text(profile_pipeline(root, "gpt2-small", params))

    output = run(["dvc", "repro"], root, env)
    assert stages_run(output) == {"params", "model", "corpus", "tokenize", "train", "evaluate",
                                  "dashboards@1", "dashboards@3", "report", "publish@1", "publish@3"}
    assert "fed 2 SAEs" in output
    assert not (root / "data" / "activations").exists()
    # the text is never stored: the corpus is a manifest, the tokens are the eval rows
    assert [p.name for p in (root / "data" / "corpus").iterdir()] == ["manifest.json"]
    assert sorted(p.name for p in (root / "data" / "tokens").iterdir()) == ["eval.npy", "meta.json"]
    assert list((root / "checkpoints").glob("*.pt")) == []  # a finished run leaves no checkpoint
    for layer, d_sae in ((1, 128), (3, 192)):
        sae, cfg = load_sae(root / "models" / "sae" / f"L{layer}")
        assert sae.d_sae == d_sae and cfg["hook_name"] == f"blocks.{layer}.attn.hook_z"
        metrics = json.loads((root / "reports" / "metrics" / f"L{layer}.json").read_text())
        assert metrics["dead_fraction_tokens"] == 8 * 64
    assert stages_run(run(["dvc", "repro"], root, env)) == set()
    # The launcher places `train --stream`'s workers: here, and only here, it is a stage's code.
    status = status_after_changing(root / "src" / "attnsae" / "launcher.py", root, env)
    assert status == {"train": [{"changed deps": {"src/attnsae/launcher.py": "modified"}}]}


def test_committed_dvc_yaml_is_the_pipeline_of_the_active_profile():
    from attnsae import config
    from attnsae.profiles import profile_pipeline

    params = config.read_params(REPO / "params.yaml")
    assert (REPO / "dvc.yaml").read_text() == profile_pipeline(REPO, params["profile"], params)
