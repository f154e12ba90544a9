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

    return layer_run(layer, stage, str(params.get("profile", "custom")), params=params)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """attnsae: sparse autoencoders on attention outputs (hook_z), trained, evaluated and reproduced.

    The stages run in this order (dvc repro runs them for you):
    model -> corpus -> tokenize -> activations -> train@L -> evaluate@L -> report, publish@L;
    streaming profiles (gpt2-small) store no text, tokens or activations, train every layer in one
    stage from one model pass, and also import and evaluate the published SAEs.
    """


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
@click.option("--layer", default=None, help="Layer number, e.g. 3 or L3 [default: the layer in the SAE's cfg.json].")
@click.option("--model", "model_dir", default=MODEL_DIR, show_default=True)
@click.option("--tokens", "tokens_dir", default=TOKENS_DIR, show_default=True)
@click.option("--sae", "sae_dir", default=None,
              help=f"Any hook_z SAE folder in the SAELens format (ours, imported, SAELens) [default: {SAE_DIR}/L<layer>]")
@click.option("--max-rows", type=click.IntRange(min=0), default=None,
              help="Evaluate on the first N eval rows (0: all) [default: params evaluate.max_rows].")
@click.option("--batch-rows", type=click.IntRange(min=1), default=None,
              help="Rows per forward pass [default: params evaluate.batch_rows].")
@click.option("--out", default=None, help=f"Metrics JSON [default: {METRICS_DIR}/L<layer>.json]")
@click.option("--density", default=None, help=f"Density histogram CSV [default: {DENSITY_DIR}/L<layer>.csv]")
@click.option("--no-mlflow", is_flag=True, help="Do not log to MLflow.")
@one_line_errors
def evaluate(
    params_path: str, layer: str | None, model_dir: str, tokens_dir: str, sae_dir: str | None,
    max_rows: int | None, batch_rows: int | None, out: str | None, density: str | None, no_mlflow: bool,
) -> None:
    """Evaluate a hook_z SAE on the held-out split of a model's tokens (params: evaluate).

    With --sae, any SAELens-format hook_z SAE folder; its layer comes from its cfg.json.
    """
    from attnsae.evaluate import evaluate_layer, format_metrics, sae_layer
    from attnsae.sae import read_sae_cfg

    params = config.read_params(params_path)
    if layer is None and sae_dir is None:
        raise UserError("name the SAE to evaluate: --layer (our models/sae/L<layer>) or --sae FOLDER")
    n = sae_layer(read_sae_cfg(sae_dir), sae_dir) if layer is None else config.parse_layer(layer)
    overrides = {k: v for k, v in (("max_rows", max_rows), ("batch_rows", batch_rows)) if v is not None}
    cfg = config.evaluate_config(params).model_copy(update=overrides)
    sae_dir = sae_dir or f"{SAE_DIR}/L{n}"
    out = out or f"{METRICS_DIR}/L{n}.json"
    with tracked(params, n, "evaluate", no_mlflow) as run:
        metrics = evaluate_layer(cfg, model_dir, tokens_dir, sae_dir, n, out, density or f"{DENSITY_DIR}/L{n}.csv")
        if run is not None:
            run.log_params({f"evaluate.{k}": v for k, v in cfg.model_dump().items()})
            run.log_metrics({k: v for k, v in metrics.items() if k != "layer"})
            run.log_artifact(out)
            run.tag_evaluated_sae(sae_dir)
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
@click.option("--no-mlflow", is_flag=True, help="Do not log the report to the pipeline's MLflow parent run.")
@one_line_errors
def report(params_path: str, out: str, no_mlflow: bool) -> None:
    """Write reports/report.md, reports/index.html and reports/layers.csv (params: layers, report).

    The report and the per-layer table also go to the pipeline's MLflow parent run.
    """
    import json

    from attnsae.files import write_text_atomic
    from attnsae.report import build_report
    from attnsae.tracking import layer_table_csv, log_report

    params = config.read_params(params_path)
    layers = config.layers(params)
    compare = config.report_config(params).compare
    markdown = build_report(layers, METRICS_DIR, DENSITY_DIR, MODEL_DIR, TOKENS_DIR, out, compare=compare, sae_dir=SAE_DIR)
    # The per-layer table as data: `dvc plots` draws the L0 / loss-recovered frontier from it.
    per_layer = [json.loads((Path(METRICS_DIR) / f"L{n}.json").read_text()) for n in layers]
    table = Path(out) / "layers.csv"
    write_text_atomic(table, layer_table_csv(per_layer))
    if not no_mlflow:
        log_report(str(params.get("profile", "custom")), params, per_layer, [Path(out) / "report.md", table])
    click.echo(markdown)


@main.command(name="mlflow-init")
@click.argument("uri", required=False)
@one_line_errors
def mlflow_init(uri: str | None) -> None:
    """Prepare an MLflow store once, before concurrent writers use it.

    URI: a SQLite file (sqlite:////abs/path/mlflow.db: creates its tables; do this before starting an
    `mlflow server` on it) or a server (http://host:port: creates the attnsae experiment there)
    [default: MLFLOW_TRACKING_URI, else sqlite:///<repo>/mlflow.db].
    """
    from attnsae.tracking import init_store

    uri, done = init_store(uri)
    click.echo(f"mlflow-init: {uri}: {done}")


