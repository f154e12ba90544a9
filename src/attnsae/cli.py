"""The `attnsae` command: one subcommand per pipeline stage, each a thin call into its stage module.

dvc.yaml runs these; each reads only the params.yaml sections that its dvc.yaml stage declares.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from pathlib import Path

import click

from attnsae import config
from attnsae.errors import UserError

MODEL_DIR = "models/base"
CORPUS_DIR = "data/corpus"
TOKENS_DIR = "data/tokens"
ACTIVATIONS_DIR = "data/activations"
SAE_DIR = "models/sae"
METRICS_DIR = "reports/metrics"
DENSITY_DIR = "reports/density"
CURVES_DIR = "reports/curves"
REPORT_DIR = "reports"
CHECKPOINT_DIR = "checkpoints"  # outside every DVC output: DVC deletes outputs before it re-runs a stage


def one_line_errors(fn):
    """Bad input ends the command with one line on stderr and exit status 1, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            raise click.ClickException(str(err)) from None

    return wrapper


params_option = click.option(
    "--params", "params_path", default=config.PARAMS_FILE, show_default=True, type=click.Path(dir_okay=False),
    help="The params file to read.",
)
layer_option = click.option("--layer", required=True, help="Layer number, e.g. 3 or L3.")


def tracked(params: dict, layer: int, stage: str, disabled: bool):
    """The layer's MLflow child run, or nothing when tracking is switched off."""
    if disabled:
        return contextlib.nullcontext(None)
    from attnsae.tracking import layer_run

    return layer_run(layer, stage, str(params.get("profile", "custom")))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """attnsae: sparse autoencoders on attention outputs (hook_z), trained, evaluated and reproduced.

    The stages run in this order (dvc repro runs them for you):
    model -> corpus -> tokenize -> activations -> train@L -> evaluate@L -> report;
    streaming profiles (gpt2-small) train every layer in one stage from one model pass, without
    the activations stage.
    """


@main.command()
@click.argument("name", required=False)
@click.option("--root", default=".", type=click.Path(file_okay=False), help="Repository root.")
@one_line_errors
def profile(name: str | None, root: str) -> None:
    """Make profiles/NAME.yaml the active params.yaml and write its pipeline to dvc.yaml (no NAME: list them)."""
    root_path = Path(root)
    names = config.list_profiles(root_path)
    if name is None:
        for n in names:
            click.echo(n)
        return
    if name not in names:
        raise UserError(f"unknown profile {name!r} (allowed: {', '.join(names)})")
    source = root_path / config.PROFILES_DIR / f"{name}.yaml"
    params = config.read_params(source)
    config.validate(params)  # before replacing anything
    from attnsae.files import write_text_atomic

    mode = "stream" if config.activations_config(params).source == "stream" else "cache"
    pipeline = root_path / config.PIPELINES_DIR / f"{mode}.yaml"
    if not pipeline.is_file():
        raise UserError(f"{pipeline}: missing; profiles need the pipeline files in {config.PIPELINES_DIR}/")
    write_text_atomic(root_path / config.PARAMS_FILE, source.read_text())
    write_text_atomic(root_path / "dvc.yaml", pipeline.read_text())
    click.echo(f"params.yaml is now profile {name!r} and dvc.yaml the {mode} pipeline; run `dvc repro` to build it")


@main.command()
@params_option
@click.option("--out", default=MODEL_DIR, show_default=True)
@one_line_errors
def model(params_path: str, out: str) -> None:
    """Obtain, check and pin the base model (params: model)."""
    from attnsae.models import prepare_model

    cfg = config.model_config(config.read_params(params_path))
    info = prepare_model(cfg, out)
    click.echo(f"model: {info.name}: {info.n_layers} layers, hook_z {info.n_heads}x{info.d_head} -> {out}")


@main.command()
@params_option
@click.option("--out", default=CORPUS_DIR, show_default=True)
@click.option("--stream", is_flag=True,
              help="Do not store the documents: pin the sources (hf: revisions to a commit) and read them on the fly later.")
@one_line_errors
def corpus(params_path: str, out: str, stream: bool) -> None:
    """Fetch and write the text documents, or with --stream pin their sources (params: corpus)."""
    from attnsae.corpus import build_corpus

    cfg = config.corpus_config(config.read_params(params_path))
    manifest = build_corpus(cfg, out, stream=stream)
    if stream:
        click.echo(f"corpus: streamed from {', '.join(manifest['sources'])} -> {out}/manifest.json")
    else:
        click.echo(f"corpus: {manifest['documents']} documents, {manifest['characters']:,} characters -> {out}")


