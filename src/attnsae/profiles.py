"""Profiles: `attnsae profile NAME` makes profiles/NAME.yaml the active params.yaml and writes dvc.yaml.

dvc.yaml is the profile's pipeline file (``pipelines/cache.yaml`` or ``pipelines/stream.yaml``), for a stream
profile on a model with published attention SAEs their stages (``pipelines/published/<set>.yaml``), plus an
``artifacts:`` section that names each layer's publishable folder (``models/published/L<n>``: SAE + model
card) as a DVC artifact, so other repositories can ``dvc artifacts get`` / ``dvc import`` one layer at a
git tag. The section depends on the profile's layers, which is why it is rendered here, not stored.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from attnsae import config, layout
from attnsae.errors import UserError
from attnsae.evaluation import published_sets
from attnsae.files import write_text_atomic

ARTIFACTS_COMMENT = (
    "# Written by `attnsae profile NAME` for the profile's layers (not part of pipelines/*.yaml): each layer's\n"
    "# publishable folder (SAELens SAE + model card) as a DVC artifact. Other repositories fetch one layer with\n"
    "# `dvc artifacts get URL NAME --rev vX.Y.Z` (a git tag NAME@vX.Y.Z) or `dvc import URL PATH --rev TAG`.\n"
)


# ----------------------------------------------------------------------------------------------------------
# DVC artifacts, rendered into dvc.yaml by `attnsae profile`


def artifact_name(profile: str, layer: int) -> str:
    """One name per profile and layer: layer 3 of SmolLM2 and layer 3 of GPT-2 are different models."""
    return f"{profile}-sae-L{layer}"


def artifacts_section(profile: str, params: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The `artifacts:` mapping of dvc.yaml for a profile's layers (pure: reads only ``params``).

    Only what the profile fixes goes into it (layer, hook, model source); per-layer settings such as the L1
    coefficient stay out, because `dvc exp run -S` changes them without rewriting dvc.yaml.
    """
    from dvc.exceptions import InvalidArgumentError
    from dvc.repo.artifacts import check_name_format

    from attnsae.data.models import hook_z_name

    model = config.model_config(params).source
    section = {}
    for layer in config.layers(params):
        name = artifact_name(profile, layer)
        try:
            check_name_format(name)  # the name DVC and its tag format (NAME@vX.Y.Z) accept
        except InvalidArgumentError:
            raise UserError(
                f"profile name {profile!r} cannot name a DVC artifact ({name!r}): use letters, digits, '-' and '_', "
                "starting and ending with a letter or digit"
            ) from None
        hook = hook_z_name(layer)
        section[name] = {
            "path": layout.published_dir(layer).as_posix(),
            "type": "model",  # what DVC's model registry lists
            "desc": f"Sparse autoencoder on {hook} of {model} ({profile} profile); SAELens folder with a model card",
            "labels": ["sae", "attention", "hook_z", profile],
            "meta": {"profile": profile, "layer": layer, "hook_name": hook, "model": model},
        }
    return section


def published_set(params: dict[str, Any]) -> str | None:
    """The published attention SAEs of the profile's model (``pipelines/published/<set>.yaml``), if it has any."""
    published = published_sets.for_model(config.model_config(params).source)
    return None if published is None else published.name


def with_stages(pipeline_text: str, published_text: str) -> str:
    """The pipeline with a fragment's stages (comments kept) after its own: the published SAEs' of the profile's
    model, or the profile's own extra stages."""
    head, marker, tail = pipeline_text.partition("\nplots:")
    stages = published_text.split("\nstages:\n", 1)[1]
    return f"{head.rstrip()}\n\n{stages.rstrip()}\n{marker}{tail}" if marker else f"{head.rstrip()}\n\n{stages}"


MODEL_STAGE_DEPS = "    cmd: attnsae model\n    deps:\n"


def with_local_model_dep(pipeline_text: str, params: dict[str, Any]) -> str:
    """For a ``local:PATH`` model, PATH as a dep of the model stage: DVC then reruns it when the folder's files change
    (params.yaml names only the path)."""
    source = config.model_config(params).source
    if not source.startswith(config.LOCAL_MODEL_SOURCE):
        return pipeline_text
    if MODEL_STAGE_DEPS not in pipeline_text:
        raise UserError("the pipeline file's model stage has no deps list to add the local model folder to")
    path = json.dumps(source[len(config.LOCAL_MODEL_SOURCE):])  # quoted: YAML reads any path back as it is
    return pipeline_text.replace(MODEL_STAGE_DEPS, f"{MODEL_STAGE_DEPS}      - {path}\n", 1)


def render_pipeline(pipeline_text: str, profile: str, params: dict[str, Any], published_text: str | None = None,
                    extra_text: str | None = None) -> str:
    """dvc.yaml for a profile: the pipeline file unchanged (comments kept), the published SAEs' stages of its model
    if any, the profile's extra stages if any, a local model folder as the model stage's dep, and the artifacts
    section."""
    for fragment in (published_text, extra_text):
        if fragment is not None:
            pipeline_text = with_stages(pipeline_text, fragment)
    pipeline_text = with_local_model_dep(pipeline_text, params)
    pipeline = yaml.safe_load(pipeline_text) or {}
    if "artifacts" in pipeline:
        raise UserError("the pipeline file already has an 'artifacts' section; `attnsae profile` writes it per profile")
    body = yaml.safe_dump({"artifacts": artifacts_section(profile, params)}, sort_keys=False, width=120)
    return f"{pipeline_text.rstrip()}\n\n{ARTIFACTS_COMMENT}{body}"


def pipeline_mode(params: dict[str, Any]) -> str:
    """'stream' for profiles that stream activations, else 'cache': the name of the pipeline file."""
    return "stream" if config.activations_config(params).source == "stream" else "cache"


def profile_pipeline(root: str | Path, name: str, params: dict[str, Any]) -> str:
    """dvc.yaml's text for profile ``name`` with ``params``, from the pipeline files under ``root``."""
    pipelines = Path(root) / config.PIPELINES_DIR
    mode = pipeline_mode(params)
    pipeline = pipelines / f"{mode}.yaml"
    if not pipeline.is_file():
        raise UserError(f"{pipeline}: missing; profiles need the pipeline files in {config.PIPELINES_DIR}/")
    published = published_set(params) if mode == "stream" else None
    fragment = pipelines / "published" / f"{published}.yaml"
    if published is not None and not fragment.is_file():
        raise UserError(f"{fragment}: missing; it holds the stages of the published SAEs of the profile's model")
    extra = pipelines / "extra" / f"{name}.yaml"  # stages of this profile alone (the quickstart's Neuronpedia export)
    return render_pipeline(pipeline.read_text(), name, params, fragment.read_text() if published else None,
                           extra.read_text() if extra.is_file() else None)


def activate_profile(root: str | Path, name: str) -> str:
    """Write params.yaml and dvc.yaml for profile ``name``; both are checked before either is replaced."""
    root = Path(root)
    names = config.list_profiles(root)
    if name not in names:
        raise UserError(f"unknown profile {name!r} (allowed: {', '.join(names)})")
    source = root / config.PROFILES_DIR / f"{name}.yaml"
    params = config.read_params(source)
    config.validate(params)
    dvc_yaml = profile_pipeline(root, name, params)
    write_text_atomic(root / config.PARAMS_FILE, source.read_text())
    write_text_atomic(root / "dvc.yaml", dvc_yaml)
    return pipeline_mode(params)
