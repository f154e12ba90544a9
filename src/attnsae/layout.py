"""Where every artifact of the pipeline lands: the one module that owns the repository's paths.

Paths are relative to the repository root, where DVC runs every stage. Each artifact has one writer
(its stage's module). Its reader lives with the writer, or, where other stages read the file, in a light module of
``formats`` that imports no stage, so a reader's DVC code deps stay its own code (module paths below are under
``attnsae``):

- params check: `reports/params-check.txt`. Written by `params`: `cli.check_params` (`preflight.check`); read by
  every other stage (a dep).
- base model: `models/base/` (transformers folder + `attnsae_model.json`). Written by `model`:
  `data.models.prepare_model`; read with `data.models.load_bridge`, `formats.model_info.read_model_info`; read by
  all but corpus.
- corpus: `data/corpus/` (`documents.jsonl` + `manifest.json`; streamed: the manifest only). Written by `corpus`:
  `data.corpus.build_corpus`; read with `data.corpus.open_documents`, `data.corpus.open_sourced_documents`,
  `data.corpus.read_manifest`; read by tokenize, train (stream).
- token rows: `data/tokens/` (`train.npy`, `eval.npy`, `heldout.npy` when sources are held out, `meta.json`).
  Written by `tokenize`: `data.tokenization.tokenize_stage`; read with `data.tokenization.load_rows`,
  `formats.tokens_meta.read_tokens_meta`; read by activations, train (stream), evaluate, report.
- activation cache: `data/activations/L<n>/` (bf16 shards + `meta.json`). Written by `activations`:
  `data.activations.cache_activations`; read with `data.activations.DiskActivations`; read by train@L.
- SAE: `models/sae/L<n>/` (`cfg.json`, `sae_weights.safetensors`, `sparsity.safetensors`). Written by `train@L` /
  `train`: `sae.training.run_train_stage`; read with `sae.autoencoder.load_sae`, `formats.sae_cfg.read_sae_cfg`;
  read by evaluate, report, publish.
- training curves: `reports/curves/L<n>.csv`. Written by `train@L` / `train`; read with `dvc plots`.
- metrics: `reports/metrics/L<n>.json`. Written by `evaluate`: `evaluation.evaluate.evaluate_layers`; read with
  `formats.metrics.read_metrics`; read by report, publish, verify.
- held-out metrics: `reports/metrics_heldout/L<n>.json` (says so when no source is held out). Written by `evaluate`;
  read with `formats.metrics.read_heldout_metrics`; read by report.
- density histogram: `reports/density/L<n>.csv`. Written by `evaluate`; read with `formats.metrics.read_density`;
  read by report.
- dashboards: `reports/dashboards/L<n>/` (`features.json` + `index.html`). Written by `dashboards@L`:
  `features.dashboards.build_dashboards`; read with `formats.features.read_features`; read by report.
- labels: `labels/L<n>.csv` (git-tracked, people's ratings). Written by `attnsae labels import`:
  `features.labels.import_labels`; read with `features.labels.read_labels`; read by report.
- report: `reports/report.md`, `reports/index.html`, `reports/layers.csv`. Written by `report`:
  `reporting.report.build_report`; read by people, and by `dvc plots` (frontier).
- published SAE: `models/published/L<n>/` (SAE + model card). Written by `publish@L`:
  `reporting.publish.publish_layer`; read with `sae.autoencoder.load_sae`; read by `attnsae verify`, other repos.
- imported SAE: `models/imported/L<n>/`. Written by `import_published_saes@L`:
  `evaluation.paper_saes.import_paper_saes` or `evaluation.gemma_scope.import_gemma_scope`; read with
  `sae.autoencoder.load_sae`; read by evaluate_published_saes, dashboards_published_saes.
- imported metrics: `reports/imported/{metrics,density}/L<n>.*`. Written by `evaluate_published_saes@L`; read with
  `formats.metrics.read_metrics`; read by report (`report.compare`).
- checkpoints: `checkpoints/train-L<n>[-L<m>...].pt` (outside every DVC output). Written by train; read with
  `sae.checkpoints.load_checkpoint`; read by train (resume).
- MLflow store: `mlflow.db`, `mlruns/`. Written by `reporting.tracking`; read with `mlflow ui`.

DVC deletes a stage's outputs before it runs the stage, which is why checkpoints live outside them.
"""

from __future__ import annotations

from pathlib import Path

