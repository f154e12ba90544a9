"""The `attnsae` command: one subcommand per pipeline stage, each a thin call into its stage module.

dvc.yaml runs these. A command reads only the params.yaml sections that its dvc.yaml stage declares,
fills in the default paths from ``layout`` and calls the stage's function; MLflow is reached only
through ``tracking``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from pathlib import Path

import click

from attnsae import numerics

numerics.pin_kernels()  # before anything runs a torch operation: every stage's CPU arithmetic is then portable

from attnsae import config, layout  # noqa: E402
from attnsae.errors import UserError  # noqa: E402
from attnsae.evaluation import published_sets  # noqa: E402  light (no torch): the --set choices
from attnsae.files import DISK_FULL  # noqa: E402
from attnsae.reporting import neuronpedia  # noqa: E402  light (no torch): its defaults are the command's


def one_line_errors(fn):
    """Bad input ends the command with one line on stderr and exit status 1, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            signum = getattr(err, "signum", None)  # training stopped by a signal: exit as shells report one (128 + n)
            if signum is None:
                raise click.ClickException(str(err)) from None
            click.echo(f"Error: {err}", err=True)
            sys.exit(128 + signum)
        except OSError as err:
            # A full disk or a file-size limit can hit any write; the writers name the output when they can.
            if err.errno not in DISK_FULL:
                raise
            where = f"{err.filename}: " if err.filename else ""
            raise click.ClickException(
                f"{where}{DISK_FULL[err.errno]} (free space, then run the command again)"
            ) from None

    return wrapper


params_option = click.option(
    "--params", "params_path", default=config.PARAMS_FILE, show_default=True, type=click.Path(dir_okay=False),
    help="The params file to read.",
)
layer_option = click.option("--layer", required=True, help="Layer number, e.g. 3 or L3.")
# The pipeline's inputs, at layout.py's paths unless given: declared once, used by every command that reads them.
model_option = click.option("--model", "model_dir", default=str(layout.MODEL_DIR), show_default=True,
                            help="The pinned model folder (the model stage's output).")
tokens_option = click.option("--tokens", "tokens_dir", default=str(layout.TOKENS_DIR), show_default=True,
                             help="The token rows folder (the tokenize stage's output).")
no_mlflow_option = click.option("--no-mlflow", is_flag=True, help="Do not log to MLflow.")


def corpus_option(help: str | None = None):
    return click.option("--corpus", "corpus_dir", default=str(layout.CORPUS_DIR), show_default=True, help=help)


def sae_on_tokens_options(command):
    """--layer, --model, --tokens, --sae: any hook_z SAE folder, read on the pinned model's evaluation tokens."""
    for option in reversed([
        click.option("--layer", default=None,
                     help="Layer number, e.g. 3 or L3 [default: the layer in the SAE's cfg.json]."),
        model_option,
        tokens_option,
        click.option("--sae", "sae_dir", default=None,
                     help=f"Any hook_z SAE folder in the SAELens format (ours, imported, SAELens) "
                          f"[default: {layout.SAE_ROOT}/L<layer>]"),
    ]):
        command = option(command)
    return command


def chosen_layers(layer_args: tuple[str, ...], all_layers: list[int] | None, known: list[int] | None = None,
                  known_from: str = "") -> list[int]:
    """The layers named by repeatable --layer options, or ``all_layers`` (--all-layers); each at most once and,
    when ``known`` is given, one of them."""
    if all_layers is not None:
        if layer_args:
            raise UserError("name the layers either with --layer (repeatable) or with --all-layers, not both")
        return all_layers
    if not layer_args:
        raise UserError("name the layers: --layer (repeatable) or --all-layers")
    layers = [config.parse_layer(a) for a in layer_args]
    if len(set(layers)) != len(layers):
        raise UserError(f"--layer lists a layer twice: {', '.join(layer_args)}")
    for n in layers:
        if known is not None and n not in known:
            raise UserError(f"--layer {n}: not a layer of {known_from} (allowed: {', '.join(map(str, known))})")
    return layers


def check_result_path(path: str | Path, sae_dir: str | Path) -> None:
    """A run may write inside the pipeline's outputs only the results the pipeline keeps for its SAE: another SAE's
    results (or another layer's) there would pass for the pipeline's own."""
    held, allowed = layout.stage_output_holding(path), layout.results_of(sae_dir)
    if held is not None and Path(path).resolve() not in allowed:
        where = "outside the pipeline's outputs"
        if allowed:
            where += f" or at its own paths ({', '.join(sorted(os.path.relpath(p) for p in allowed))})"
        raise UserError(f"{path} lies in the pipeline's output {held}, which holds its own SAEs' results, each at its "
                        f"own path: write {sae_dir}'s results {where}")


def is_pipeline_sae(sae_dir: str | None, layer: int) -> bool:
    """Whether --sae names the pipeline's own SAE of the layer (or is left out): only its results are the stage's."""
    return sae_dir is None or Path(sae_dir).resolve() == layout.sae_dir(layer).resolve()


def chosen_sae(layer: str | None, sae_dir: str | None) -> tuple[int, str, bool]:
    """(layer, SAE folder, whether it is the pipeline's own) from --layer and --sae: the layer from the folder's
    cfg.json when only --sae is given (a --layer given too is checked against it as the SAE loads), the pipeline's
    models/sae/L<layer> when only --layer is."""
    from attnsae.evaluation.evaluate import sae_layer
    from attnsae.formats.sae_cfg import read_sae_cfg

    if layer is None and sae_dir is None:
        raise UserError("name the SAE: --layer (our models/sae/L<layer>) or --sae FOLDER")
    n = sae_layer(read_sae_cfg(sae_dir), sae_dir) if layer is None else config.parse_layer(layer)
    return n, sae_dir or str(layout.sae_dir(n)), is_pipeline_sae(sae_dir, n)


