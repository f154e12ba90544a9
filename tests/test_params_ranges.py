"""Every params.yaml value has a range: a value outside it is refused by config.validate with one line that names
the key path and says what is allowed, instead of a traceback (or a silently useless run) later."""

from __future__ import annotations

import copy

import pytest
import yaml
from click.testing import CliRunner

from attnsae import config
from attnsae.cli import main
from attnsae.errors import UserError
from helpers import REPO

NAN, INF = float("nan"), float("inf")
SEED_RANGE = "an integer >= 0 and <= 4294967295"

# The section (key path in params.yaml) each class reads; per_layer.L2 is an entry of tiny.yaml.
SECTION_CLASSES = {
    "model": config.ModelConfig,
    "corpus": config.CorpusConfig,
    "tokenize": config.TokenizeConfig,
    "activations": config.ActivationsConfig,
    "sae": config.SAEConfig,
    "per_layer.L2": config.LayerOverride,
    "evaluate": config.EvaluateConfig,
    "dashboards": config.DashboardsConfig,
    "dashboards.tags": config.TagThresholds,
    "report": config.ReportConfig,
    "distributed": config.DistributedConfig,
}

# (key path, bad value, what the message must say): the cases users hit, then every field of every section.
BAD_VALUES = [
    # measured by a user: accepted, or a traceback later
    ("activations.tokens", 0, "must be an integer >= 1 and <= 10000000000000 (got 0)"),
    ("evaluate.max_rows", -1, "must be an integer >= 0 and <= 1000000000 (got -1)"),
    ("evaluate.density_bins", 0, "must be an integer >= 1 and <= 10000 (got 0)"),
    ("sae.dead_cutoff", NAN, "must be a finite number >= 0 and <= 1 (got nan)"),
    ("activations.shard_tokens", 0, "must be an integer >= 1 and <= 2147483648 (got 0)"),
    ("sae.lr", -0.001, "must be a finite number > 0 and <= 1 (got -0.001)"),
    ("sae.beta1", 1.5, "must be a finite number >= 0 and < 1 (got 1.5)"),
    ("sae.log_every", 0, "must be an integer >= 1 and <= 1000000000 (got 0)"),
    ("activations.batch_rows", 0, "must be an integer >= 1 and <= 65536 (got 0)"),
    ("sae.seed", 2**70, f"must be {SEED_RANGE} (got {2**70})"),
    ("sae.l1_coeff", NAN, "must be a finite number >= 0 and <= 1000 (got nan)"),
    # model
    ("model.source", "gpt3",
     "must be one of smollm2-135m, gpt2, tiny-gpt2, gpt2-random, hf:OWNER/NAME[@REVISION] or local:PATH "
     "(got 'gpt3')"),
    ("model.seed", -1, f"must be {SEED_RANGE} (got -1)"),
    ("model.seed", 2**70, f"must be {SEED_RANGE}"),
    ("model.seed", True, f"must be {SEED_RANGE} (got True)"),
    ("model.device", "gpu", "must be one of auto, cpu, cuda (got 'gpu')"),
    ("model.precision", "fp16", "must be one of auto, fp32, bf16 (got 'fp16')"),
    # corpus
    ("corpus.sources", [], "must be a list of strings with at least 1 entry (got [])"),
    ("corpus.sources", "synthetic", "must be a list of strings"),
    ("corpus.max_documents", -1, "must be an integer >= 0 and <= 1000000000 (got -1)"),
    ("corpus.synthetic_documents", -5, "must be an integer >= 0 and <= 10000000 (got -5)"),
    ("corpus.synthetic_documents", 0, "must be >= 1 when sources lists synthetic (got 0)"),
    ("corpus.seed", -1, f"must be {SEED_RANGE} (got -1)"),
    ("corpus.seed", 2**70, f"must be {SEED_RANGE}"),
    ("corpus.seed", "49", f"must be {SEED_RANGE} (got '49')"),
    # tokenize
    ("tokenize.context_size", 1, "must be an integer >= 2 and <= 1048576 (got 1)"),
    ("tokenize.context_size", "64", "must be an integer >= 2 and <= 1048576 (got '64')"),
    ("tokenize.eval_fraction", 0, "must be a finite number > 0 and < 1 (got 0)"),
    ("tokenize.eval_fraction", 1, "must be a finite number > 0 and < 1 (got 1)"),
    ("tokenize.eval_fraction", NAN, "must be a finite number > 0 and < 1 (got nan)"),
    ("tokenize.max_train_rows", -1, "must be an integer >= 0 and <= 1000000000 (got -1)"),
    ("tokenize.max_eval_rows", 1.5, "must be an integer >= 0 and <= 1000000000 (got 1.5)"),
    ("tokenize.seed", 2**70, f"must be {SEED_RANGE}"),
    ("tokenize.seed", -1, f"must be {SEED_RANGE} (got -1)"),
    ("tokenize.heldout_sources", "npm:brown", "must be a list of strings (got 'npm:brown')"),
    ("tokenize.heldout_sources", ["npm:brown", "npm:brown"], "must be distinct corpus sources, like npm:brown"),
    ("tokenize.max_heldout_rows", -1, "must be an integer >= 0 and <= 1000000000 (got -1)"),
    ("tokenize.source_weights", {"npm:sotu": 0}, "must be a mapping of corpus source to a finite number > 0"),
    ("tokenize.source_weights", {"npm:sotu": INF}, "must be a mapping of corpus source to a finite number > 0"),
    ("tokenize.source_weights", [1.0],
     "must be a mapping of corpus source to a finite number > 0, like {npm:sotu: 1.0} (got [1.0])"),
    # activations
    ("activations.source", "ram", "must be one of disk, stream (got 'ram')"),
    ("activations.tokens", -4096, "must be an integer >= 1 and <= 10000000000000 (got -4096)"),
    ("activations.tokens", 4096.0, "must be an integer >= 1 and <= 10000000000000 (got 4096.0)"),
    # sae
    ("sae.d_sae", 0, "must be an integer >= 1 and <= 33554432 (got 0)"),
    ("sae.d_sae", 256.0, "must be an integer >= 1 and <= 33554432 (got 256.0)"),
    ("sae.l1_coeff", -0.01, "must be a finite number >= 0 and <= 1000 (got -0.01)"),
    ("sae.l1_coeff", INF, "must be a finite number >= 0 and <= 1000 (got inf)"),
    ("sae.l1_coeff", "0.01", "must be a finite number >= 0 and <= 1000 (got '0.01')"),
    ("sae.dead_cutoff", 1.5, "must be a finite number >= 0 and <= 1 (got 1.5)"),
    ("sae.lr", 0, "must be a finite number > 0 and <= 1 (got 0)"),
    ("sae.lr", INF, "must be a finite number > 0 and <= 1 (got inf)"),
    ("sae.beta1", NAN, "must be a finite number >= 0 and < 1 (got nan)"),
    ("sae.beta2", 1.0, "must be a finite number >= 0 and < 1 (got 1.0)"),
    ("sae.beta2", -0.5, "must be a finite number >= 0 and < 1 (got -0.5)"),
    ("sae.batch_size", 0, "must be an integer >= 1 and <= 1048576 (got 0)"),
    ("sae.train_tokens", 0, "must be an integer >= 1 and <= 10000000000000 (got 0)"),
    ("sae.warmup_steps", -1, "must be an integer >= 0 and <= 1000000000 (got -1)"),
    ("sae.resample_every", 0, "must be an integer >= 1 and <= 1000000000 (got 0)"),
    ("sae.max_resamples", -1, "must be an integer >= 0 and <= 10000 (got -1)"),
    ("sae.dead_window", 0, "must be an integer >= 1 and <= 1000000000 (got 0)"),
    ("sae.resample_inputs", 0, "must be an integer >= 1 and <= 67108864 (got 0)"),
    ("sae.buffer_rows", -1, "must be an integer >= 1 and <= 2147483648 (got -1)"),
    ("sae.log_every", 2.5, "must be an integer >= 1 and <= 1000000000 (got 2.5)"),
    ("sae.seed", -1, f"must be {SEED_RANGE} (got -1)"),
    ("sae.device", "tpu", "must be one of auto, cpu, cuda (got 'tpu')"),
    ("sae.deterministic", "yes", "must be true or false (got 'yes')"),
    ("sae.precision", "fp16", "must be one of fp32, tf32, bf16 (got 'fp16')"),
    ("sae.compile", "yes", "must be true or false (got 'yes')"),
    ("sae.kernel", "triton", "must be one of auto, dense, sparse (got 'triton')"),
    # sae: rules between fields (tiny.yaml: batch_size 512, resample_every 50)
    ("sae.dead_window", 60, "must be <= resample_every (50) (got 60)"),
    ("sae.train_tokens", 100, "must be >= batch_size (512) (got 100)"),
    ("sae.buffer_rows", 1000, "must be >= 2 x batch_size (1024) (got 1000)"),
    # per_layer: the same ranges as sae, named by the entry's own key path
    ("per_layer.L2.d_sae", 0, "must be an integer >= 1 and <= 33554432 (got 0)"),
    ("per_layer.L2.l1_coeff", NAN, "must be a finite number >= 0 and <= 1000 (got nan)"),
    ("per_layer.L2.l1_coeff", -0.5, "must be a finite number >= 0 and <= 1000 (got -0.5)"),
    ("per_layer.L2.dead_cutoff", INF, "must be a finite number >= 0 and <= 1 (got inf)"),
    ("per_layer.L2.dead_cutoff", 2, "must be a finite number >= 0 and <= 1 (got 2)"),
    # tokenize: the sources it splits by are corpus.sources (tiny.yaml: [synthetic])
    ("tokenize.heldout_sources", ["npm:brown"], "'npm:brown' is not a source of the corpus (allowed: synthetic)"),
    ("tokenize.heldout_sources", ["synthetic"], "must leave at least one corpus source to train on"),
    ("tokenize.source_weights", {"npm:sotu": 2.0}, "'npm:sotu' is not a source of the corpus (allowed: synthetic)"),
    # distributed (optional; tiny.yaml has none)
    ("distributed.nproc_per_node", 0, "must be an integer >= 1 and <= 1024 (got 0)"),
    ("distributed.nproc_per_node", "2", "must be an integer >= 1 and <= 1024 (got '2')"),
    # evaluate
    ("evaluate.batch_rows", 0, "must be an integer >= 1 and <= 65536 (got 0)"),
    ("evaluate.batch_rows", "8", "must be an integer >= 1 and <= 65536 (got '8')"),
    ("evaluate.dense_threshold", 0, "must be a finite number > 0 and <= 1 (got 0)"),
    ("evaluate.dense_threshold", 1.5, "must be a finite number > 0 and <= 1 (got 1.5)"),
    ("evaluate.dense_threshold", NAN, "must be a finite number > 0 and <= 1 (got nan)"),
    ("evaluate.device", "gpu", "must be one of auto, cpu, cuda (got 'gpu')"),
    ("evaluate.bootstrap_resamples", 1, "must be an integer >= 2 and <= 1000000 (got 1)"),
    ("evaluate.bootstrap_seed", -1, f"must be {SEED_RANGE} (got -1)"),
    # dashboards
    ("dashboards.max_rows", -1, "must be an integer >= 0 and <= 1000000000 (got -1)"),
    ("dashboards.max_rows", 8, "must be 0 (all) or >= evaluate.max_rows (16), so the dashboards see the rows"),
    ("dashboards.batch_rows", 0, "must be an integer >= 1 and <= 65536 (got 0)"),
    ("dashboards.first_n", -1, "must be an integer >= 0 and <= 10000 (got -1)"),
    ("dashboards.random_n", -1, "must be an integer >= 0 and <= 10000 (got -1)"),
    ("dashboards.features", [3, 3], "must be distinct feature ids >= 0 (got [3, 3])"),
    ("dashboards.features", [-1], "must be distinct feature ids >= 0 (got [-1])"),
    ("dashboards.features", "3", "must be a list of integers with at most 10000 entries (got '3')"),
    ("dashboards.top_k", 0, "must be an integer >= 1 and <= 1000 (got 0)"),
    ("dashboards.intervals", 0, "must be an integer >= 1 and <= 1000 (got 0)"),
    ("dashboards.interval_examples", -1, "must be an integer >= 0 and <= 1000 (got -1)"),
    ("dashboards.histogram_bins", 0, "must be an integer >= 1 and <= 1000 (got 0)"),
    ("dashboards.logit_tokens", 0, "must be an integer >= 1 and <= 1000 (got 0)"),
    ("dashboards.probe_prompts", 0, "must be an integer >= 1 and <= 10000 (got 0)"),
    ("dashboards.null_directions", 0, "must be an integer >= 1 and <= 65536 (got 0)"),
    ("dashboards.null_percentile", 101, "must be a finite number >= 0 and <= 100 (got 101)"),
    ("dashboards.null_percentile", NAN, "must be a finite number >= 0 and <= 100 (got nan)"),
    ("dashboards.seed", -1, f"must be {SEED_RANGE} (got -1)"),
    ("dashboards.device", "gpu", "must be one of auto, cpu, cuda (got 'gpu')"),
    ("dashboards.tags", [0.3], "must be a mapping"),
    *[(f"dashboards.tags.{tag}", 1.5, "must be a finite number >= -1 and <= 1 (got 1.5)")
      for tag in config.TagThresholds.model_fields],
    # upper bounds: far above any real run, so a stray exponent stops here (measured by a user: each was accepted, then
    # a traceback, an allocation failure, or minutes of silence)
    ("sae.lr", 1e300, "must be a finite number > 0 and <= 1 (got 1e+300)"),
    ("sae.d_sae", 10**12, "must be an integer >= 1 and <= 33554432 (got 1000000000000)"),
    ("dashboards.null_directions", 10**12, "must be an integer >= 1 and <= 65536 (got 1000000000000)"),
    ("sae.buffer_rows", 10**15, "must be an integer >= 1 and <= 2147483648 (got 1000000000000000)"),
    ("evaluate.bootstrap_resamples", 10**30, f"must be an integer >= 2 and <= 1000000 (got {10**30})"),
    ("activations.tokens", 10**30, f"must be an integer >= 1 and <= 10000000000000 (got {10**30})"),
    ("dashboards.top_k", 10**30, f"must be an integer >= 1 and <= 1000 (got {10**30})"),
    ("dashboards.features", list(range(10001)), "must be a list of integers with at most 10000 entries"),
    ("tokenize.context_size", 2**21, "must be an integer >= 2 and <= 1048576 (got 2097152)"),
    ("sae.batch_size", 2**21, "must be an integer >= 1 and <= 1048576 (got 2097152)"),
    # rules between sections (tiny.yaml: d_sae 256 on layers 1 and 2)
    ("dashboards.features", [0, 256],
     "feature 256 is not in layer 1's SAE (allowed: feature ids 0 to 255, its d_sae - 1)"),
    # report, profile
    ("report.compare", "", "must be auto, published, none, or a folder of L<n>.json metrics files (got '')"),
    ("profile", 3, "must be a non-empty name (got 3)"),
]