@main.command()
@layer_option
@click.option("--sae", "sae_dir", default=None, help=f"SAE folder [default: {SAE_DIR}/L<layer>]")
@click.option("--metrics", "metrics_path", default=None, help=f"Metrics JSON [default: {METRICS_DIR}/L<layer>.json]")
@click.option("--out", default=None, help="Folder to write [default: models/published/L<layer>]")
@one_line_errors
def publish(layer: str, sae_dir: str | None, metrics_path: str | None, out: str | None) -> None:
    """Copy one layer's SAE into a publishable folder with a model card (README.md) built from its metrics."""
    from attnsae.publish import publish_layer

    n = config.parse_layer(layer)
    out = out or f"models/published/L{n}"
    card = publish_layer(sae_dir or f"{SAE_DIR}/L{n}", metrics_path or f"{METRICS_DIR}/L{n}.json", out)
    click.echo(f"publish L{n}: {out} (SAE files + {card.name})")


@main.command(name="import")
@click.option("--layer", "layer_args", multiple=True, help="Layer number, e.g. 3 or L3; repeat for several.")
@click.option("--all-layers", is_flag=True, help="All 12 published layers (0 to 11).")
@click.option("--revision", default=None,
              help="Commit of the hub repo to fetch from, 40 hex characters [default: the pinned commit]")
@click.option("--base-url", default=None,
              help="URL prefix that holds the files, e.g. a mirror; {revision} in it is replaced "
                   "[default: https://huggingface.co/ckkissane/attn-saes-gpt2-small-all-layers/resolve/{revision}/]")
@click.option("--out", default="models/imported", show_default=True,
              help="Folder that receives one SAE folder per layer, named L<layer> (apart from models/sae, "
                   "which training owns, and models/published, which `attnsae publish` writes).")
@click.option("--sha256", "sha256", default=None,
              help="sha256 the layer's .pt must have, instead of the pinned one (one --layer only).")
@click.option("--trust-unpinned", is_flag=True,
              help="Accept a .pt that has no pinned sha256; the hash it has is recorded in cfg.json.")
@one_line_errors
def import_saes(
    layer_args: tuple[str, ...], all_layers: bool, revision: str | None, base_url: str | None, out: str,
    sha256: str | None, trust_unpinned: bool,
) -> None:
    """Import the published GPT-2 Small attention SAEs (Kissane et al.) as SAE folders.

    Downloads each layer's .pt and _cfg.json from ckkissane/attn-saes-gpt2-small-all-layers at a pinned
    commit, checks the .pt against its pinned sha256 and the cfg against the published recipe, loads the
    weights with torch.load(weights_only=True) and writes OUT/L<layer> (cfg.json, sae_weights.safetensors;
    no sparsity file: none was published). Each folder appears complete or not at all. Evaluate one with
    `attnsae evaluate --layer L --sae OUT/L<layer> --out ...`.
    """
    from attnsae.published_saes import PUBLISHED, REVISION, import_published

    if bool(layer_args) == all_layers:
        raise UserError("name the layers to import: either --layer (repeatable) or --all-layers")
    layers = sorted(PUBLISHED) if all_layers else [config.parse_layer(a) for a in layer_args]
    if len(set(layers)) != len(layers):
        raise UserError(f"--layer lists a layer twice: {', '.join(layer_args)}")
    if sha256 is not None and len(layers) != 1:
        raise UserError("--sha256 pins one file; use it with a single --layer")
    imported = import_published(layers, out, revision=revision or REVISION, base_url=base_url, sha256=sha256,
                                trust_unpinned=trust_unpinned)
    for n, info in imported.items():
        click.echo(f"import L{n}: {info['file']} sha256 {info['sha256'][:16]}... "
                   f"({info['sha256_checked_against']}) -> {Path(out) / f'L{n}'}")


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
    (params: evaluate; models/base and data/tokens checked against dvc.lock first) into a temporary folder
    and compares with reports/metrics/L<layer>.json. Tolerances: 1e-4 nats on CEs and KLs; loss recovered
    and KL score 1e-4, or what 1e-4 nats in their terms can move them; mse 1e-4 relative; L0 0.1% or 4
    activations crossing zero; dead and dense fractions 2 features; counts and names exact.
    Prints one line per layer and check; exit status 1 on any mismatch.
    """
    from attnsae.verify import Layout, summarize, verify_layers

    params = config.read_params(params_path)
    known = config.layers(params)
    layers = [config.parse_layer(a) for a in layer_args] or known
    if len(set(layers)) != len(layers):
        raise UserError(f"--layer lists a layer twice: {', '.join(layer_args)}")
    for n in layers:
        if n not in known:
            raise UserError(f"--layer {n}: not a layer of {params_path} (allowed: {', '.join(map(str, known))})")
    cfg = None if no_evaluate else config.evaluate_config(params)
    layout = Layout(sae_dir=SAE_DIR, metrics_dir=METRICS_DIR, model_dir=MODEL_DIR, tokens_dir=TOKENS_DIR)
    checks = []
    for check in verify_layers(layers, cfg, layout):
        checks.append(check)
        for line in check.lines():
            click.echo(line)
    ok, summary = summarize(checks, layers, evaluated=cfg is not None)
    click.echo(summary)
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    sys.exit(main())
