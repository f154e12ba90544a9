"""The cache pipeline end to end on a family other than GPT-2: the tiny profile with a tiny Gemma 2 (grouped value
heads, d_head != d_model / n_heads, sliding-window layers, soft-capping, pre- and post-norms) from a ``local:`` folder,
through every stage (issue 22, item 4; the tiny GPT-2 runs in conftest's tiny_pipeline)."""

from __future__ import annotations

import json

import pytest
import yaml

from attnsae.profiles import profile_pipeline
from helpers import pipeline_repository, run, stages_run, status_after_changing
from loopback_hub import serve
from test_gemma_scope import publish as publish_gemma_scope
from test_model_families import random_family_weights, save_model_folder

pytestmark = pytest.mark.integration


def test_tiny_profile_runs_end_to_end_on_a_gemma2_from_a_local_folder(tmp_path):
    import os

    root = tmp_path / "repo"
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    pipeline_repository(root, env, "tiny", commit=False)
    save_model_folder(random_family_weights("gemma2"), root / "family-model")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["model"]["source"] = "local:family-model"
    params["report"]["compare"] = "none"
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / "dvc.yaml").write_text(profile_pipeline(root, "tiny", params))

    output = run(["dvc", "repro"], root, env)
    assert stages_run(output) >= {"params", "model", "corpus", "tokenize", "activations", "train@1", "train@2",
                                  "evaluate", "dashboards@1", "dashboards@2", "report", "publish@1", "publish@2"}
    info = json.loads((root / "models" / "base" / "attnsae_model.json").read_text())
    assert (info["n_heads"], info["d_head"], info["source"]) == (4, 16, "local:family-model")
    for layer in (2, 1):
        metrics = json.loads((root / "reports" / "metrics" / f"L{layer}.json").read_text())
        assert metrics["ce_zero"] != metrics["ce_clean"] and 0 < metrics["l0"]
        features = json.loads((root / "reports" / "dashboards" / f"L{layer}" / "features.json").read_text())
        for card in features["cards"]:
            for example in card["top_examples"][:2]:
                dfa = example["dfa"]
                assert abs(dfa["total"] + dfa["bias_remainder"] - dfa["pre_activation"]) < 1e-4
            assert len(card["logits"]["top"]) == params["dashboards"]["logit_tokens"]
    card = (root / "models" / "published" / "L1" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert "license" not in front and "base_model" not in front  # a folder has no hub id, and its licence is unknown
    assert "attnsae model source `local:family-model`" in card and "No licence is set" in card
    # the folder is the model stage's dep: changing a file of it reruns the model stage
    status = status_after_changing(root / "family-model" / "config.json", root, env)
    assert status == {"model": [{"changed deps": {"family-model": "modified"}}]}
    assert "verify: OK" in run(["attnsae", "verify", "--layer", "1"], root, env)

    # Gemma Scope's SAEs, as the gemma-2-2b pipeline's published-SAE stages take them: imported from (loopback) hub
    # files of the published layout, then evaluated and given dashboards on the same tokens as ours
    hub = tmp_path / "hub"
    publish_gemma_scope(hub, 1, 20, seed=5)
    online = {**env, "HF_HUB_OFFLINE": "0"}
    with serve(hub) as url:
        run(["attnsae", "import", "--set", "gemma-scope-2b-att", "--layer", "1", "--width", "16k", "--l0", "100",
             "--endpoint", url, "--out", "models/imported"], root, online)
    run(["attnsae", "evaluate", "--sae", "models/imported/L1", "--no-mlflow",
         "--out", "reports/imported/metrics/L1.json", "--density", "reports/imported/density/L1.csv"], root, env)
    run(["attnsae", "dashboards", "--sae", "models/imported/L1", "--out", "reports/imported/dashboards/L1",
         "--no-mlflow"], root, env)
    imported = json.loads((root / "reports" / "imported" / "metrics" / "L1.json").read_text())
    assert imported["eval_tokens"] == metrics["eval_tokens"] and 0 < imported["l0"]  # the same tokens as ours
    page = json.loads((root / "reports" / "imported" / "dashboards" / "L1" / "features.json").read_text())
    assert page["sae"] == "models/imported/L1" and page["cards"]
