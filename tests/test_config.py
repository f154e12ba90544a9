"""Typed config: unknown or mistyped keys rejected by name, per-layer overrides, layer parsing, profiles."""

from __future__ import annotations

import copy

import pytest
import yaml

from attnsae import config
from attnsae.errors import UserError
from helpers import REPO

PROFILE_PATHS = sorted((REPO / config.PROFILES_DIR).glob("*.yaml"))

BASE = {
    "profile": "test",
    "model": {"source": "tiny-gpt2", "seed": 0, "device": "cpu", "precision": "fp32"},
    "corpus": {"sources": ["synthetic"], "synthetic_documents": 10},
    "tokenize": {"context_size": 32, "eval_fraction": 0.1},
    "activations": {"tokens": 4096},
    "layers": [1, 2],
    "sae": {"d_sae": 256, "l1_coeff": 0.01, "train_tokens": 65536, "batch_size": 512, "buffer_rows": 4096},
    "per_layer": {"L1": {}, "L2": {"l1_coeff": 0.02, "d_sae": 512, "dead_cutoff": 1.0e-5}},
    "evaluate": {"batch_rows": 8},
}


def params(**changes):
    data = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        target = data
        for key in parents:
            target = target[key]
        target[last] = value
    return data


def test_base_params_parse():
    p = params()
    assert config.model_config(p).source == "tiny-gpt2"
    assert config.corpus_config(p).sources == ["synthetic"]
    assert config.tokenize_config(p).context_size == 32
    assert config.activations_config(p).tokens == 4096
    assert config.evaluate_config(p).batch_rows == 8
    assert config.layers(p) == [1, 2]


def test_per_layer_override_applied():
    p = params()
    l1, l2 = config.sae_config(p, 1), config.sae_config(p, 2)
    assert (l1.l1_coeff, l1.d_sae, l1.dead_cutoff) == (0.01, 256, 1e-6)  # base values (dead_cutoff default)
    assert (l2.l1_coeff, l2.d_sae, l2.dead_cutoff) == (0.02, 512, 1e-5)
    assert l2.train_tokens == 65536 and l2.batch_size == 512  # the rest comes from 'sae'
    assert l2.steps == 128
    assert p["sae"]["l1_coeff"] == 0.01  # the shared section is not modified


def test_per_layer_null_entry_means_no_override():
    p = params(per_layer__L1=None)
    assert config.sae_config(p, 1).l1_coeff == 0.01


def test_unknown_key_in_sae_named():
    p = params()
    p["sae"]["l1_coef"] = 1.0
    with pytest.raises(UserError, match=r"unknown key 'sae\.l1_coef'") as err:
        config.sae_config(p, 1)
    assert "l1_coeff" in str(err.value)  # the allowed keys are listed
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("section", "key", "loader"),
    [
        ("model", "sorce", config.model_config),
        ("corpus", "source", config.corpus_config),
        ("tokenize", "context", config.tokenize_config),
        ("activations", "token", config.activations_config),
        ("evaluate", "batchrows", config.evaluate_config),
    ],
)
def test_unknown_key_in_each_section_named(section, key, loader):
    p = params()
    p[section][key] = 1
    with pytest.raises(UserError, match=rf"unknown key '{section}\.{key}'"):
        loader(p)


def test_unknown_key_in_per_layer_named():
    p = params()
    p["per_layer"]["L2"]["lr"] = 1e-3  # lr is not a per-layer key
    with pytest.raises(UserError, match=r"unknown key 'per_layer\.L2\.lr'"):
        config.sae_config(p, 2)
    assert config.sae_config(p, 1).lr == 1.2e-3  # other layers are unaffected


def test_string_where_float_expected():
    p = params(sae__l1_coeff="0.01")
    with pytest.raises(UserError, match=r"bad value for 'sae\.l1_coeff'") as err:
        config.sae_config(p, 1)
    assert "'0.01'" in str(err.value)


def test_string_where_float_expected_in_override():
    p = params(per_layer__L2={"l1_coeff": "high"})
    with pytest.raises(UserError, match=r"per_layer\.L2\.l1_coeff"):
        config.sae_config(p, 2)


def test_yaml_exponent_without_dot_is_a_string_and_rejected(tmp_path):
    # PyYAML reads 1e-3 (no dot) as a string; the strict loader must say so instead of guessing
    path = tmp_path / "params.yaml"
    text = yaml.safe_dump(params()).replace("l1_coeff: 0.01", "l1_coeff: 1e-3")
    assert "l1_coeff: 1e-3" in text
    path.write_text(text)
    with pytest.raises(UserError, match=r"sae\.l1_coeff"):
        config.sae_config(config.read_params(path), 1)


def test_int_accepted_for_float_but_float_not_for_int():
    assert config.sae_config(params(sae__l1_coeff=1), 1).l1_coeff == 1.0
    with pytest.raises(UserError, match=r"sae\.d_sae"):
        config.sae_config(params(sae__d_sae=256.0), 1)
    with pytest.raises(UserError, match=r"evaluate\.batch_rows"):
        config.evaluate_config(params(evaluate__batch_rows="8"))