def profile_label(params: dict) -> str:
    """The profile's name, a label for MLflow runs only (no stage's output depends on it)."""
    return str(params.get("profile", "custom"))


def logging_on(no_mlflow: bool) -> bool:
    """Whether this command logs to MLflow: not with --no-mlflow or ATTNSAE_TRACKING=off; an unusable store
    stops the command here, in seconds, before any work (or, with ATTNSAE_TRACKING=optional, is skipped)."""
    if no_mlflow:
        return False
    from attnsae.reporting.tracking import check_store

    return check_store()


def tracked(params: dict, layer: int, stage: str, log: bool):
    """This stage's MLflow run for the layer, or nothing when it does not log."""
    if not log:
        return contextlib.nullcontext(None)
    from attnsae.reporting.tracking import layer_run

    return layer_run(layer, stage, profile_label(params), params=params)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """attnsae: sparse autoencoders on attention outputs (hook_z), trained, evaluated and reproduced.

    The stages run in this order (dvc repro runs them for you):
    params (check-params) -> model -> corpus -> tokenize -> activations -> train@L -> evaluate ->
    dashboards@L -> report, publish@L;
    streaming profiles (gpt2-small) store no text, tokens or activations, train every layer in one
    stage from one model pass, and also import and evaluate the paper's SAEs (attnsae import).
    """
    from attnsae.lifeline import follow_pipeline

    follow_pipeline()  # a stage that DVC started stops when DVC does, instead of writing outputs after it


@main.command()
@click.argument("name", required=False)
@click.option("--root", default=".", type=click.Path(file_okay=False), help="Repository root.")
@one_line_errors
def profile(name: str | None, root: str) -> None:
    """Make profiles/NAME.yaml the active params.yaml and write its pipeline to dvc.yaml (no NAME: list them)."""
    from attnsae.profiles import activate_profile

    if name is None:
        for n in config.list_profiles(Path(root)):
            click.echo(n)
        return
    mode = activate_profile(root, name)
    click.echo(f"params.yaml is now profile {name!r} and dvc.yaml the {mode} pipeline; run `dvc repro` to build it")


@main.command(name="check-params")
@params_option
@click.option("--out", default=str(layout.PARAMS_CHECK_FILE), show_default=True)
@one_line_errors
def check_params(params_path: str, out: str) -> None:
    """Check every section of the params file before any stage runs (the pipeline's first stage).

    DVC deletes a stage's outputs before running it, so a value that a stage would reject must stop the
    pipeline here, before it reaches any stage that holds results: each value's range, the rules between values,
    the model's layers, positions and vocabulary, the devices asked for, and each stage's memory and the
    activation cache's disk against this machine. The file written depends on none of them, so a passing check
    never makes a later stage run again.
    """
    from attnsae import preflight
    from attnsae.files import write_text_atomic

    preflight.check(config.read_params(params_path), preflight.this_machine())
    write_text_atomic(out, f"{params_path} passed `attnsae check-params`\n")
    click.echo(f"check-params: {params_path} is valid")


@main.command()
@params_option
@click.option("--out", default=str(layout.MODEL_DIR), show_default=True)
@one_line_errors
def model(params_path: str, out: str) -> None:
    """Obtain, check and pin the base model (params: model)."""
    from attnsae.data.models import prepare_model

    cfg = config.model_config(config.read_params(params_path))
    info = prepare_model(cfg, out)
    click.echo(f"model: {info.name}: {info.n_layers} layers, hook_z {info.n_heads}x{info.d_head} -> {out}")


@main.command()
@params_option
@click.option("--out", default=str(layout.CORPUS_DIR), show_default=True)
@click.option("--stream", is_flag=True,
              help="Do not store the documents: pin the sources (hf: revisions to a commit) "
                   "and read them on the fly later.")
@one_line_errors
def corpus(params_path: str, out: str, stream: bool) -> None:
    """Fetch and write the text documents, or with --stream pin their sources (params: corpus)."""
    from attnsae.data.corpus import build_corpus

    cfg = config.corpus_config(config.read_params(params_path))
    manifest = build_corpus(cfg, out, stream=stream)
    if stream:
        click.echo(f"corpus: streamed from {', '.join(manifest['sources'])} -> {out}/manifest.json")
    else:
        click.echo(f"corpus: {manifest['documents']} documents, {manifest['characters']:,} characters -> {out}")


@main.command()
@params_option
@corpus_option()
@model_option
@click.option("--out", default=str(layout.TOKENS_DIR), show_default=True)
@one_line_errors
def tokenize(params_path: str, corpus_dir: str, model_dir: str, out: str) -> None:
    """Documents -> rows of context_size tokens with BOS, train/eval split (params: tokenize).

    A streamed corpus gets its eval rows only; training makes its train rows on the fly.
    """
    from attnsae.data.tokenization import tokenize_stage

    meta = tokenize_stage(config.tokenize_config(config.read_params(params_path)), corpus_dir, model_dir, out)
    train = f"{meta['tokens']['train']:,} tokens" if "train" in meta["tokens"] else "streamed during training"
    click.echo(f"tokenize: train {train}, eval {meta['tokens']['eval']:,} tokens -> {out}")