PARAMS_CHECK_FILE = Path("reports/params-check.txt")
MODEL_DIR = Path("models/base")
CORPUS_DIR = Path("data/corpus")
TOKENS_DIR = Path("data/tokens")
ACTIVATIONS_DIR = Path("data/activations")
SAE_ROOT = Path("models/sae")
PUBLISHED_ROOT = Path("models/published")
IMPORTED_ROOT = Path("models/imported")
REPORT_DIR = Path("reports")
CURVES_DIR = REPORT_DIR / "curves"
METRICS_DIR = REPORT_DIR / "metrics"
HELDOUT_METRICS_DIR = REPORT_DIR / "metrics_heldout"
DENSITY_DIR = REPORT_DIR / "density"
IMPORTED_REPORTS_DIR = REPORT_DIR / "imported"
DASHBOARDS_DIR = REPORT_DIR / "dashboards"
LABELS_DIR = Path("labels")
CHECKPOINT_DIR = Path("checkpoints")

REPORT_MD = REPORT_DIR / "report.md"
REPORT_HTML = REPORT_DIR / "index.html"
LAYERS_CSV = REPORT_DIR / "layers.csv"  # the per-layer table as data: the frontier plot's input
# Every frontier experiment's points (`attnsae frontier collect` writes it, git-tracked; the report draws it).
FRONTIER_FILE = REPORT_DIR / "frontier.csv"


def layer_name(layer: int) -> str:
    """How a layer is spelled in file names, params keys and run names: ``L3``."""
    return f"L{layer}"


def sae_dir(layer: int, root: Path = SAE_ROOT) -> Path:
    return root / layer_name(layer)


def published_dir(layer: int) -> Path:
    return PUBLISHED_ROOT / layer_name(layer)


def activations_dir(layer: int, root: Path = ACTIVATIONS_DIR) -> Path:
    return Path(root) / layer_name(layer)


def curves_file(layer: int) -> Path:
    return CURVES_DIR / f"{layer_name(layer)}.csv"


def metrics_file(layer: int, folder: Path = METRICS_DIR) -> Path:
    return Path(folder) / f"{layer_name(layer)}.json"


def heldout_metrics_file(layer: int, folder: Path = HELDOUT_METRICS_DIR) -> Path:
    return Path(folder) / f"{layer_name(layer)}.json"


def density_file(layer: int, folder: Path = DENSITY_DIR) -> Path:
    return Path(folder) / f"{layer_name(layer)}.csv"


def dashboards_dir(layer: int, root: Path = DASHBOARDS_DIR) -> Path:
    return Path(root) / layer_name(layer)


def features_file(layer: int, root: Path = DASHBOARDS_DIR) -> Path:
    return dashboards_dir(layer, root) / "features.json"


def dashboard_page(layer: int, root: Path = DASHBOARDS_DIR) -> Path:
    return dashboards_dir(layer, root) / "index.html"


def labels_file(layer: int, root: Path = LABELS_DIR) -> Path:
    return Path(root) / f"{layer_name(layer)}.csv"


# Every path a stage of either pipeline writes (dvc.yaml's outs) or a command keeps (labels, the frontier table).
STAGE_OUTPUTS = (PARAMS_CHECK_FILE, MODEL_DIR, CORPUS_DIR, TOKENS_DIR, ACTIVATIONS_DIR, SAE_ROOT, PUBLISHED_ROOT,
                 IMPORTED_ROOT, CURVES_DIR, METRICS_DIR, HELDOUT_METRICS_DIR, DENSITY_DIR, IMPORTED_REPORTS_DIR,
                 DASHBOARDS_DIR, REPORT_MD, REPORT_HTML, LAYERS_CSV, FRONTIER_FILE, LABELS_DIR)


def stage_output_holding(path: str | Path) -> Path | None:
    """The stage output that ``path`` is, or lies inside (None: a path of the user's)."""
    path = Path(path).resolve()
    return next((out for out in STAGE_OUTPUTS if path == out.resolve() or out.resolve() in path.parents), None)


def results_of(sae: str | Path) -> frozenset[Path]:
    """The files and folders the pipeline's evaluate and dashboards stages write for one of its SAE folders (ours at
    ``models/sae/L<n>``, the paper's at ``models/imported/L<n>``), resolved; none for an SAE from elsewhere."""
    sae = Path(sae).resolve()
    layer = sae.name[1:]
    if sae.name != f"L{layer}" or not layer.isdigit():
        return frozenset()
    n = int(layer)
    if sae.parent == SAE_ROOT.resolve():
        paths = [metrics_file(n), density_file(n), heldout_metrics_file(n), dashboards_dir(n)]
    elif sae.parent == IMPORTED_ROOT.resolve():
        paths = [metrics_file(n, IMPORTED_REPORTS_DIR / "metrics"), density_file(n, IMPORTED_REPORTS_DIR / "density"),
                 dashboards_dir(n, IMPORTED_REPORTS_DIR / "dashboards")]
    else:
        return frozenset()
    return frozenset(p.resolve() for p in paths)


def checkpoint_file(layers: list[int]) -> Path:
    """One checkpoint per set of layers trained together (the stream pipeline trains them all at once)."""
    return CHECKPOINT_DIR / f"train-{'-'.join(layer_name(n) for n in layers)}.pt"