def test_bad_literal_value():
    with pytest.raises(UserError, match=r"model\.source"):
        config.model_config(params(model__source="gpt3"))


def test_missing_required_key():
    p = params()
    del p["sae"]["train_tokens"]
    with pytest.raises(UserError, match=r"missing key 'sae\.train_tokens'"):
        config.sae_config(p, 1)


def test_recipe_constraints_rejected():
    with pytest.raises(UserError, match="dead_window"):
        config.sae_config(params(sae__dead_window=30000), 1)  # longer than resample_every (25000)
    with pytest.raises(UserError, match="l1_coeff"):
        config.sae_config(params(sae__l1_coeff=-1.0), 1)
    with pytest.raises(UserError, match="d_sae"):
        config.sae_config(params(per_layer__L1={"d_sae": 0}), 1)


def test_missing_per_layer_entry_for_listed_layer():
    p = params(layers=[1, 2, 3])
    with pytest.raises(UserError, match="'L3'"):
        config.layers(p)
    with pytest.raises(UserError, match="layer 3 is not configured") as err:
        config.sae_config(p, 3)
    assert "L1, L2" in str(err.value)


@pytest.mark.parametrize("bad", [[], [1, 1], [1, -2], ["1"], "1, 2", [1.0]])
def test_bad_layers_list(bad):
    with pytest.raises(UserError, match="layers"):
        config.layers(params(layers=bad))


def test_missing_section():
    p = params()
    del p["evaluate"]
    with pytest.raises(UserError, match="missing section 'evaluate'"):
        config.evaluate_config(p)


def test_report_section():
    assert config.report_config(params()).compare == "auto"  # optional section, default auto
    assert config.report_config(params(report={"compare": "reports/earlier"})).compare == "reports/earlier"
    with pytest.raises(UserError, match=r"unknown key 'report\.comparison' \(allowed: compare\)"):
        config.report_config(params(report={"comparison": "none"}))
    for bad in ("", "  ", 3, None):
        with pytest.raises(UserError,
                           match=r"bad value for 'report\.compare'.*auto, published, none, or a folder") as err:
            config.report_config(params(report={"compare": bad}))
        assert "\n" not in str(err.value)


def test_section_not_a_mapping():
    with pytest.raises(UserError, match="'tokenize' must be a mapping"):
        config.tokenize_config(params(tokenize=[1, 2]))


@pytest.mark.parametrize(("text", "expected"), [(3, 3), ("3", 3), ("L3", 3), (" L12 ", 12), (0, 0), ("L0", 0)])
def test_parse_layer_accepts(text, expected):
    assert config.parse_layer(text) == expected


@pytest.mark.parametrize("text", ["x3", "", "L", "3.0", "-1", "LL3", "3L", "layer3"])
def test_parse_layer_rejects(text):
    with pytest.raises(UserError, match="bad layer"):
        config.parse_layer(text)


def test_read_params_errors(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        config.read_params(tmp_path / "absent.yaml")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("sae: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        config.read_params(bad_yaml)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(UserError, match="mapping"):
        config.read_params(scalar)
    extra = tmp_path / "extra.yaml"
    extra.write_text(yaml.safe_dump({**params(), "saes": {}}))
    with pytest.raises(UserError, match="unknown section 'saes'"):
        config.read_params(extra)


# ---------------------------------------------------------------------------------------------------
# Every shipped profile


def test_profiles_exist():
    names = [p.stem for p in PROFILE_PATHS]
    assert "tiny" in names and "quickstart" in names
    assert config.list_profiles(REPO) == sorted(names)  # by name (by path, "gpt2-small-topk.yaml" sorts first)


@pytest.mark.parametrize("path", PROFILE_PATHS, ids=lambda p: p.stem)
def test_profile_parses_for_every_stage_and_layer(path):
    p = config.read_params(path)
    assert p.get("profile") == path.stem
    config.model_config(p)
    assert config.corpus_config(p).sources
    tok = config.tokenize_config(p)
    assert 0 < tok.eval_fraction < 1 and tok.context_size >= 2
    config.activations_config(p)
    config.evaluate_config(p)
    # the published GPT-2 Small table is the reference only where the model is GPT-2 Small
    assert config.report_config(p).compare == ("published" if config.model_config(p).source == "gpt2" else "none")
    layers = config.layers(p)
    for layer in layers:
        cfg = config.sae_config(p, layer)
        assert cfg.steps > 0
        assert cfg.buffer_rows // 2 >= cfg.batch_size  # what ShuffledBuffer requires
        assert cfg.dead_window <= cfg.resample_every
    for key in p["per_layer"]:  # entries for layers not listed must still be valid
        config.sae_config(p, config.parse_layer(key))