@main.command()
@params_option
@model_option
@tokens_option
@click.option("--out", default=str(layout.ACTIVATIONS_DIR), show_default=True)
@one_line_errors
def activations(params_path: str, model_dir: str, tokens_dir: str, out: str) -> None:
    """Cache hook_z of every selected layer from one forward pass per batch (params: activations, model, layers)."""
    from attnsae.data.activations import cache_activations

    params = config.read_params(params_path)
    summary = cache_activations(
        config.activations_config(params), config.model_config(params), model_dir, tokens_dir, config.layers(params),
        out,
    )
    click.echo(f"activations: {summary['tokens']:,} tokens x {len(summary['layers'])} layers, "
               f"d_in {summary['d_in']} -> {out}")


@main.command()
@params_option
@click.option("--layer", "layer_args", multiple=True,
              help="Layer number, e.g. 3 or L3; repeat to train several layers from one model pass (--stream).")
@click.option("--all-layers", is_flag=True, help="Every layer in params.yaml's `layers` (with --stream).")
@click.option("--stream", is_flag=True,
              help="Run the model on the fly instead of reading the activation cache; all --layer SAEs share one pass.")
@click.option("--activations", "activations_dir", default=str(layout.ACTIVATIONS_DIR), show_default=True)
@model_option
@corpus_option(help="Corpus to stream from (--stream).")
@tokens_option
@click.option("--out", default=None, help=f"SAE folder, one layer only [default: {layout.SAE_ROOT}/L<layer>]")
@click.option("--curves", default=None,
              help=f"Training curves CSV, one layer only [default: {layout.CURVES_DIR}/L<layer>.csv]")
@click.option("--checkpoint-every", type=click.IntRange(min=0), default=0, show_default=True,
              help="Save a checkpoint every N steps (0: never); a restarted run resumes from it.")
@click.option("--checkpoint", "checkpoint_path", default=None,
              help=f"Checkpoint file [default: {layout.CHECKPOINT_DIR}/train-L<layer>.pt]")
@no_mlflow_option
@one_line_errors
def train(
    params_path: str, layer_args: tuple[str, ...], all_layers: bool, stream: bool, activations_dir: str,
    model_dir: str, corpus_dir: str, tokens_dir: str, out: str | None, curves: str | None, checkpoint_every: int,
    checkpoint_path: str | None, no_mlflow: bool,
) -> None:
    """Train SAEs (params: sae, per_layer.L<layer>; with --stream also model, activations, layers, distributed).

    SIGTERM or SIGINT writes a checkpoint (with --checkpoint-every) and stops; the same command resumes. With
    --stream and distributed.nproc_per_node > 1 it starts that many workers, which share the layers (or, with more
    workers than layers, each layer's batches); under torchrun each worker trains its rank's share.
    """
    from attnsae import launcher
    from attnsae.sae.training import CachedActivations, StreamedActivations, run_train_stage

    params = config.read_params(params_path)
    layers = chosen_layers(layer_args, config.layers(params) if all_layers else None)
    if len(layers) > 1 and (out or curves):
        raise UserError("--out and --curves name one layer's files; leave them out when training several layers")
    if len(layers) > 1 and not stream:
        raise UserError("several --layer values share one model pass only with --stream")
    nproc = config.distributed_config(params).nproc_per_node
    if launcher.starts_workers(stream, nproc):
        if checkpoint_path:
            raise UserError("--checkpoint names one process's file; with distributed.nproc_per_node > 1 each rank "
                            "keeps its own (checkpoints/train-L<its layers>.pt)")
        args = ["train", "--params", params_path, "--stream", *(f"--layer={n}" for n in layers), "--model", model_dir,
                "--corpus", corpus_dir, "--tokens", tokens_dir, "--checkpoint-every", str(checkpoint_every)]
        launcher.launch_workers(nproc, args + (["--no-mlflow"] if no_mlflow else []), layers)
        return
    layers, shard = launcher.this_process_share(layers, stream)
    cfgs = {n: config.sae_config(params, n) for n in layers}
    if stream:
        data = StreamedActivations(config.model_config(params), config.activations_config(params).batch_rows,
                                   model_dir, corpus_dir, tokens_dir)
    else:
        data = CachedActivations(activations_dir)
    log = shard.owner and logging_on(no_mlflow)
    with contextlib.ExitStack() as stack:
        runs = {n: stack.enter_context(tracked(params, n, "train", log)) for n in layers}
        run_train_stage(cfgs, data,
                        {n: Path(out) if out else layout.sae_dir(n) for n in layers},
                        {n: Path(curves) if curves else layout.curves_file(n) for n in layers}, runs,
                        Path(checkpoint_path) if checkpoint_path else layout.checkpoint_file(layers), checkpoint_every,
                        shard)


@main.command()
@params_option
@click.option("--layer", "layer_args", multiple=True,
              help="Layer number, e.g. 3 or L3; repeat to evaluate several layers' SAEs in one pass over the rows "
                   "[with --sae: default the layer in its cfg.json].")
@click.option("--all-layers", is_flag=True, help="Every layer in params.yaml's `layers` (the evaluate stage).")
@model_option
@tokens_option
@click.option("--sae", "sae_dir", default=None,
              help=f"Any hook_z SAE folder in the SAELens format (ours, imported, SAELens) "
                   f"[default: {layout.SAE_ROOT}/L<layer>]")