# (architecture, key path, bad value, message): the settings of the other architectures, checked on tiny.yaml
# switched to that architecture (``as_architecture``).
ARCHITECTURE_BAD_VALUES = [
    ("standard", "sae.architecture", "gated", "must be one of standard, topk, batchtopk, jumprelu (got 'gated')"),
    ("standard", "sae.l1_coeff", None, "must be set for architecture standard (got None)"),
    ("standard", "sae.k", 20, "must be left out: it applies to architecture topk, batchtopk, and this is standard"),
    ("topk", "sae.l1_coeff", 0.1, "must be left out: it applies to architecture standard, and this is topk (got 0.1)"),
    ("topk", "sae.k", 0, "must be an integer >= 1 and <= 65536 (got 0)"),
    ("topk", "sae.k", None, "must be set for architecture topk (got None)"),
    ("topk", "sae.auxk_alpha", -1.0, "must be a finite number >= 0 and <= 1000 (got -1.0)"),
    ("topk", "sae.aux_k", -1, "must be an integer >= 0 and <= 33554432 (got -1)"),
    ("topk", "sae.auxk_dead_tokens", 0, "must be an integer >= 1 and <= 10000000000000 (got 0)"),
    ("batchtopk", "sae.threshold_ema_rate", 0.0, "must be a finite number > 0 and <= 1 (got 0.0)"),
    ("topk", "sae.threshold_ema_rate", 0.5, "must be left out: it applies to architecture batchtopk, and this is topk"),
    ("jumprelu", "sae.l0_coeff", NAN, "must be a finite number >= 0 and <= 1000 (got nan)"),
    ("jumprelu", "sae.jumprelu_bandwidth", 0, "must be a finite number > 0 and <= 1000 (got 0)"),
    ("jumprelu", "sae.jumprelu_init_threshold", -0.1, "must be a finite number >= 0 and <= 1000 (got -0.1)"),
    ("jumprelu", "sae.sparsity_warmup_steps", -1, "must be an integer >= 0 and <= 1000000000 (got -1)"),
    # a row cannot keep more features than the SAE has (tiny.yaml: d_sae 256), whichever section sets the value
    ("topk", "sae.k", 5000, "must be <= d_sae (256) (got 5000)"),
    ("topk", "sae.aux_k", 300, "must be <= d_sae (256) (got 300)"),
    ("batchtopk", "per_layer.L2.k", 300, "must be <= d_sae (256) (got 300)"),
    ("topk", "per_layer.L2.k", 0, "must be an integer >= 1 and <= 65536 (got 0)"),
    ("jumprelu", "per_layer.L2.l0_coeff", -1.0, "must be a finite number >= 0 and <= 1000 (got -1.0)"),
]


