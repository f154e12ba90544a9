"""Every reader of a pipeline artifact, given a damaged copy: exit status 1, one line naming the file,
no traceback, and nothing else in the tree touched. Then full disks and killed writers.

One small real tree is built once by the stage functions (tiny-gpt2, a synthetic corpus, one layer).
Each row corrupts one file of a copy and runs the command that reads it: in-process through click's
CliRunner (an uncaught exception is rendered as the traceback a user would see), and a few rows through
the installed `attnsae` script, to prove the same of a real process.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from attnsae import config, files, layout
from attnsae.cli import main
from attnsae.data.activations import shard_name
from attnsae.errors import UserError
from helpers import OFFLINE_ENV, read_tiny_params

ATTNSAE = Path(sys.executable).with_name("attnsae")
LAYER = 1

# The pipeline's own paths (layout.py), relative to the copy the test corrupts.
MODEL = str(layout.MODEL_DIR)
CORPUS = str(layout.CORPUS_DIR)
TOKENS = str(layout.TOKENS_DIR)
ACTIVATIONS = str(layout.ACTIVATIONS_DIR)
SAE = str(layout.sae_dir(LAYER))
METRICS = str(layout.metrics_file(LAYER))
HELDOUT_METRICS = str(layout.heldout_metrics_file(LAYER))
DENSITY = str(layout.density_file(LAYER))
CURVES = str(layout.curves_file(LAYER))
CHECKPOINT = str(layout.checkpoint_file([LAYER]))
SHARD = str(layout.activations_dir(LAYER) / shard_name(1))

# Each command with every path it reads or writes pointing into the copy (report reads the default paths).
COMMANDS = {
    "tokenize": ["tokenize", "--corpus", CORPUS, "--model", MODEL, "--out", TOKENS],
    "activations": ["activations", "--model", MODEL, "--tokens", TOKENS, "--out", ACTIVATIONS],
    "train": ["train", "--layer", str(LAYER), "--activations", ACTIVATIONS, "--out", SAE, "--curves", CURVES,
              "--checkpoint", CHECKPOINT, "--checkpoint-every", "2", "--no-mlflow"],
    "evaluate": ["evaluate", "--layer", str(LAYER), "--model", MODEL, "--tokens", TOKENS, "--sae", SAE,
                 "--out", METRICS, "--density", DENSITY, "--no-mlflow"],
    "report": ["report", "--out", "reports", "--no-mlflow"],
}


def tiny_params() -> dict:
    """The tiny profile cut down to one layer and a few hundred rows."""
    params = read_tiny_params()
    params.update(layers=[LAYER], per_layer={f"L{LAYER}": {}})
    params["corpus"]["synthetic_documents"] = 40
    params["tokenize"].update(context_size=32, max_eval_rows=8)
    params["activations"].update(tokens=1024, batch_rows=8, shard_tokens=256)  # 4 shards
    params["sae"].update(d_sae=64, batch_size=64, train_tokens=640, buffer_rows=256, resample_inputs=256,
                         warmup_steps=2, resample_every=4, dead_window=2, log_every=2)
    params["evaluate"].update(max_rows=4, batch_rows=4)
    config.validate(params)
    return params


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """A repository with every artifact of the cache pipeline for one layer, made by the real stage functions."""
    from attnsae.data.activations import DiskActivations, cache_activations
    from attnsae.data.corpus import build_corpus
    from attnsae.data.models import prepare_model
    from attnsae.data.tokenization import tokenize_stage
    from attnsae.evaluation.evaluate import EvaluationFiles, evaluate_layers
    from attnsae.sae.training import CachedActivations, run_train_stage, train_saes

    root = tmp_path_factory.mktemp("tree")
    params = tiny_params()
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    with contextlib.chdir(root):
        prepare_model(config.model_config(params), MODEL)
        build_corpus(config.corpus_config(params), CORPUS)
        tokenize_stage(config.tokenize_config(params), CORPUS, MODEL, TOKENS)
        cache_activations(config.activations_config(params), config.model_config(params), MODEL, TOKENS, [LAYER],
                          ACTIVATIONS)
        sae_cfg = config.sae_config(params, LAYER)
        run_train_stage({LAYER: sae_cfg}, CachedActivations(ACTIVATIONS), {LAYER: Path(SAE)}, {LAYER: Path(CURVES)})
        # the stage drops its checkpoint when done; train_saes keeps the last one, a real one to corrupt.
        train_saes({LAYER: sae_cfg}, {LAYER: DiskActivations(layout.activations_dir(LAYER, ACTIVATIONS))},
                   progress=False, checkpoint=Path(CHECKPOINT), checkpoint_every=2)
        evaluate_layers(config.evaluate_config(params), MODEL, TOKENS, {LAYER: SAE},
                        {LAYER: EvaluationFiles(METRICS, DENSITY, HELDOUT_METRICS)})
    assert (root / SHARD).is_file() and (root / CHECKPOINT).is_file()
    return root


# ---------------------------------------------------------------------------------------------------
# Corruptions: each changes (or removes) the file at a path.


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def random_bytes(path: Path) -> None:
    path.write_bytes(random.Random(0).randbytes(max(64, path.stat().st_size)))


def empty(path: Path) -> None:
    path.write_bytes(b"")


def not_utf8(path: Path) -> None:
    path.write_bytes(b"\xff\xfe" + path.read_bytes())


def delete(path: Path) -> None:
    path.unlink()


def json_edit(edit: Callable[[dict], object]) -> Callable[[Path], None]:
    def corrupt(path: Path) -> None:
        path.write_text(json.dumps(edit(json.loads(path.read_text()))))

    return corrupt


def without(key: str) -> Callable[[Path], None]:
    return json_edit(lambda data: {k: v for k, v in data.items() if k != key})


def with_value(key: str, value: object) -> Callable[[Path], None]:
    return json_edit(lambda data: {**data, key: value})


def npy_edit(edit: Callable[[np.ndarray], np.ndarray]) -> Callable[[Path], None]:
    def corrupt(path: Path) -> None:
        np.save(path, edit(np.load(path)))

    return corrupt


def with_token(token_id: int) -> Callable[[Path], None]:
    def edit(rows: np.ndarray) -> np.ndarray:
        rows = rows.copy()
        rows[0, 1] = token_id  # in the first row, which every stage reads (evaluate may read only a few)
        return rows

    return npy_edit(edit)


def shard_edit(edit: Callable[[dict], dict]) -> Callable[[Path], None]:
    def corrupt(path: Path) -> None:
        save_file(edit(load_file(str(path))), str(path))

    return corrupt


def with_nan(tensor):
    tensor = tensor.clone()
    tensor.view(-1)[len(tensor.view(-1)) // 2] = float("nan")
    return tensor


def last_line_without_newline(path: Path) -> None:
    path.write_bytes(path.read_bytes().rstrip(b"\n")[:-5] + b"\n")


# ---------------------------------------------------------------------------------------------------
# The table.


@dataclass(frozen=True)
class Row:
    kind: str
    corruption: str
    command: str
    target: str  # the damaged file, relative to the tree; the one line must name it
    corrupt: Callable[[Path], None]
    in_subprocess: bool = False

    @property
    def id(self) -> str:
        return f"{self.kind}-{self.corruption}".replace(" ", "_")


MODEL_INFO = f"{MODEL}/attnsae_model.json"
MANIFEST = f"{CORPUS}/manifest.json"
DOCUMENTS = f"{CORPUS}/documents.jsonl"
TOKENS_META = f"{TOKENS}/meta.json"
TRAIN_NPY = f"{TOKENS}/train.npy"
EVAL_NPY = f"{TOKENS}/eval.npy"
ACT_META = str(layout.activations_dir(LAYER) / "meta.json")
SAE_CFG = f"{SAE}/cfg.json"
SAE_WEIGHTS = f"{SAE}/sae_weights.safetensors"
VOCAB = 257  # tiny-gpt2's byte-level vocabulary

ROWS = [
    Row("model info", "missing", "tokenize", MODEL_INFO, delete),
    Row("model info", "truncated", "tokenize", MODEL_INFO, truncate),
    Row("model info", "not UTF-8", "tokenize", MODEL_INFO, not_utf8, in_subprocess=True),
    Row("model info", "JSON list", "tokenize", MODEL_INFO, json_edit(lambda d: list(d))),
    Row("model info", "missing key", "tokenize", MODEL_INFO, without("vocab_size")),
    Row("model info", "wrong type", "tokenize", MODEL_INFO, with_value("n_layers", "four")),
    Row("model weights", "truncated", "activations", f"{MODEL}/model.safetensors", truncate),
    Row("corpus manifest", "empty", "tokenize", MANIFEST, empty),
    Row("corpus manifest", "random bytes", "tokenize", MANIFEST, random_bytes),
    Row("corpus manifest", "missing key", "tokenize", MANIFEST, without("sources")),
    Row("corpus manifest", "wrong type", "tokenize", MANIFEST, with_value("streamed", "no")),
    Row("corpus manifest", "streamed, no config", "tokenize", MANIFEST, with_value("streamed", True)),
    Row("documents", "garbled line", "tokenize", DOCUMENTS, last_line_without_newline),
    Row("documents", "not UTF-8", "tokenize", DOCUMENTS, not_utf8),
    Row("tokens meta", "truncated", "activations", TOKENS_META, truncate),
    Row("tokens meta", "not UTF-8", "activations", TOKENS_META, not_utf8),
    Row("tokens meta", "missing key", "activations", TOKENS_META, without("context_size")),
    Row("tokens meta", "wrong type", "report", TOKENS_META, with_value("tokens", [1, 2])),
    Row("train rows", "missing", "activations", TRAIN_NPY, delete),
    Row("train rows", "truncated", "activations", TRAIN_NPY, truncate),
    Row("train rows", "random bytes", "activations", TRAIN_NPY, random_bytes),
    Row("train rows", "empty file", "activations", TRAIN_NPY, empty),
    Row("train rows", "float dtype", "activations", TRAIN_NPY, npy_edit(lambda rows: rows.astype(np.float32))),
    Row("train rows", "1-D", "activations", TRAIN_NPY, npy_edit(np.ravel)),
    Row("train rows", "no rows", "activations", TRAIN_NPY, npy_edit(lambda rows: rows[:0])),
    Row("train rows", "id >= vocab", "activations", TRAIN_NPY, with_token(VOCAB)),
    Row("train rows", "negative id", "activations", TRAIN_NPY, with_token(-1)),
    Row("eval rows", "truncated", "evaluate", EVAL_NPY, truncate),
    Row("eval rows", "empty file", "evaluate", EVAL_NPY, empty, in_subprocess=True),
    Row("eval rows", "no rows", "evaluate", EVAL_NPY, npy_edit(lambda rows: rows[:0])),
    Row("eval rows", "id >= vocab", "evaluate", EVAL_NPY, with_token(VOCAB)),
    Row("activation meta", "missing", "train", ACT_META, delete),
    Row("activation meta", "truncated", "train", ACT_META, truncate),
    Row("activation meta", "not UTF-8", "train", ACT_META, not_utf8),
    Row("activation meta", "JSON string", "train", ACT_META, json_edit(lambda d: "meta")),
    Row("activation meta", "missing key", "train", ACT_META, without("d_in")),
    Row("activation meta", "wrong type", "train", ACT_META, with_value("rows", 1.5)),
    Row("activation shard", "missing", "train", SHARD, delete, in_subprocess=True),
    Row("activation shard", "truncated", "train", SHARD, truncate),
    Row("activation shard", "random bytes", "train", SHARD, random_bytes),
    Row("activation shard", "wrong shape", "train", SHARD, shard_edit(lambda t: {"z": t["z"][:, :-1].contiguous()})),
    Row("activation shard", "no tensor z", "train", SHARD, shard_edit(lambda t: {"x": t["z"]})),
    Row("SAE cfg", "truncated", "evaluate", SAE_CFG, truncate),
    Row("SAE cfg", "not UTF-8", "evaluate", SAE_CFG, not_utf8),
    Row("SAE cfg", "JSON number", "evaluate", SAE_CFG, json_edit(lambda d: 3)),
    Row("SAE cfg", "missing key", "evaluate", SAE_CFG, without("d_sae")),
    Row("SAE weights", "truncated", "evaluate", SAE_WEIGHTS, truncate),
    Row("SAE weights", "random bytes", "evaluate", SAE_WEIGHTS, random_bytes),
    Row("SAE weights", "one NaN in W_enc", "evaluate", SAE_WEIGHTS,
        shard_edit(lambda t: {**t, "W_enc": with_nan(t["W_enc"])})),
    Row("SAE weights", "inf in b_dec", "evaluate", SAE_WEIGHTS,
        shard_edit(lambda t: {**t, "b_dec": t["b_dec"].clone().fill_(float("inf"))})),
    Row("model config", "wrong type", "activations", f"{MODEL}/config.json", with_value("num_hidden_layers", "thirty")),
    Row("metrics", "truncated", "report", METRICS, truncate),
    Row("metrics", "not UTF-8", "report", METRICS, not_utf8),
    Row("metrics", "missing key", "report", METRICS, without("l0")),
    Row("metrics", "negative standard error", "report", METRICS, with_value("l0_se", -0.5)),
    Row("held-out metrics", "truncated", "report", HELDOUT_METRICS, truncate),
    Row("held-out metrics", "wrong type", "report", HELDOUT_METRICS, with_value("sources", "npm:brown")),
    Row("held-out metrics", "missing key", "report", HELDOUT_METRICS,
        json_edit(lambda data: {"layer": LAYER, "split": "heldout", "sources": ["npm:brown"]})),
    Row("density", "not UTF-8", "report", DENSITY, not_utf8),
    Row("density", "garbled", "report", DENSITY, random_bytes),
    Row("checkpoint", "truncated", "train", CHECKPOINT, truncate),
    Row("checkpoint", "random bytes", "train", CHECKPOINT, random_bytes),
]
ROW_PARAMS = [pytest.param(row, id=row.id) if isinstance(row, Row) else row for row in ROWS]


# ---------------------------------------------------------------------------------------------------
# Running a command and looking at what it left.


def run_attnsae(args: list[str], cwd: Path, in_subprocess: bool, preexec_fn=None,
                env: dict | None = None) -> tuple[int, str]:
    """(exit status, stderr) of `attnsae ARGS` run in ``cwd``."""
    if in_subprocess:
        env = {**os.environ, **OFFLINE_ENV, **(env or {})}
        env.pop("MLFLOW_TRACKING_URI", None)
        result = subprocess.run([str(ATTNSAE), *args], cwd=cwd, env=env, capture_output=True, text=True,
                                preexec_fn=preexec_fn, timeout=300)
        return result.returncode, result.stderr
    with contextlib.chdir(cwd):
        result = CliRunner(env=OFFLINE_ENV).invoke(main, args)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception))  # what the script would have printed
    return result.exit_code, stderr


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root``: a file's sha256, or "folder"."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in sorted(root.rglob("*"))}


def assert_one_line_error(status: int, stderr: str, *fragments: str) -> str:
    lines = stderr.strip().splitlines()
    assert status == 1, stderr
    assert "Traceback" not in stderr and "weights_only=False" not in stderr, stderr
    assert len(lines) == 1, stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


TABLE: list[tuple[str, str, str]] = []


@pytest.fixture(scope="module", autouse=True)
def print_table():
    """With -s: which message each corruption produced."""
    yield
    if TABLE:
        width = max(len(kind) for kind, _, _ in TABLE), max(len(corruption) for _, corruption, _ in TABLE)
        print("\n" + "\n".join(f"{k:<{width[0]}}  {c:<{width[1]}}  {m}" for k, c, m in TABLE))


@pytest.mark.parametrize("row", ROW_PARAMS)
def test_corrupt_artifact_is_one_line_naming_it(tree, tmp_path, row: Row):
    copy = tmp_path / "tree"
    shutil.copytree(tree, copy)
    row.corrupt(copy / row.target)
    before = snapshot(copy)
    status, stderr = run_attnsae([*COMMANDS[row.command], "--params", "params.yaml"], copy, row.in_subprocess)
    lines = stderr.strip().splitlines()
    TABLE.append((row.kind, row.corruption, lines[-1] if len(lines) == 1 else f"[{len(lines)} lines] {lines[-1:]}"))
    assert_one_line_error(status, stderr, row.target)
    after = snapshot(copy)
    assert {p: h for p, h in after.items() if p != row.target} == {p: h for p, h in before.items() if p != row.target}


# ---------------------------------------------------------------------------------------------------
# A full disk while a stage writes: one line, no temporary leftovers, the previous output as it was.


def limit_file_size(max_bytes: int) -> Callable[[], None]:
    """For preexec_fn: files may not grow past ``max_bytes`` (Python ignores SIGXFSZ, so writes fail with EFBIG)."""
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    return apply


@pytest.mark.parametrize(("command", "out"), [("tokenize", TOKENS), ("activations", ACTIVATIONS)])
def test_file_size_limit_during_a_stage_keeps_the_previous_output(tree, tmp_path, command, out):
    copy = tmp_path / "tree"
    shutil.copytree(tree, copy)
    before = snapshot(copy)
    # 16 KiB: less than a shard or train.npy, more than anything Python writes at start-up. No progress
    # bars: a run that fails after showing progress prints more than the one error line.
    status, stderr = run_attnsae([*COMMANDS[command], "--params", "params.yaml"], copy, in_subprocess=True,
                                 preexec_fn=limit_file_size(16 * 1024), env={"TQDM_DISABLE": "1"})
    line = assert_one_line_error(status, stderr)
    TABLE.append((command, "file size limit", line))
    assert line == f"Error: {out}: file too large while writing (nothing was replaced)"
    assert snapshot(copy) == before


def test_the_reports_files_are_replaced_together_or_not_at_all(tree, tmp_path):
    """Measured: under a file-size limit between report.md's size and index.html's, the report said "nothing was
    replaced" while report.md had been."""
    copy = tmp_path / "tree"
    shutil.copytree(tree, copy)
    assert run_attnsae([*COMMANDS["report"], "--params", "params.yaml"], copy, in_subprocess=False)[0] == 0
    sizes = {path: (copy / path).stat().st_size for path in (layout.REPORT_MD, layout.REPORT_HTML, layout.LAYERS_CSV)}
    assert sizes[layout.REPORT_MD] + 1024 < sizes[layout.REPORT_HTML]  # the limit below lets report.md through only
    for path in sizes:
        (copy / path).write_text("the previous report\n")
    before = snapshot(copy)
    status, stderr = run_attnsae([*COMMANDS["report"], "--params", "params.yaml"], copy, in_subprocess=True,
                                 preexec_fn=limit_file_size(sizes[layout.REPORT_MD] + 1024), env={"TQDM_DISABLE": "1"})
    line = assert_one_line_error(status, stderr)
    assert line == f"Error: {layout.REPORT_HTML}: file too large while writing (nothing was replaced)"
    assert snapshot(copy) == before