@click.option("--max-rows", type=click.IntRange(min=0), default=None,
              help="Evaluate on the first N eval rows (0: all) [default: params evaluate.max_rows].")
@click.option("--batch-rows", type=click.IntRange(min=1), default=None,
              help="Rows per forward pass [default: params evaluate.batch_rows].")
@click.option("--out", default=None,
              help=f"Metrics JSON, one SAE only [default: {layout.METRICS_DIR}/L<layer>.json for the pipeline's own "
                   "SAE; another SAE's metrics are only printed unless --out is given]")
@click.option("--density", default=None,
              help=f"Density histogram CSV, one SAE only [default: {layout.DENSITY_DIR}/L<layer>.csv for the "
                   "pipeline's own SAE]")
@click.option("--heldout-out", "heldout_out", default=None,
              help=f"Held-out metrics JSON, the SAE measured on the held-out split too, one SAE only "
                   f"[default: {layout.HELDOUT_METRICS_DIR}/L<layer>.json for the pipeline's own SAE]")
@no_mlflow_option
@one_line_errors
def evaluate(
    params_path: str, layer_args: tuple[str, ...], all_layers: bool, model_dir: str, tokens_dir: str,
    sae_dir: str | None, max_rows: int | None, batch_rows: int | None, out: str | None, density: str | None,
    heldout_out: str | None, no_mlflow: bool,
) -> None:
    """Evaluate hook_z SAEs on the evaluation and held-out splits of a model's tokens (params: evaluate).

    The layers named together share the clean forward pass (the stage runs --all-layers). With --sae, any
    SAELens-format hook_z SAE folder. Only the evaluation of the pipeline's own SAEs (models/sae/L<layer>) writes
    the pipeline's metrics, held-out metrics and density files and logs to the layers' MLflow runs. Every
    CE-based metric and L0 comes with a bootstrap standard error over rows.
    """
    from attnsae.evaluation.evaluate import evaluate_layers, sae_layer
    from attnsae.formats.metrics import read_heldout_metrics
    from attnsae.formats.sae_cfg import read_sae_cfg

    params = config.read_params(params_path)
    overrides = {k: v for k, v in (("max_rows", max_rows), ("batch_rows", batch_rows)) if v is not None}
    cfg = config.evaluate_config(params).model_copy(update=overrides)
    if sae_dir is not None:
        if all_layers or len(layer_args) > 1:
            raise UserError("--sae names one SAE folder: give at most one --layer with it, and not --all-layers")
        # a given layer is checked against the folder's cfg.json as it loads
        layers = [config.parse_layer(layer_args[0]) if layer_args else sae_layer(read_sae_cfg(sae_dir), sae_dir)]
    elif not (layer_args or all_layers):
        raise UserError("name the SAEs to evaluate: --layer (repeatable; our models/sae/L<layer>), --all-layers, "
                        "or --sae FOLDER")
    else:
        layers = chosen_layers(layer_args, config.layers(params) if all_layers else None)
    if len(layers) > 1 and (out or density or heldout_out):
        raise UserError("--out, --density and --heldout-out name one SAE's files; leave them out for several layers")
    sae_dirs = {n: sae_dir or str(layout.sae_dir(n)) for n in layers}
    files = {n: evaluation_files(n, sae_dirs[n], is_pipeline_sae(sae_dir, n), out, density, heldout_out)
             for n in layers}
    # A layer's run holds the pipeline's results: other SAEs, or results written elsewhere, stay out of it.
    logged = [n for n in layers if files[n].metrics is not None
              and Path(files[n].metrics).resolve() == layout.metrics_file(n).resolve()]
    log = bool(logged) and logging_on(no_mlflow)
    with contextlib.ExitStack() as stack:
        runs = {n: stack.enter_context(tracked(params, n, "evaluate", log)) for n in logged}
        results = evaluate_layers(cfg, model_dir, tokens_dir, sae_dirs, files)
        for n, metrics in results.items():
            heldout = read_heldout_metrics(files[n].heldout) if files[n].heldout else None
            if runs.get(n) is not None:
                runs[n].log_evaluation(cfg.model_dump(), metrics, files[n].metrics, sae_dirs[n], heldout,
                                       files[n].heldout)
            echo_evaluation(n, metrics, heldout, written=files[n].metrics is not None)


def evaluation_files(layer: int, sae_dir: str, own: bool, out: str | None, density: str | None,
                     heldout_out: str | None):
    """Where `attnsae evaluate` writes a layer's results: the pipeline's files for its own SAE (unless others are
    given); for another SAE only the files given, none inside the pipeline's outputs but its own (check_result_path)."""
    from attnsae.evaluation.evaluate import EvaluationFiles

    pipeline = EvaluationFiles(layout.metrics_file(layer), layout.density_file(layer),
                               layout.heldout_metrics_file(layer))
    files = (EvaluationFiles(out or pipeline.metrics, density or pipeline.density, heldout_out or pipeline.heldout)
             if own else EvaluationFiles(out, density, heldout_out))
    for given in (out, density, heldout_out):
        if given is not None:
            check_result_path(given, sae_dir)
    return files


