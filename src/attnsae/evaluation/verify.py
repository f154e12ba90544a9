"""`attnsae verify`: check what a clone pulled against dvc.lock and the recorded metrics.

- ``verify_layers``: the SAE folders' hashes recomputed with DVC's own hashing and compared with the md5 that
  dvc.lock records, then each SAE re-evaluated on the evaluation tokens and compared with
  ``reports/metrics/L<n>.json`` within the tolerances of ``metric_tolerance``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from attnsae import config, layout
from attnsae.errors import UserError

# ----------------------------------------------------------------------------------------------------------
# Comparisons (pure)

# Re-evaluating the same SAE on the same tokens with the same model on an x86-64 CPU is bit-identical: the stages
# pin the CPU kernels and threads (numerics.py). On a GPU or an ARM CPU it differs only through float summation
# order: fp32 values ~1e-6 relative apart. The tolerances leave ~100x room.
NATS_TOL = 1e-4  # absolute, for every cross-entropy and KL value (nats)
RATIO_TOL = 1e-4  # absolute floor for ratios and fractions
RELATIVE_TOL = 1e-4  # for scale-dependent sums (mse)
L0_RELATIVE_TOL = 1e-3  # features whose pre-activation sits within float noise of 0 may fire on one machine only
L0_FLIPS = 4  # ...and one such flip moves L0 by 1/tokens
FEATURE_FLIPS = 2  # features that may cross the dead (never fires) or dense threshold: each moves the fraction 1/d_sae
NATS_KEYS = {"ce_clean", "ce_sae", "ce_zero", "ce_increase", "ce_increase_zero", "kl_sae", "kl_zero"}
IGNORED_KEYS = {"sae"}  # the SAE folder as the evaluation was invoked (a path spelling, not a result)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def metric_tolerance(key: str, recorded: Mapping[str, Any]) -> float | None:
    """Allowed absolute difference for one metric; None: must be equal (counts, names, settings).

    Ratios get the change that NATS_TOL in each of their terms can cause: loss recovered is
    (CE_zero - CE_sae) / (CE_zero - CE_clean), so a model whose zero-ablation moves CE by little
    (0.009 nats on a SmolLM2 layer) needs a wider band than 1e-4.
    """
    value = recorded.get(key)
    if not isinstance(value, float) or key == "dense_threshold":
        return None
    if key.endswith("_se") and key[:-3] in recorded:
        # a bootstrap standard error is the spread of the metric over resamples: each resample's value moves by
        # at most the metric's own tolerance, so the spread does too
        return metric_tolerance(key[:-3], recorded)
    if key in NATS_KEYS:
        return NATS_TOL
    if key == "loss_recovered":
        ce_zero, ce_clean = recorded.get("ce_zero"), recorded.get("ce_clean")
        gap = abs(ce_zero - ce_clean) if _number(ce_zero) and _number(ce_clean) else 0.0
        return RATIO_TOL if gap == 0 else max(RATIO_TOL, 2 * NATS_TOL * (1 + abs(value)) / gap)
    if key == "kl_score":
        kl_zero = abs(recorded.get("kl_zero") or 0.0)
        return RATIO_TOL if kl_zero == 0 else max(RATIO_TOL, NATS_TOL * (2 - value) / kl_zero)
    if key == "mse":
        return RELATIVE_TOL * abs(value)
    if key == "explained_variance":
        return max(RATIO_TOL, RELATIVE_TOL * abs(1 - value))  # 1 - mse/variance: mse's relative error, scaled
    if key == "l0":
        tokens = recorded.get("eval_tokens") or recorded.get("dead_fraction_tokens") or 0
        return max(L0_RELATIVE_TOL * value, L0_FLIPS / tokens if tokens else 0.0)
    if key in ("dead_fraction", "dense_fraction"):
        d_sae = recorded.get("d_sae") or 0
        return max(RATIO_TOL, FEATURE_FLIPS / d_sae if d_sae else 0.0)
    return max(RATIO_TOL, RELATIVE_TOL * abs(value))  # a metric added later: 1e-4, relative when large


def compare_metrics(recorded: Mapping[str, Any], found: Mapping[str, Any]) -> list[str]:
    """One line per recorded metric that the re-evaluation does not reproduce: key, expected, found, tolerance.

    The recorded file is the reference: keys only the re-evaluation has (added to evaluate.py later) are ignored.
    """
    problems = []
    for key, want in recorded.items():
        if key in IGNORED_KEYS:
            continue
        if key not in found:
            problems.append(f"{key} expected {want!r}, found no such metric")
            continue
        got = found[key]
        tol = metric_tolerance(key, recorded)
        if tol is None or not (_number(got) and _number(want)):
            if got != want:
                problems.append(f"{key} expected {want!r}, found {got!r}")
            continue
        if math.isnan(want) and math.isnan(got):
            continue
        diff = abs(got - want)
        if not diff <= tol:  # NaN on one side fails too
            problems.append(f"{key} expected {want:.10g}, found {got:.10g} "
                            f"(difference {diff:.2g} > tolerance {tol:.2g})")
    return problems


def compare_listings(expected: Mapping[str, str], found: Mapping[str, str]) -> list[str]:
    """One line per file whose md5 differs from the recorded one, is missing, or is not recorded at all."""
    problems = []
    for path in sorted(expected.keys() | found.keys()):
        want, got = expected.get(path), found.get(path)
        if want == got:
            continue
        if got is None:
            problems.append(f"{path}: missing (dvc.lock records md5 {want})")
        elif want is None:
            problems.append(f"{path}: not recorded in dvc.lock (md5 {got})")
        else:
            problems.append(f"{path}: md5 expected {want}, found {got}")
    return problems


def compare_copies(source: Mapping[str, str], source_dir: str, copy: Mapping[str, str], copy_dir: str) -> list[str]:
    """Every file of ``source_dir`` must be in ``copy_dir`` byte for byte (the copy may hold more, e.g. a card)."""
    problems = []
    for path, md5 in sorted(source.items()):
        rel = PurePosixPath(path).relative_to(source_dir)
        other = copy.get(f"{copy_dir}/{rel}")
        if other != md5:
            found = "it is missing" if other is None else f"found md5 {other}"
            problems.append(f"{copy_dir}/{rel}: expected md5 {md5} as {source_dir}/{rel}, {found}")
    return problems


def subtree(listing: Mapping[str, str], folder: str) -> dict[str, str]:
    return {path: md5 for path, md5 in listing.items() if path.startswith(f"{folder}/")}


# ----------------------------------------------------------------------------------------------------------
# Checks and their report lines


@dataclass
class Check:
    """One check of one layer (``layer`` None: the evaluation's shared inputs)."""

    layer: int | None
    kind: str  # hash | copy | inputs | metrics
    subject: str
    note: str = ""
    problems: list[str] = field(default_factory=list)
    skipped: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems and not self.skipped

    def lines(self) -> list[str]:
        head = f"{'--' if self.layer is None else f'L{self.layer}':<4} {self.kind:<8}"
        if self.problems:
            return [f"{head} FAIL  {problem}" for problem in self.problems]
        return [f"{head} {'skip' if self.skipped else 'ok':<5} {self.subject}: {self.note}"]


def summarize(checks: list[Check], layers: list[int], evaluated: bool) -> tuple[bool, str]:
    """(passed, the closing line): every check must pass; a skipped check counts against."""
    failed = sum(bool(c.problems) for c in checks)
    skipped = sum(c.skipped for c in checks)
    named = f"layer{'s' * (len(layers) > 1)} {', '.join(map(str, layers))}"
    if failed or skipped:
        return False, f"verify: FAILED: {failed} of {len(checks)} checks failed, {skipped} skipped ({named})"
    what = "metrics reproduced within tolerance" if evaluated else "metrics not re-evaluated (--no-evaluate)"
    return True, f"verify: OK: {len(checks)} checks passed ({named}: hashes match dvc.lock, {what})"


# ----------------------------------------------------------------------------------------------------------
# Hashes: DVC's own (dvc_data's tree build, the .dir listing in the DVC cache, the md5 dvc.lock records)


def _open_repo():
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:
        repo = Repo(".")
    except NotDvcRepoError:
        raise UserError("verify: not in a DVC repository (run it in the repository root)") from None
    if Path(repo.root_dir).resolve() != Path.cwd().resolve():
        repo.close()
        raise UserError(f"verify: run it in the repository root ({repo.root_dir}), not in {Path.cwd()}")
    return repo


def _outputs(repo) -> dict[str, Any]:
    """Every DVC output of the pipeline by its path, with the hash dvc.lock records for it (DVC parses the lock)."""
    from dvc.exceptions import DvcException

    try:
        return {PurePosixPath(out.def_path).as_posix(): out for stage in repo.index.stages for out in stage.outs}
    except DvcException as err:
        raise UserError(f"verify: DVC cannot read the pipeline: {err}") from None


def _containing_output(outputs: Mapping[str, Any], folder: str):
    """The output that is ``folder`` or holds it (the stream pipeline records models/sae as one output)."""
    path = PurePosixPath(folder)
    for candidate in (path, *path.parents):
        if candidate.as_posix() in outputs:
            return outputs[candidate.as_posix()]
    return None


def _hash_folder(out, folder: str) -> tuple[str, dict[str, str]]:
    """(md5 of the .dir listing, {file: md5}) of a workspace folder, every byte hashed afresh."""
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB

    # An object database without DVC's state: the state would return hashes cached by inode and mtime, and a
    # file changed in place with its mtime kept would pass. dry_run: nothing is written to the cache.
    odb = HashFileDB(out.fs, out.cache.path)
    path = out.fs.join(out.repo.root_dir, *PurePosixPath(folder).parts)
    _, _, tree = build(odb, path, out.fs, out.hash_name, dry_run=True, ignore=out.dvcignore)
    return tree.hash_info.value, {f"{folder}/{'/'.join(key)}": hi.value for key, _, hi in tree}


def _recorded_listing(out) -> dict[str, str] | None:
    """{file: md5} of the .dir object dvc.lock names, from the DVC cache; None when absent or not that object."""
    from dvc_data.hashfile.tree import Tree
    from dvc_objects.errors import ObjectFormatError

    try:
        tree = Tree.load(out.cache, out.hash_info)
    except (FileNotFoundError, ObjectFormatError):
        return None
    tree.digest()  # the listing must itself hash to what dvc.lock records
    if tree.hash_info.value != out.hash_info.value:
        return None
    return {f"{out.def_path}/{'/'.join(key)}": hi.value for key, _, hi in tree}


def check_folder(outputs: Mapping[str, Any], folder: str, layer: int | None, kind: str) -> tuple[Check, dict[str, str]]:
    """Recompute a folder's hashes and compare them with dvc.lock; returns the check and the files' md5s."""
    check = Check(layer, kind, folder)
    out = _containing_output(outputs, folder)
    if out is None:
        check.problems.append(f"{folder}: no stage of dvc.yaml writes it")
        return check, {}
    recorded = out.hash_info.value if out.hash_info else None
    if not recorded:
        check.problems.append(f"{folder}: dvc.lock records no hash for {out.def_path} (its stage has not run)")
        return check, {}
    if not Path(folder).is_dir():
        check.problems.append(f"{folder}: missing (fetch it with `dvc pull {out.stage.addressing}`)")
        return check, {}
    found_md5, found = _hash_folder(out, folder)
    listing = _recorded_listing(out)
    if listing is not None:
        check.problems = compare_listings(subtree(listing, folder), found)
    elif out.def_path == folder and found_md5 != recorded:
        check.problems.append(f"{folder}: md5 expected {recorded}, found {found_md5} (the file listing is not in "
                              f"the DVC cache, so which file differs is unknown; `dvc fetch {out.stage.addressing}`)")
    elif out.def_path != folder:  # only the containing output's hash is known: check all of it
        whole_md5, _ = _hash_folder(out, out.def_path)
        if whole_md5 != recorded:
            check.problems.append(f"{out.def_path}: md5 expected {recorded}, found {whole_md5}")
    files = "1 file matches" if len(found) == 1 else f"{len(found)} files match"
    whole = "" if out.def_path == folder else f"{out.def_path}, which holds it: "
    check.note = f"{files} dvc.lock ({whole}md5 {recorded})"
    return check, found


# ----------------------------------------------------------------------------------------------------------
# Re-evaluation


def reevaluate(cfg: config.EvaluateConfig, layers: list[int]) -> dict[int, dict[str, Any]]:
    """Evaluate models/sae/L<n> of each layer as the evaluate stage does (together), writing nothing (reports/
    stays untouched)."""
    from attnsae.evaluation.evaluate import evaluate_layers

    return evaluate_layers(cfg, layout.MODEL_DIR, layout.TOKENS_DIR, {n: layout.sae_dir(n) for n in layers}, {})


def check_metrics(cfg: config.EvaluateConfig, layers: list[int]) -> list[Check]:
    """Each layer's recorded metrics against one re-evaluation of all the layers' SAEs."""
    from attnsae.formats.metrics import read_metrics

    checks = {n: Check(n, "metrics", str(layout.metrics_file(n))) for n in layers}
    recorded = {}
    for n, check in checks.items():
        path = layout.metrics_file(n)
        if not path.is_file():
            check.problems.append(f"{path}: missing (git holds the metrics: check out the commit that recorded them)")
            continue
        try:
            recorded[n] = read_metrics(path, n)  # checked before the (long) re-evaluation
        except UserError as err:
            check.problems.append(str(err))
    try:
        found = reevaluate(cfg, list(recorded)) if recorded else {}
    except UserError as err:
        for n in recorded:
            checks[n].problems.append(str(err))
        found = {}
    for n, metrics in found.items():
        path = layout.metrics_file(n)
        checks[n].problems = [f"{path}: {problem}" for problem in compare_metrics(recorded[n], metrics)]
        compared = sum(key not in IGNORED_KEYS for key in recorded[n])
        checks[n].note = (f"{compared} values reproduced within tolerance by a re-evaluation on "
                          f"{metrics['eval_tokens']:,} tokens")
    return list(checks.values())


def verify_layers(layers: list[int], evaluate: config.EvaluateConfig | None) -> Iterator[Check]:
    """Every check, in order, as it completes: SAE and published folders per layer, then (with ``evaluate``) the
    evaluation inputs and a re-evaluation per layer. A layer whose SAE does not match dvc.lock is not re-evaluated."""
    sae_ok = {}
    repo = _open_repo()
    try:
        outputs = _outputs(repo)
        for n in layers:
            sae_folder, published_folder = layout.sae_dir(n).as_posix(), layout.published_dir(n).as_posix()
            sae_check, sae_files = check_folder(outputs, sae_folder, n, "hash")
            yield sae_check
            published_check, published_files = check_folder(outputs, published_folder, n, "hash")
            yield published_check
            if sae_check.ok and published_check.ok:
                # the metrics are the SAE folder's; the published folder must hold those very files
                copy = Check(n, "copy", published_folder, note=f"holds the files of {sae_folder} unchanged")
                copy.problems = compare_copies(sae_files, sae_folder, published_files, published_folder)
                yield copy
            sae_ok[n] = sae_check.ok
        if evaluate is None:
            return
        inputs = [check_folder(outputs, folder.as_posix(), None, "inputs")[0]
                  for folder in (layout.MODEL_DIR, layout.TOKENS_DIR)]
    finally:
        repo.close()
    yield from inputs
    inputs_ok = all(c.ok for c in inputs)
    for n in layers:
        if not inputs_ok or not sae_ok[n]:
            reason = "its SAE folder does" if inputs_ok else "the model or tokens do"
            yield Check(n, "metrics", str(layout.metrics_file(n)), skipped=True,
                        note=f"not re-evaluated: {reason} not match dvc.lock")
    yield from check_metrics(evaluate, [n for n in layers if inputs_ok and sae_ok[n]])