@main.command()
@params_option
@click.option("--corpus", "corpus_dir", default=CORPUS_DIR, show_default=True)
@click.option("--model", "model_dir", default=MODEL_DIR, show_default=True)
@click.option("--out", default=TOKENS_DIR, show_default=True)
@one_line_errors
def tokenize(params_path: str, corpus_dir: str, model_dir: str, out: str) -> None:
    """Documents -> rows of context_size tokens with BOS, train/eval split (params: tokenize).

    A streamed corpus gets its eval rows only; training makes its train rows on the fly.
    """
    from attnsae.corpus import describe_corpus, open_documents, read_manifest
    from attnsae.models import load_tokenizer, read_model_info
    from attnsae.tokenization import tokenize_corpus

    cfg = config.tokenize_config(config.read_params(params_path))
    info = read_model_info(model_dir)
    streamed = bool(read_manifest(corpus_dir).get("streamed"))
    meta = tokenize_corpus(cfg, open_documents(corpus_dir), load_tokenizer(model_dir), info.bos_token_id, out,
                           describe_corpus(corpus_dir), streamed=streamed)
    train = "streamed during training" if streamed else f"{meta['tokens']['train']:,} tokens"
    click.echo(f"tokenize: train {train}, eval {meta['tokens']['eval']:,} tokens -> {out}")


@main.command()
@params_option
@click.option("--model", "model_dir", default=MODEL_DIR, show_default=True)
@click.option("--tokens", "tokens_dir", default=TOKENS_DIR, show_default=True)
@click.option("--out", default=ACTIVATIONS_DIR, show_default=True)
@one_line_errors
def activations(params_path: str, model_dir: str, tokens_dir: str, out: str) -> None:
    """Cache hook_z of every selected layer from one forward pass per batch (params: activations, model, layers)."""
    from attnsae.activations import cache_activations

    params = config.read_params(params_path)
    summary = cache_activations(
        config.activations_config(params), config.model_config(params), model_dir, tokens_dir, config.layers(params), out
    )
    click.echo(f"activations: {summary['tokens']:,} tokens x {len(summary['layers'])} layers, d_in {summary['d_in']} -> {out}")


@main.command()
@params_option
@click.option("--layer", "layer_args", multiple=True,
              help="Layer number, e.g. 3 or L3; repeat to train several layers from one model pass (--stream).")
@click.option("--all-layers", is_flag=True, help="Every layer in params.yaml's `layers` (with --stream).")
@click.option("--stream", is_flag=True,
              help="Run the model on the fly instead of reading the activation cache; all --layer SAEs share one pass.")
@click.option("--activations", "activations_dir", default=ACTIVATIONS_DIR, show_default=True)
@click.option("--model", "model_dir", default=MODEL_DIR, show_default=True)
@click.option("--corpus", "corpus_dir", default=CORPUS_DIR, show_default=True, help="Corpus to stream from (--stream).")
@click.option("--tokens", "tokens_dir", default=TOKENS_DIR, show_default=True)
@click.option("--out", default=None, help=f"SAE folder, one layer only [default: {SAE_DIR}/L<layer>]")
@click.option("--curves", default=None, help=f"Training curves CSV, one layer only [default: {CURVES_DIR}/L<layer>.csv]")
@click.option("--checkpoint-every", type=click.IntRange(min=0), default=0, show_default=True,
              help="Save a checkpoint every N steps (0: never); a restarted run resumes from it.")
@click.option("--checkpoint", "checkpoint_path", default=None,
              help=f"Checkpoint file [default: {CHECKPOINT_DIR}/train-L<layer>.pt]")