def echo_evaluation(layer: int, metrics: dict, heldout: dict | None, written: bool) -> None:
    from attnsae.formats.metrics import format_metrics

    click.echo(f"evaluate L{layer}: {metrics['model']}" + ("" if written else " (not written: pass --out to keep it)"))
    for line in format_metrics(metrics):
        click.echo(line)
    if heldout is not None:
        click.echo(f"held-out ({', '.join(heldout['sources'])}, {heldout['eval_tokens']:,} tokens):")
        for line in format_metrics(heldout):
            click.echo(line)


@main.command()
@params_option
@sae_on_tokens_options
@click.option("--out", default=None,
              help=f"Folder for features.json and index.html [default: {layout.DASHBOARDS_DIR}/L<layer>]")
@no_mlflow_option
@one_line_errors
def dashboards(params_path: str, layer: str | None, model_dir: str, tokens_dir: str, sae_dir: str | None,
               out: str | None, no_mlflow: bool) -> None:
    """Feature dashboards for one layer's SAE: features.json and a static page (params: dashboards, evaluate.max_rows).

    Reads the held-out evaluation rows. Every feature gets its density, maximum and family tags; the first
    dashboards.first_n alive features, dashboards.random_n alive ones drawn at random, dashboards.features and each
    family's best feature get a card: top examples, activation intervals, histogram, logit effects, head attribution
    and DFA by source position for every shown example. Only the pipeline's own SAE logs to the layer's MLflow run.
    """
    from attnsae.features.dashboards import build_dashboards

    params = config.read_params(params_path)
    n, sae_dir, own = chosen_sae(layer, sae_dir)
    out = out or str(layout.dashboards_dir(n))
    check_result_path(out, sae_dir)
    cfg = config.dashboards_config(params)
    config.check_dashboards_rows(params)
    log = own and logging_on(no_mlflow)
    with tracked(params, n, "dashboards", log) as run:
        summary = build_dashboards(cfg, config.evaluate_config(params).max_rows, model_dir, tokens_dir, sae_dir, n, out)
        if run is not None:
            run.log_dashboards(cfg.model_dump(), summary, out)
    tags = ", ".join(f"{tag} {count}" for tag, count in summary["tag_counts"].items())
    click.echo(f"dashboards L{n}: {out}/index.html: {summary['cards']} cards, {summary['alive']:,} of "
               f"{summary['d_sae']:,} features alive, {summary['seconds']:.0f} s")
    click.echo(f"  tags: {tags}; untagged {summary['untagged']:,}")


@main.command(name="head-scores")
@params_option
@layer_option
@click.option("--min-score", type=click.FloatRange(0, 1), default=0.3, show_default=True,
              help="Head induction score that makes a head an induction head.")