def as_architecture(params: dict, architecture: str) -> dict:
    """``params`` (in place) training ``architecture``, with its required settings and no L1 penalty."""
    if architecture == "standard":
        return params
    required = {"topk": {"k": 8}, "batchtopk": {"k": 8}, "jumprelu": {"l0_coeff": 1e-3}}[architecture]
    params["sae"] = {k: v for k, v in params["sae"].items() if k != "l1_coeff"} | {"architecture": architecture,
                                                                                    **required}
    params["per_layer"] = {key: {k: v for k, v in entry.items() if k != "l1_coeff"}
                           for key, entry in params["per_layer"].items()}
    return params


def with_value(params: dict, key_path: str, value) -> dict:
    """``params`` with one value set (in place); an optional section the profile leaves out is added."""
    *parents, last = key_path.split(".")
    target = params
    for key in parents:
        target = target.setdefault(key, {})
    target[last] = value
    return params


def validation_error(params: dict) -> str:
    with pytest.raises(UserError) as err:
        config.validate(params)
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(("key_path", "value", "expected"), BAD_VALUES, ids=lambda v: str(v)[:40])
def test_bad_value_refused_in_one_line_naming_key_and_range(tiny_params, key_path, value, expected):
    message = validation_error(with_value(tiny_params, key_path, value))
    assert message.startswith(f"{config.PARAMS_FILE}: bad value for '{key_path}': "), message
    assert expected in message, message