def test_no_space_during_a_stage_keeps_the_previous_output(tree, tmp_path, monkeypatch):
    copy = tmp_path / "tree"
    shutil.copytree(tree, copy)
    before = snapshot(copy)
    real_write_bytes = Path.write_bytes

    def disk_fills_up(path: Path, data) -> int:
        real_write_bytes(path, bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(Path, "write_bytes", disk_fills_up)
    status, stderr = run_attnsae([*COMMANDS["tokenize"], "--params", "params.yaml"], copy, in_subprocess=False)
    line = assert_one_line_error(status, stderr)
    TABLE.append(("tokenize", "no space left", line))
    assert line == f"Error: {TOKENS}: no space left on device while writing (nothing was replaced)"
    assert snapshot(copy) == before


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EFBIG])
def test_write_text_atomic_on_a_full_disk_keeps_the_old_file(tmp_path, monkeypatch, code):
    path = tmp_path / "metrics.json"
    path.write_text("old\n")
    real_fdopen = os.fdopen

    class FillsUp:
        """A file whose first write stores half the text, then the disk is full."""

        def __init__(self, fd: int, *args, **kwargs):
            self.file = real_fdopen(fd, *args, **kwargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.file.close()

        def write(self, text: str) -> int:
            self.file.write(text[: len(text) // 2])
            self.file.flush()
            raise OSError(code, os.strerror(code))

    monkeypatch.setattr(files.os, "fdopen", FillsUp)
    with pytest.raises(UserError) as err:
        files.write_json_atomic(path, {"l0": 1.0})
    assert str(err.value) == f"{path}: {files.DISK_FULL[code]} while writing (nothing was replaced)"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"] and path.read_text() == "old\n"


# ---------------------------------------------------------------------------------------------------
# Leftovers of killed writers: the next writer of the same output removes them.

KILLED_WRITER = """
import os, signal, sys
from attnsae.files import atomic_dir, write_text_atomic
out = sys.argv[1]
if sys.argv[2] == "dir":
    with atomic_dir(out) as tmp:
        (tmp / "half.bin").write_bytes(b"x" * 100)
        os.kill(os.getpid(), signal.SIGKILL)
else:
    os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)  # killed just before the rename
    write_text_atomic(out, "new\\n")
"""


@pytest.mark.parametrize("kind", ["dir", "file"])
def test_next_writer_removes_what_a_killed_writer_left(tmp_path, kind):
    out = tmp_path / ("activations" if kind == "dir" else "L1.json")
    unrelated = [tmp_path / ".L1.csv.abcd1234.tmp", tmp_path / ".other.abcd1234.tmp"]  # other outputs' temps
    for path in unrelated:
        path.write_text("theirs")
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(out), kind], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    leftovers = sorted(p.name for p in tmp_path.glob(f".{out.name}.*.tmp"))
    assert len(leftovers) == 1, leftovers
    if kind == "dir":
        (tmp_path / f".{out.name}.old").mkdir()  # as a kill between atomic_dir's two renames leaves it
        with files.atomic_dir(out) as tmp:
            (tmp / "done").write_text("ok")
        assert (out / "done").read_text() == "ok"
    else:
        files.write_text_atomic(out, "new\n")
        assert out.read_text() == "new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, *(p.name for p in unrelated)])


WRITERS = {
    "write_json_atomic": "from attnsae.files import write_json_atomic\nwrite_json_atomic(out, {'x': 'y' * 100000})",
    # transformers' save_pretrained writes with safetensors' Rust writer, whose errors carry "(os error 27)"
    "atomic_dir, Rust writer": ("import torch\nfrom safetensors.torch import save_file\n"
                                "from attnsae.files import atomic_dir\n"
                                "with atomic_dir(out) as tmp:\n"
                                "    save_file({'z': torch.zeros(100000)}, str(tmp / 'w'))"),
}


@pytest.mark.parametrize("writer", WRITERS)
def test_writers_under_a_real_file_size_limit(tmp_path, writer):
    out = tmp_path / "out"
    if writer == "write_json_atomic":
        out.write_text("old\n")
    else:
        out.mkdir()
        (out / "w").write_text("old\n")
    before = snapshot(tmp_path)
    script = ("import sys\nfrom attnsae.errors import UserError\nout = sys.argv[1]\ntry:\n"
              + "".join(f"    {line}\n" for line in WRITERS[writer].splitlines())
              + "except UserError as err:\n    print(err)\n")
    result = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True,
                            preexec_fn=limit_file_size(4096))
    assert result.stdout.strip() == f"{out}: file too large while writing (nothing was replaced)", result.stderr
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------------
# The corpus section's seed drives the synthetic documents, stored and streamed alike.


def test_synthetic_corpus_follows_the_corpus_seed(tmp_path):
    from attnsae.config import CorpusConfig
    from attnsae.data.corpus import build_corpus, open_documents, read_documents

    def documents(seed: int, stream: bool) -> list[str]:
        out = tmp_path / f"{seed}-{stream}"
        build_corpus(CorpusConfig(sources=["synthetic"], synthetic_documents=3, seed=seed), out, stream=stream)
        return list(open_documents(out)()) if stream else list(read_documents(out))

    assert documents(1, stream=False) == documents(1, stream=True) != documents(2, stream=False)