@click.option("--min-share", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Share of a feature's decoder weight on those heads that puts the feature on them.")
@one_line_errors
def head_scores(params_path: str, layer: str, min_score: float, min_share: float) -> None:
    """Check the induction tags against the model: each head's induction score on repeated random tokens, and the
    share of features tagged induction among features whose decoder weight sits on the induction heads versus the
    others (reads models/base, models/sae/L<layer> and its dashboards; writes nothing)."""
    from attnsae.features.head_scores import score_heads

    n = config.parse_layer(layer)
    cfg = config.dashboards_config(config.read_params(params_path))
    check = score_heads(layout.MODEL_DIR, layout.sae_dir(n), layout.features_file(n), n, cfg.probe_prompts,
                            cfg.seed, min_score, min_share)
    for line in check.lines(n, min_score, min_share):
        click.echo(line)


@main.command(name="inspect")
@click.argument("text", required=False)
@click.option("--file", "text_file", default=None, type=click.Path(dir_okay=False, allow_dash=True),
              help="Read the text from this UTF-8 file ('-': standard input) instead of the argument.")
@click.option("--layer", default=None, help="Layer number, e.g. 3 or L3 [default: the layer in the SAE's cfg.json].")
@click.option("--sae", "sae_dir", default=None,
              help=f"Any hook_z SAE folder in the SAELens format [default: {layout.SAE_ROOT}/L<layer>]")
@model_option
@click.option("--features", "features_path", default=None, type=click.Path(dir_okay=False),
              help="The layer's features.json, for tags, densities and card links [default: "
                   f"{layout.DASHBOARDS_DIR}/L<layer>/features.json for the pipeline's own SAE, when it exists].")
@click.option("--top", type=click.IntRange(1, 100), default=3, show_default=True,
              help="Features shown per token, largest first.")
@click.option("--most-active", type=click.IntRange(0, 1000), default=10, show_default=True,
              help="Features shown for the whole text, by their largest activation.")
@click.option("--context-size", type=click.IntRange(min=2), default=None,
              help="Tokens per row, the separator included [default: the SAE's, from its cfg.json].")
@click.option("--summary", is_flag=True, help="Print the text's metrics and most active features, not each token.")
@click.option("--json", "json_out", default=None, type=click.Path(dir_okay=False),
              help="Also write every reading to this JSON file.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="cpu", show_default=True)
@one_line_errors
def inspect_command(
    text: str | None, text_file: str | None, layer: str | None, sae_dir: str | None, model_dir: str,
    features_path: str | None, top: int, most_active: int, context_size: int | None, summary: bool,
    json_out: str | None, device: str,
) -> None:
    """Run an SAE on text of your own: per token, the features that fire, the head and earlier token that drove
    each (DFA), the reconstruction's error and what splicing the SAE in costs the next token's prediction; over the
    text, evaluate's metrics (L0, explained variance, CE increase, loss recovered). Writes nothing but --json."""
    from attnsae.data.models import resolve_device
    from attnsae.features.inspection import FeatureNotes, inspect_text, report_lines
    from attnsae.files import write_json_atomic
    from attnsae.formats.features import read_features
    from attnsae.formats.sae_cfg import read_sae_cfg

    given = read_text_argument(text, text_file)
    n, sae_dir, own = chosen_sae(layer, sae_dir)
    if features_path is None and own and layout.features_file(n).is_file():
        features_path = str(layout.features_file(n))
    if json_out is not None:
        check_result_path(json_out, sae_dir)
    notes = None
    if features_path is not None:
        notes = FeatureNotes.of(read_features(features_path, n, sae_dir), features_path, read_sae_cfg(sae_dir)["d_sae"])
    # --summary shows no token's features: none are attributed (a long text's DFA is most of the work)
    inspection, about = inspect_text(model_dir, sae_dir, n, given, 0 if summary else top, context_size,
                                     resolve_device(device), most_active)
    for line in report_lines(inspection, about, notes, per_token=not summary):
        click.echo(line)
    if json_out is not None:
        write_json_atomic(json_out, {**about, **inspection.as_dict()})


def read_text_argument(text: str | None, path: str | None) -> str:
    """The text to inspect, given as the argument or in a file ('-': standard input): exactly one, not empty."""
    if (text is None) == (path is None):
        raise UserError("give the text to inspect either as the argument or with --file PATH ('-': standard input)")
    if path is not None:
        try:
            with click.open_file(path, encoding="utf-8") as handle:
                text = handle.read()
        except UnicodeDecodeError as err:
            raise UserError(f"--file {path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
        except OSError as err:
            raise UserError(f"--file {path}: {err.strerror}") from None
    if not text or not text.strip():
        raise UserError("the text to inspect is empty")
    return text


@main.group()
def frontier() -> None:
    """The sparsity / fidelity frontier over architectures: DVC experiments, then reports/frontier.csv."""


@frontier.command(name="queue")
@params_option
@click.option("--dry-run", is_flag=True, help="Print the dvc commands instead of queueing them.")
@one_line_errors
def frontier_queue(params_path: str, dry_run: bool) -> None:
    """Queue one DVC experiment per point of the params file's 'frontier' section (each runs up to the evaluate
    stages); run them with `dvc exp run --run-all`, then `attnsae frontier collect`."""
    import shlex

    from attnsae.reporting import frontier as frontier_module

    params = config.read_params(params_path)
    if dry_run:
        for command in frontier_module.queue_commands(params):
            click.echo(shlex.join(command))
        return
    names = frontier_module.queue(params)
    click.echo(f"frontier: queued {len(names)} experiments ({', '.join(names)}); run them with "
               "`dvc exp run --run-all`, then `attnsae frontier collect`")


@frontier.command(name="collect")
@click.option("--out", default=str(layout.FRONTIER_FILE), show_default=True)
@one_line_errors
def frontier_collect(out: str) -> None:
    """Read every finished frontier-* experiment from `dvc exp show` into OUT (the report draws it)."""
    from attnsae.reporting import frontier as frontier_module

    rows, pending = frontier_module.collect(out)
    points = len({row["experiment"] for row in rows})
    click.echo(f"frontier: {points} experiments, {len(rows)} layer points -> {out}"
               + (f"; not finished (queued, running or failed): {', '.join(pending)}" if pending else ""))


@main.group()
def labels() -> None:
    """People's ratings of dashboard cards: labels/L<n>.csv, which fill the report's "% alive interpretable"."""


@labels.command(name="import")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--dashboards", "dashboards_root", default=str(layout.DASHBOARDS_DIR), show_default=True,
              help="Folder of the L<n> dashboards the ratings were made on.")
@click.option("--labels", "labels_root", default=str(layout.LABELS_DIR), show_default=True)
@one_line_errors
def labels_import(file: str, dashboards_root: str, labels_root: str) -> None:
    """Check a labels file exported from a layer page's rating mode and add it to labels/L<n>.csv.

    The file must name the layer, the content hash of the page as the pipeline has it now, and only features
    that have a card; anything else stops the import with one line, and nothing is written.
    """
    from attnsae.features.labels import import_labels

    path, written = import_labels(file, Path(dashboards_root), Path(labels_root))
    click.echo(f"labels import: {written} ratings from {file} -> {path}")


@main.group()
def export() -> None:
    """A layer's dashboards in another tool's format."""


@export.command(name="neuronpedia")
@click.option("--layer", type=click.IntRange(min=0), required=True, help="The layer whose features.json to export.")
@click.option("--model-id", required=True, help="Neuronpedia's id of the model, e.g. gpt2-small or smollm2-135m.")
@click.option("--source-set", default=neuronpedia.DEFAULT_SOURCE_SET, show_default=True,
              help="Neuronpedia's source set: the source id is <layer>-<source set>.")
@click.option("--creator-id", default=neuronpedia.DEFAULT_CREATOR, show_default=True,
              help="The Neuronpedia user the rows name (default: its seeded default user).")
@click.option("--dashboards", "dashboards_root", default=str(layout.DASHBOARDS_DIR), show_default=True)
@click.option("--labels", "labels_root", default=str(layout.LABELS_DIR), show_default=True,
              help="Ratings whose notes become explanations.")
@click.option("--out", "out_root", default="reports/neuronpedia", show_default=True,
              help="Writes <out>/<model id>/<source id>/, the folder Neuronpedia's importer reads.")
@one_line_errors
def export_neuronpedia_command(layer: int, model_id: str, source_set: str, creator_id: str, dashboards_root: str,
                               labels_root: str, out_root: str) -> None:
    """Write layer L's features, shown examples (with DFA) and rating notes in the layout Neuronpedia imports
    (model/sourceset/source.jsonl, features, activations and explanations as batch-0.jsonl.gz), from features.json
    alone. Only carded features have examples, histograms and logit tables (features.json keeps them for cards)."""
    folder, counts = neuronpedia.export_neuronpedia(layer, model_id, Path(dashboards_root), Path(labels_root),
                                                    Path(out_root), source_set, creator_id)
    click.echo(f"export neuronpedia: L{layer} -> {folder}: " + ", ".join(f"{n:,} {t}" for t, n in counts.items()))


@main.command()
@params_option
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Device whose matmul throughput the time estimate uses.")
@click.option("--processes", type=click.IntRange(min=1), default=None,
              help="Also the training time with N processes, e.g. GPUs (stream profiles) "
                   "[default: params distributed.nproc_per_node].")
@one_line_errors
def plan(params_path: str, device: str, processes: int | None) -> None:
    """Print what the active profile costs before running it: tokens, FLOPs, memory, time (from a measured
    training step: a few seconds)."""
    from attnsae.data.models import resolve_device
    from attnsae.plan import describe_plan

    for line in describe_plan(config.read_params(params_path), resolve_device(device), processes):
        click.echo(line)


@main.command()
@params_option
@click.option("--out", default=str(layout.REPORT_DIR), show_default=True)
@click.option("--no-mlflow", is_flag=True, help="Do not log the report to the pipeline's MLflow parent run.")
@one_line_errors
def report(params_path: str, out: str, no_mlflow: bool) -> None:
    """Write reports/report.md, reports/index.html and reports/layers.csv (params: layers, report).

    The report and the per-layer table also go to the pipeline's MLflow parent run.
    """
    from attnsae.reporting.report import build_report

    if Path(out).exists() and not Path(out).is_dir():
        raise UserError(f"--out {out}: a file; --out names the folder that receives report.md, index.html and "
                        f"layers.csv (default {layout.REPORT_DIR})")
    params = config.read_params(params_path)
    log = logging_on(no_mlflow)
    written = build_report(config.layers(params), out, config.report_config(params).compare)
    if log:
        from attnsae.reporting.tracking import log_report

        log_report(profile_label(params), params, written.per_layer, written.files)
    click.echo(written.markdown)


@main.command(name="mlflow-init")
@click.argument("uri", required=False)
@one_line_errors
def mlflow_init(uri: str | None) -> None:
    """Prepare an MLflow store once, before concurrent writers use it.

    URI: a SQLite file (sqlite:////abs/path/mlflow.db: creates its tables; do this before starting an
    `mlflow server` on it) or a server (http://host:port: creates the attnsae experiment there)
    [default: MLFLOW_TRACKING_URI, else sqlite:///<repo>/mlflow.db].
    """
    from attnsae.reporting.tracking import init_store

    uri, done = init_store(uri)
    click.echo(f"mlflow-init: {uri}: {done}")


@main.command()
@layer_option
@click.option("--sae", "sae_dir", default=None, help=f"SAE folder [default: {layout.SAE_ROOT}/L<layer>]")
@click.option("--metrics", "metrics_path", default=None,
              help=f"Metrics JSON [default: {layout.METRICS_DIR}/L<layer>.json]")
@click.option("--out", default=None, help=f"Folder to write [default: {layout.PUBLISHED_ROOT}/L<layer>]")
@one_line_errors
def publish(layer: str, sae_dir: str | None, metrics_path: str | None, out: str | None) -> None:
    """Copy one layer's SAE into a publishable folder with a model card (README.md) built from its metrics."""
    from attnsae.reporting.publish import publish_layer

    n = config.parse_layer(layer)
    out = out or str(layout.published_dir(n))
    card = publish_layer(sae_dir or layout.sae_dir(n), metrics_path or layout.metrics_file(n), out)
    click.echo(f"publish L{n}: {out} (SAE files + {card.name})")


@main.command(name="import")
@click.option("--set", "published_set", type=click.Choice(published_sets.NAMES), default=published_sets.NAMES[0],
              show_default=True,
              help="Which published attention SAEs: the paper's on GPT-2 Small "
                   "(ckkissane/attn-saes-gpt2-small-all-layers) "
                   "or Gemma Scope's on Gemma 2 2B (google/gemma-scope-2b-pt-att).")
@click.option("--layer", "layer_args", multiple=True, help="Layer number, e.g. 3 or L3; repeat for several.")
@click.option("--all-layers", is_flag=True, help="Every published layer (GPT-2 Small: 0 to 11; Gemma 2 2B: 0 to 25).")
@click.option("--revision", default=None,
              help="Revision of the hub repo to fetch from [default: kissane-gpt2-small's pinned commit; "
                   "gemma-scope-2b-att: main, resolved to its commit and recorded]")
@click.option("--endpoint", default=None,
              help="Hugging Face hub endpoint to fetch from, e.g. a mirror [default: HF_ENDPOINT, else https://huggingface.co]")
@click.option("--out", default=str(layout.IMPORTED_ROOT), show_default=True,
              help="Folder that receives one SAE folder per layer, named L<layer> (apart from models/sae, "
                   "which training owns, and models/published, which `attnsae publish` writes).")
@click.option("--sha256", "sha256", default=None,
              help="kissane-gpt2-small: sha256 the layer's .pt must have, instead of the pinned one "
                   "(one --layer only).")
@click.option("--trust-unpinned", is_flag=True,
              help="kissane-gpt2-small: accept a .pt that has no pinned sha256; "
                   "the hash it has is recorded in cfg.json.")
@click.option("--width", default=None, help="gemma-scope-2b-att: the SAE width, as published (16k, 65k, ...).")
@click.option("--l0", type=click.IntRange(min=1), default=None,
              help="gemma-scope-2b-att: take the published average L0 nearest this (each layer has several).")
@one_line_errors
def import_saes(
    published_set: str, layer_args: tuple[str, ...], all_layers: bool, revision: str | None, endpoint: str | None,
    out: str, sha256: str | None, trust_unpinned: bool, width: str | None, l0: int | None,
) -> None:
    """Import published attention SAEs as SAE folders: the paper's on GPT-2 Small, or Gemma Scope's on Gemma 2 2B.

    kissane-gpt2-small: downloads each layer's .pt and _cfg.json from ckkissane/attn-saes-gpt2-small-all-layers at a
    pinned commit (with huggingface_hub), checks the .pt against its pinned sha256 and the cfg against the published
    recipe, loads the weights with torch.load(weights_only=True). gemma-scope-2b-att: downloads each layer's
    params.npz (the width and the published average L0 nearest --l0) from google/gemma-scope-2b-pt-att, checks it
    against the sha256 the hub lists, reads it without pickle and stores it as a JumpReLU SAE. Either way writes
    OUT/L<layer> (cfg.json with the provenance, sae_weights.safetensors; no sparsity file: none was published), each
    folder complete or not at all. Evaluate one with `attnsae evaluate --sae OUT/L<layer> --out ...`.
    """
    if published_set == published_sets.GEMMA_SCOPE.name:
        from attnsae.evaluation.gemma_scope import N_LAYERS, import_gemma_scope

        if sha256 is not None or trust_unpinned:
            raise UserError("--sha256 and --trust-unpinned are for kissane-gpt2-small; gemma-scope-2b-att's files are "
                            "checked against the sha256 the hub lists")
        if width is None or l0 is None:
            raise UserError("gemma-scope-2b-att needs --width (e.g. 16k) and --l0 (the average L0 wanted)")
        layers = chosen_layers(layer_args, list(range(N_LAYERS)) if all_layers else None)
        imported = import_gemma_scope(layers, out, width=width, l0=l0, revision=revision or "main", endpoint=endpoint)
        for n, info in imported.items():
            click.echo(f"import L{n}: {info['file']} (average L0 {info['average_l0']}, asked {l0}) sha256 "
                       f"{info['sha256'][:16]}... at {info['revision'][:12]} -> {layout.sae_dir(n, Path(out))}")
        return
    from attnsae.evaluation.paper_saes import PAPER_SAES, REVISION, import_paper_saes

    if width is not None or l0 is not None:
        raise UserError("--width and --l0 are for gemma-scope-2b-att (the paper's set has one SAE per layer)")
    layers = chosen_layers(layer_args, sorted(PAPER_SAES) if all_layers else None)
    if sha256 is not None and len(layers) != 1:
        raise UserError("--sha256 pins one file; use it with a single --layer")
    imported = import_paper_saes(layers, out, revision=revision or REVISION, endpoint=endpoint, sha256=sha256,
                                trust_unpinned=trust_unpinned)
    for n, info in imported.items():
        click.echo(f"import L{n}: {info['file']} sha256 {info['sha256'][:16]}... "
                   f"({info['sha256_checked_against']}) -> {layout.sae_dir(n, Path(out))}")


@main.command()
@params_option
@click.option("--layer", "layer_args", multiple=True,
              help="Layer number, e.g. 3 or L3; repeat for several [default: every layer in params.yaml].")
@click.option("--no-evaluate", is_flag=True, help="Check the hashes only; do not re-evaluate the SAEs.")
@one_line_errors
def verify(params_path: str, layer_args: tuple[str, ...], no_evaluate: bool) -> None:
    """Check pulled SAEs: hashes against dvc.lock, then a re-evaluation against the recorded metrics.

    For each layer, recomputes the hashes of models/sae/L<layer> and models/published/L<layer> (DVC's md5)
    and compares them with dvc.lock, file by file; then re-evaluates the SAE on the evaluation tokens
    (params: evaluate; models/base and data/tokens checked against dvc.lock first) writing nothing, and
    compares with reports/metrics/L<layer>.json. Tolerances: 1e-4 nats on CEs and KLs; loss recovered
    and KL score 1e-4, or what 1e-4 nats in their terms can move them; mse 1e-4 relative; L0 0.1% or 4
    activations crossing zero; dead and dense fractions 2 features; counts and names exact.
    Prints one line per layer and check; exit status 1 on any mismatch.
    """
    from attnsae.evaluation.verify import summarize, verify_layers

    params = config.read_params(params_path)
    known = config.layers(params)
    layers = chosen_layers(layer_args, known if not layer_args else None, known, params_path)
    cfg = None if no_evaluate else config.evaluate_config(params)
    checks = []
    for check in verify_layers(layers, cfg):
        checks.append(check)
        for line in check.lines():
            click.echo(line)
    ok, summary = summarize(checks, layers, evaluated=cfg is not None)
    click.echo(summary)
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    sys.exit(main())