@pytest.mark.parametrize(("architecture", "key_path", "value", "expected"), ARCHITECTURE_BAD_VALUES,
                         ids=lambda v: str(v)[:40])
def test_architecture_settings_refused_in_one_line(tiny_params, architecture, key_path, value, expected):
    message = validation_error(with_value(as_architecture(tiny_params, architecture), key_path, value))
    assert message.startswith(f"{config.PARAMS_FILE}: bad value for '{key_path}': "), message
    assert expected in message, message


@pytest.mark.parametrize("architecture", ["topk", "batchtopk", "jumprelu"])
def test_each_architecture_gets_its_reference_settings(tiny_params, architecture):
    config.validate(as_architecture(tiny_params, architecture))
    cfg = config.sae_config(tiny_params, 2)
    assert {k: getattr(cfg, k) for k in config.ARCHITECTURE_SETTINGS[architecture]} == {
        **config.ARCHITECTURE_SETTINGS[architecture], **{"topk": {"k": 8}, "batchtopk": {"k": 8},
                                                          "jumprelu": {"l0_coeff": 1e-3}}[architecture]}
    assert set(cfg.recipe()) == set(config.SAEConfig.model_fields) - {
        key for settings in config.ARCHITECTURE_SETTINGS.values() for key in settings
    } | set(config.ARCHITECTURE_SETTINGS[architecture])