@click.option("--no-mlflow", is_flag=True, help="Do not log to MLflow.")
@one_line_errors
def train(
    params_path: str, layer_args: tuple[str, ...], all_layers: bool, stream: bool, activations_dir: str,
    model_dir: str, corpus_dir: str, tokens_dir: str, out: str | None, curves: str | None, checkpoint_every: int,
    checkpoint_path: str | None, no_mlflow: bool,
) -> None:
    """Train SAEs (params: sae, per_layer.L<layer>; with --stream also model, activations)."""
    from attnsae.train import train_layer, train_layers_streaming

    params = config.read_params(params_path)
    if bool(layer_args) == all_layers:
        raise UserError("name the layers to train: either --layer (repeatable) or --all-layers")
    layers = config.layers(params) if all_layers else [config.parse_layer(a) for a in layer_args]
    if len(set(layers)) != len(layers):
        raise UserError(f"--layer lists a layer twice: {', '.join(layer_args)}")
    if len(layers) > 1 and (out or curves):
        raise UserError("--out and --curves name one layer's files; leave them out when training several layers")
    if len(layers) > 1 and not stream:
        raise UserError("several --layer values share one model pass only with --stream")
    cfgs = {n: config.sae_config(params, n) for n in layers}
    out_dirs = {n: Path(out or f"{SAE_DIR}/L{n}") for n in layers}
    curves_paths = {n: Path(curves or f"{CURVES_DIR}/L{n}.csv") for n in layers}
    checkpoint = Path(checkpoint_path or f"{CHECKPOINT_DIR}/train-{'-'.join(f'L{n}' for n in layers)}.pt")
    with contextlib.ExitStack() as stack:
        runs = {n: stack.enter_context(tracked(params, n, "train", no_mlflow)) for n in layers}
        if stream:
            act = config.activations_config(params)
            train_layers_streaming(cfgs, config.model_config(params), act.batch_rows, model_dir, corpus_dir, tokens_dir,
                                   out_dirs, curves_paths, runs, checkpoint, checkpoint_every)
        else:
            n = layers[0]
            train_layer(cfgs[n], n, activations_dir, out_dirs[n], curves_paths[n], runs[n], checkpoint, checkpoint_every)


@main.command()
@params_option
@layer_option
@click.option("--model", "model_dir", default=MODEL_DIR, show_default=True)
@click.option("--tokens", "tokens_dir", default=TOKENS_DIR, show_default=True)
@click.option("--sae", "sae_dir", default=None, help=f"SAE folder [default: {SAE_DIR}/L<layer>]")
@click.option("--out", default=None, help=f"Metrics JSON [default: {METRICS_DIR}/L<layer>.json]")
@click.option("--density", default=None, help=f"Density histogram CSV [default: {DENSITY_DIR}/L<layer>.csv]")
@click.option("--no-mlflow", is_flag=True, help="Do not log to MLflow.")
@one_line_errors
def evaluate(
    params_path: str, layer: str, model_dir: str, tokens_dir: str, sae_dir: str | None, out: str | None,
    density: str | None, no_mlflow: bool,
) -> None:
    """Evaluate one layer's SAE on the held-out split (params: evaluate)."""
    from attnsae.evaluate import evaluate_layer, format_metrics

    params = config.read_params(params_path)
    n = config.parse_layer(layer)
    cfg = config.evaluate_config(params)
    sae_dir = sae_dir or f"{SAE_DIR}/L{n}"
    out = out or f"{METRICS_DIR}/L{n}.json"
    with tracked(params, n, "evaluate", no_mlflow) as run:
        metrics = evaluate_layer(cfg, model_dir, tokens_dir, sae_dir, n, out, density or f"{DENSITY_DIR}/L{n}.csv")
        if run is not None:
            run.log_params({f"evaluate.{k}": v for k, v in cfg.model_dump().items()})
            run.log_metrics({k: v for k, v in metrics.items() if k != "layer"})
            run.log_artifact(out)
    click.echo(f"evaluate L{n}: {metrics['model']}")
    for line in format_metrics(metrics):
        click.echo(line)


@main.command()
@params_option
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Device whose matmul throughput the time estimate uses.")
@one_line_errors
def plan(params_path: str, device: str) -> None:
    """Print what the active profile costs before running it: tokens, FLOPs, memory, time."""
    from attnsae.models import resolve_device
    from attnsae.plan import describe_plan

    for line in describe_plan(config.read_params(params_path), resolve_device(device)):
        click.echo(line)


@main.command()
@params_option
@click.option("--out", default=REPORT_DIR, show_default=True)
@one_line_errors
def report(params_path: str, out: str) -> None:
    """Write reports/report.md and reports/index.html (params: layers)."""
    from attnsae.report import build_report

    layers = config.layers(config.read_params(params_path))
    markdown = build_report(layers, METRICS_DIR, DENSITY_DIR, MODEL_DIR, TOKENS_DIR, out)
    click.echo(markdown)


if __name__ == "__main__":
    sys.exit(main())