def test_table_covers_every_field_of_every_section():
    covered = {section: set() for section in SECTION_CLASSES}
    for key_path, _, _ in BAD_VALUES + [row[1:] for row in ARCHITECTURE_BAD_VALUES]:
        section, _, field = key_path.rpartition(".")
        if section in covered:
            covered[section].add(field)
    for section, cls in SECTION_CLASSES.items():
        assert covered[section] == set(cls.model_fields), section


@pytest.mark.parametrize("section", sorted(SECTION_CLASSES))
def test_every_number_has_an_upper_bound(section):
    """A plausibility limit for every size: a number with no upper bound lets a typo run for hours or exhaust memory."""
    cls = SECTION_CLASSES[section]
    for name in cls.model_fields:
        info = config._field_info(cls, name)
        if info.annotation in (int, float):
            assert any(hasattr(c, "le") or hasattr(c, "lt") for c in info.metadata), \
                f"{section}.{name} has no upper bound"


def test_tiny_profile_is_valid_as_the_table_starts_from_it(tiny_params):
    config.validate(tiny_params)


@pytest.mark.parametrize("path", sorted((REPO / config.PROFILES_DIR).glob("*.yaml")), ids=lambda p: p.stem)
def test_every_profile_validates(path):
    config.validate(config.read_params(path))


def test_a_bad_shared_value_is_refused_even_where_every_layer_overrides_it(tiny_params):
    params = with_value(tiny_params, "sae.l1_coeff", NAN)
    params["per_layer"] = {"L1": {"l1_coeff": 0.01}, "L2": {"l1_coeff": 0.02}}
    assert "bad value for 'sae.l1_coeff': must be a finite number" in validation_error(params)


def test_unlisted_per_layer_entries_are_validated_too(tiny_params):
    params = with_value(tiny_params, "per_layer.L7", {"d_sae": -1})  # layer 7 is not in 'layers'
    assert "bad value for 'per_layer.L7.d_sae': must be an integer >= 1 and <= 33554432 (got -1)" \
        in validation_error(params)


@pytest.mark.parametrize("key", ["X3", "L03", "3", "l3"])
def test_per_layer_entry_names_are_checked(tiny_params, key):
    params = with_value(tiny_params, f"per_layer.{key}", {})
    assert f"unknown key 'per_layer.{key}' (entries are named L<n>, like L3)" in validation_error(params)


@pytest.mark.parametrize(
    ("key_path", "value", "expected"),
    [
        ("per_layer", [1, 2], "'per_layer' must be a mapping of L<n> entries, got list"),
        ("layers", [], "'layers' must be a non-empty list of layer numbers"),
        ("layers", [1, 1], "'layers' lists a layer twice"),
        ("layers", [1, 2, 3], "'per_layer' has no entry 'L3'"),
        ("sae", [1], "'sae' must be a mapping, got list"),
        ("reports", {}, "unknown section 'reports' (allowed: activations, corpus"),
    ],
)
def test_bad_structure_refused_in_one_line(tiny_params, key_path, value, expected):
    assert expected in validation_error(with_value(tiny_params, key_path, value))


@pytest.mark.parametrize("section", ["model", "corpus", "tokenize", "activations", "layers", "sae", "evaluate"])
def test_missing_required_section_named(tiny_params, section):
    del tiny_params[section]
    assert f"missing section '{section}'" in validation_error(tiny_params)


def test_sections_are_checked_in_a_fixed_order(tiny_params):
    """With every section bad, validate names them one at a time in this order (a per_layer entry's bad name, listed
    first, before sae's bad value)."""
    breaks = [("profile", ""), ("model.source", "nope"), ("corpus.sources", []), ("tokenize.context_size", 1),
              ("activations.tokens", 0), ("evaluate.batch_rows", 0), ("dashboards.top_k", 0), ("report.compare", ""),
              ("frontier.standard", {"values": []}), ("distributed.nproc_per_node", 0), ("layers", []),
              ("per_layer", {"X3": {}, **tiny_params["per_layer"]}), ("sae.lr", -1.0)]
    good = copy.deepcopy(tiny_params)
    for key_path, value in breaks:
        with_value(tiny_params, key_path, value)
    for key_path, _ in breaks:
        assert f"'{key_path}" in validation_error(tiny_params)
        *parents, last = key_path.split(".")
        broken, original = tiny_params, good
        for key in parents:
            broken, original = broken[key], original.get(key, {})
        if last in original:
            broken[last] = original[last]
        else:
            del broken[last]
    config.validate(tiny_params)


def test_optional_sections_may_be_left_out(tiny_params):
    del tiny_params["report"], tiny_params["profile"]
    assert "distributed" not in tiny_params and "frontier" not in tiny_params
    config.validate(tiny_params)
    assert config.distributed_config(tiny_params).nproc_per_node == 1


def test_corpus_seed_defaults_to_49_and_is_read(tiny_params):
    assert config.corpus_config(tiny_params).seed == 49  # tiny.yaml does not set it
    assert config.corpus_config(with_value(tiny_params, "corpus.seed", 7)).seed == 7


def test_plan_with_a_bad_value_exits_with_one_line(tiny_params, tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(with_value(tiny_params, "sae.lr", -0.001)))
    result = CliRunner().invoke(main, ["plan", "--params", str(path)])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.stderr.strip().splitlines() == [
        "Error: params.yaml: bad value for 'sae.lr': must be a finite number > 0 and <= 1 (got -0.001)"
    ]
