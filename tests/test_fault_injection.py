"""Fault injection: `dvc repro` of the tiny profile killed at seeded random moments in every kind of stage.

A second fresh repository, built like the session's `tiny_pipeline` (same profile, same steps, its own MLflow
SQLite store), is reproduced by a sequence of `dvc repro` runs, each in its own process group, its output read
line by line as it comes. Each run is watched for `Running stage '<name>'` of the next chosen stage, and the whole
group gets SIGKILL a seeded random delay later (as the stage ends, if it ends first); the next `dvc repro` goes on
and is killed in the next chosen stage, until a last uninterrupted `dvc repro` completes. The chosen stages: every
stage that is not per layer (evaluate among them), and one train@L and publish@L. The killed train stage is killed in
its training loop, after a seeded logged step past the first checkpoint (the loop lasts well under a second on the
tiny profile, too short for a delay from the stage's start); the other train stage gets SIGTERM in its loop: it
must stop within seconds with one line about the checkpoint it saved, and its rerun must resume from that
checkpoint; that rerun is then SIGKILLed as it prints its final line (after it has written its outputs and logged
to MLflow, before DVC records it).

At the end the repository must equal the uninterrupted reference run: dvc.lock's output hashes, and every output
byte for byte (report.md and index.html after masking the git commit they quote: the two repositories' commits
differ by their timestamps); `dvc status` clean; no leftovers (temporary files or folders, `.NAME.old` folders,
checkpoints). The MLflow store must hold one set of training curve points per layer and one registry version per
SAE md5 (a separate test, on the same run).

The stages, delays, steps and signals come from random.Random(SEED); where a kill lands inside its stage depends
on the machine's speed, and every landing must end identical. The table is printed with -s, and every line the
runs printed, with its time, goes to timeline.log in the test's temporary folder.
"""

from __future__ import annotations

import csv
import os
import random
import re
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import yaml

from helpers import pipeline_repository, run

pytestmark = pytest.mark.integration

SEED = 20240611
# Seconds after `Running stage` at which a SIGKILL lands, per kind of stage (uniform in the range). Measured on
# 2 shared cores, from `Running stage` to DVC's `Updating lock file` (the command with its Python start, then
# DVC hashing and caching its outputs): params 0.2-0.3 s, corpus 0.2-0.5 s, publish 1.1-1.7 s, tokenize 2-5 s,
# model 4-7 s, report 4-5 s, evaluate 6-8 s, activations 5-16 s (the busier the machine, the
# longer). The ranges sit inside the quicker timings; a kill that would come after its stage ended lands as the
# stage ends instead (when DVC logs that it records the stage in dvc.lock), never in a later stage.
DELAYS = {
    "params": (0.03, 0.15),
    "model": (0.5, 3.5),
    "corpus": (0.03, 0.18),
    "tokenize": (0.3, 2.0),
    "activations": (1.0, 4.5),
    "evaluate": (0.5, 5.0),
    "report": (0.5, 3.5),
    "publish": (0.1, 1.0),
}
# The tiny SAE's 128 steps take 0.2-1 s of a train stage's 4-35 s (the rest is Python start, the activation cache
# and MLflow), too short to hit by a delay from the stage's start. Signals meant for the training loop go out as
# the loop's progress bar shows the postfix (loss, L0) of a chosen logged step (every 10th), seeded: the signal
# lands a few steps later (the reaction takes milliseconds; a step about 1.5 ms unloaded).
TRAIN_KILL_STEPS = range(60, 111, 10)  # SIGKILL after the step-50 checkpoint (or the step-100 one)
SIGTERM_STEPS = range(10, 71, 10)  # SIGTERM early enough to land in the loop even when it runs at full speed
KINDS = {*DELAYS, "train"}  # every kind of stage gets a SIGKILL
SIGTERM_STOP_SECONDS = 10.0  # "within a few seconds": a step, a checkpoint save and closing the MLflow run
STAGE_TIMEOUT = 600
# Outputs compared byte for byte with the reference run.
COMPARED = ("models/sae", "reports/metrics", "reports/density", "reports/curves", "reports/layers.csv",
            "models/published")
# Outputs that quote the repository's git commit (report.py: "git commit"): compared with the commit masked, and
# whether the tree was dirty (the reference's is when a test edited its params.yaml and re-ran it before this one).
QUOTE_COMMIT = ("reports/report.md", "reports/index.html")
COMMIT = re.compile(rb"\b[0-9a-f]{40}\b(?: \(dirty\))?")


class Repro:
    """One `dvc repro` in its own process group; its stdout and stderr read, line by line (tqdm's \\r updates
    count as lines), by a thread as they come, each with the seconds since the start."""

    def __init__(self, root: Path, env: dict):
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(["dvc", "repro"], cwd=root, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.pgid = self.proc.pid  # start_new_session: dvc leads a new session and process group
        self.lines: list[tuple[float, str]] = []
        self.eof_at: float | None = None
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def _read(self) -> None:
        fd, rest = self.proc.stdout.fileno(), b""
        while chunk := os.read(fd, 1 << 16):
            *parts, rest = re.split(rb"[\r\n]", rest + chunk)
            with self.cond:
                self.lines += [(self.now(), p.decode(errors="replace")) for p in parts if p.strip()]
                self.cond.notify_all()
        with self.cond:
            if rest.strip():
                self.lines.append((self.now(), rest.decode(errors="replace")))
            self.eof_at = self.now()
            self.cond.notify_all()

    def wait_line(self, match, start: int = 0, timeout: float = STAGE_TIMEOUT) -> int | None:
        """Index of the first line from ``start`` on for which ``match(line)``; None at the end of the output."""
        deadline = time.monotonic() + timeout
        with self.cond:
            i = start
            while True:
                for j in range(i, len(self.lines)):
                    if match(self.lines[j][1]):
                        return j
                i = len(self.lines)
                left = deadline - time.monotonic()
                if self.eof_at is not None or left <= 0:
                    return None
                self.cond.wait(left)

    def wait_eof(self, timeout: float) -> bool:
        with self.cond:
            deadline = time.monotonic() + timeout
            while self.eof_at is None and time.monotonic() < deadline:
                self.cond.wait(deadline - time.monotonic())
            return self.eof_at is not None

    def processes(self, fragment: str) -> list[psutil.Process]:
        """Live (not zombie) processes of the group whose command line holds ``fragment``."""
        try:
            candidates = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:  # dvc is gone (SIGTERM): its orphans are still in the group
            candidates = list(psutil.process_iter())
        found = []
        for proc in candidates:
            try:
                if os.getpgid(proc.pid) == self.pgid and proc.status() != psutil.STATUS_ZOMBIE \
                        and fragment in " ".join(proc.cmdline()):
                    found.append(proc)
            except (ProcessLookupError, psutil.Error):
                pass
        return found

    def signal(self, signum: int) -> None:
        try:
            os.killpg(self.pgid, signum)
        except ProcessLookupError:
            pass

    def finish(self, timeout: float = STAGE_TIMEOUT) -> int:
        self.proc.wait(timeout)
        self.wait_eof(30)
        if self.eof_at is not None:
            self.thread.join(1)
            self.proc.stdout.close()
        return self.proc.returncode

    def output(self, start: int = 0) -> str:
        with self.cond:
            return "\n".join(line for _, line in self.lines[start:])


@dataclass
class Fault:
    stage: str
    signum: int
    trigger: str = "start"  # "start": `delay` s after the stage starts; "loop": as the training loop shows
    delay: float | None = None  # the postfix of logged step `step`; "final": as train prints its final line
    step: int | None = None
    reached: bool = False
    capped: bool = False  # the stage ended before the delay: signalled as it ended
    fired_after: float | None = None  # seconds after the stage started
    while_running: bool | None = None  # the stage's command was alive when the signal was sent
    stopped_after: float | None = None  # SIGTERM: seconds until the group's output ended
    output: str = ""
    rerun_output: str = ""

    def how(self) -> str:
        if self.trigger == "start":
            return f"+{self.delay:.2f} s" + (" (stage ended first: at its end)" if self.capped else "")
        if self.trigger == "loop":
            return f"after logged step {self.step}"
        return "at its final line"


def execution_order(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")]


def plan_faults(order: list[str], rng: random.Random) -> list[Fault]:
    """A SIGKILL in every kind of stage (one train@L, one publish@L), and a SIGTERM in the loop
    of another train stage, then a SIGKILL of that stage's rerun at its final line; in the order DVC runs them."""
    layers = sorted(int(s.split("@")[1]) for s in order if s.startswith("train@"))
    kill_train = rng.choice(layers)
    term_train = rng.choice([n for n in layers if n != kill_train] or layers)
    chosen = {"train": kill_train, "publish": rng.choice(layers)}
    faults = []
    for stage in order:
        kind, _, layer = stage.partition("@")
        if stage == f"train@{kill_train}":
            faults.append(Fault(stage, signal.SIGKILL, trigger="loop", step=rng.choice(TRAIN_KILL_STEPS)))
        elif kind in DELAYS and (kind not in chosen or int(layer) == chosen[kind]):
            faults.append(Fault(stage, signal.SIGKILL, delay=round(rng.uniform(*DELAYS[kind]), 2)))
        if stage == f"train@{term_train}":
            faults.append(Fault(stage, signal.SIGTERM, trigger="loop", step=rng.choice(SIGTERM_STEPS)))
            faults.append(Fault(stage, signal.SIGKILL, trigger="final"))
    return faults


def stage_commands(root: Path) -> dict[str, str]:
    """Stage name -> the command DVC runs for it (foreach stages expanded)."""
    pipeline = yaml.safe_load((root / "dvc.yaml").read_text())
    layers = yaml.safe_load((root / "params.yaml").read_text())["layers"]
    commands = {}
    for name, stage in pipeline["stages"].items():
        if "foreach" in stage:
            for n in layers:
                commands[f"{name}@{n}"] = stage["do"]["cmd"].replace("${item}", str(n))
        else:
            commands[name] = stage["cmd"]
    return commands


def stage_over(line: str) -> bool:
    """DVC's first line after a stage's command ends (it then records the stage, or moves on)."""
    return line.startswith(("Updating lock file", "Generating lock file", "Running stage '", "ERROR"))


POSTFIX = re.compile(r"l0=[^,\]]+, loss=[^,\]]+")


def logged_step(step: int):
    """Matches the progress line that shows logged step ``step``: the loop sets a new postfix (loss, L0) on each
    logged step 0, 10, 20...; tqdm's own refreshes repeat the last one."""
    seen, last = -1, None

    def match(line: str) -> bool:
        nonlocal seen, last
        m = POSTFIX.search(line) if line.startswith("train d_sae=") else None
        if m and m.group(0) != last:
            seen, last = seen + 1, m.group(0)
        return seen * 10 >= step

    return match


def inject(root: Path, env: dict, fault: Fault, command: str, timeline: list[str]) -> None:
    """One `dvc repro`, signalled as ``fault`` says once its stage runs (run to the end if the stage never runs)."""
    repro = Repro(root, env)
    try:
        started = repro.wait_line(lambda line: line.startswith(f"Running stage '{fault.stage}'"))
        if started is None:
            code = repro.finish()
            fault.output = repro.output()
            assert code == 0, f"dvc repro failed before reaching {fault.stage}:\n{fault.output[-4000:]}"
            return
        fault.reached = True
        t_start = repro.lines[started][0]
        if fault.trigger == "start":
            ended = repro.wait_line(stage_over, started + 1, timeout=t_start + fault.delay - repro.now())
            fault.capped = ended is not None
            alive = repro.eof_at is None
        elif fault.trigger == "loop":
            alive = repro.wait_line(logged_step(fault.step), started) is not None
        else:
            layer = fault.stage.split("@")[1]
            alive = repro.wait_line(lambda line: line.startswith(f"train L{layer}:") and "final loss" in line,
                                    started) is not None
        if alive:
            if fault.signum == signal.SIGTERM:  # at once: the loop may last a fraction of a second
                fault.fired_after = round(repro.now() - t_start, 2)
                t_signal = repro.now()
                repro.signal(signal.SIGTERM)
                fault.while_running = bool(repro.processes(command))  # it handles SIGTERM: still alive
                # dvc dies at once (default action); the stage's command saves its checkpoint and exits, and the
                # output ends when it does.
                repro.wait_eof(60)
                fault.stopped_after = round((repro.eof_at or repro.now()) - t_signal, 2)
                repro.signal(signal.SIGKILL)  # whatever would still be left
            else:
                fault.while_running = bool(repro.processes(command))
                fault.fired_after = round(repro.now() - t_start, 2)
                repro.signal(signal.SIGKILL)
        code = repro.finish()
        fault.output = repro.output()
        if not alive:  # the whole repro ended before the signal: it must have succeeded
            assert code == 0, f"dvc repro failed in {fault.stage}:\n{fault.output[-4000:]}"
    finally:
        if repro.proc.poll() is None:
            repro.signal(signal.SIGKILL)
            repro.proc.wait(30)
        for t, line in repro.lines:
            timeline.append(f"{t:8.2f} {line[:200]}")
        timeline.append(f"---- end of repro for {fault.stage} ({signal.Signals(fault.signum).name}, {fault.how()})")


def lock_outs(root: Path) -> dict[str, dict[str, str | None]]:
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    return {name: {out["path"]: out.get("md5") for out in stage.get("outs", [])}
            for name, stage in lock["stages"].items()}


def lock_src_deps(root: Path) -> dict[str, str]:
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    return {dep["path"]: dep.get("md5") for stage in lock["stages"].values() for dep in stage.get("deps", [])
            if dep["path"].startswith("src/")}


def output_files(root: Path, rel: str) -> dict[str, bytes]:
    path = root / rel
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path] if path.exists() else []
    return {f.relative_to(root).as_posix(): f.read_bytes() for f in files}


def masked(data: bytes) -> bytes:
    return COMMIT.sub(b"<commit>", data)


def leftovers(root: Path) -> list[str]:
    found = []
    for top in ("data", "models", "reports"):
        for path in (root / top).rglob("*") if (root / top).exists() else []:
            name = path.name
            if name.endswith(".tmp") or (name.startswith(".") and name.endswith(".old")):
                found.append(path.relative_to(root).as_posix())
    checkpoints = root / "checkpoints"
    if checkpoints.exists():
        found += [p.relative_to(root).as_posix() for p in checkpoints.rglob("*")]
    return sorted(found)


def stage_identical(stage: str, ours: dict, reference: dict, root: Path, ref_root: Path) -> bool:
    """The stage's outputs in dvc.lock equal the reference's (the commit-quoting files compared masked)."""
    if stage not in ours or ours[stage].keys() != reference.get(stage, {}).keys():
        return False
    for path, md5 in ours[stage].items():
        if path in QUOTE_COMMIT:
            if masked((root / path).read_bytes()) != masked((ref_root / path).read_bytes()):
                return False
        elif md5 != reference[stage][path]:
            return False
    return True


def resumed_at(fault: Fault) -> str:
    """The step the rerun of a train stage resumed from, or "no" (started over: no checkpoint was left)."""
    if not fault.stage.startswith("train@"):
        return "-"
    layer = fault.stage.split("@")[1]
    m = re.search(rf"resuming from checkpoints/train-L{layer}\.pt at step (\d+)", fault.rerun_output)
    return f"step {m.group(1)}" if m else "no"


def table(faults: list[Fault], identical: dict[str, bool]) -> str:
    rows = [("stage", "signal", "when", "kill delay (s)", "killed while running", "rerun resumed from",
             "rerun result")]
    for f in faults:
        result = "identical" if identical.get(f.stage) else "NOT identical"
        if f.fired_after is None:
            rows.append((f.stage, signal.Signals(f.signum).name, f.how(), "-",
                         "not reached" if not f.reached else "repro ended first", "-", result))
        else:
            rows.append((f.stage, signal.Signals(f.signum).name, f.how(), f"{f.fired_after:.2f}",
                         "yes" if f.while_running else "no", resumed_at(f), result))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def stage_durations(timeline: list[str]) -> str:
    """Seconds from `Running stage` to DVC's next line about the pipeline, for the stages that completed."""
    out, current = [], None
    for entry in timeline:
        if entry.startswith("----"):
            current = None
            continue
        t, line = float(entry[:8]), entry[9:]
        if line.startswith("Running stage '"):
            current = (line.split("'")[1], t)
        elif current and line.startswith("Updating lock file"):
            out.append(f"{current[0]} {t - current[1]:.1f}s")
            current = None
    return ", ".join(out)


@pytest.fixture(scope="module")
def faulted(tiny_pipeline, tmp_path_factory):
    """The fault-injected repository, reproduced to the end: (root, env, faults, final output, reference)."""
    ref_root, ref_env, ref_output = tiny_pipeline
    began = time.monotonic()
    base = tmp_path_factory.mktemp("faults")
    root = base / "repo"
    env = {**ref_env, "MLFLOW_TRACKING_URI": f"sqlite:///{base / 'mlflow.db'}", "PYTHONUNBUFFERED": "1"}
    pipeline_repository(root, env, "tiny", commit=False)  # as the reference (the tiny_pipeline fixture) was made,
    # with the params it holds now: tests may have changed and re-run it before this one (test_pipeline retrains L2)
    shutil.copyfile(ref_root / "params.yaml", root / "params.yaml")
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-q", "-m", "tiny"], root, env)

    order = execution_order(ref_output)
    faults = plan_faults(order, random.Random(SEED))
    commands = stage_commands(root)
    timeline: list[str] = []
    try:
        for i, fault in enumerate(faults):
            inject(root, env, fault, commands[fault.stage], timeline)
            if i:
                faults[i - 1].rerun_output = fault.output
        final = Repro(root, env)
        code = final.finish()
        final_output = final.output()
        for t, line in final.lines:
            timeline.append(f"{t:8.2f} {line[:200]}")
        timeline.append("---- end of the final repro")
        faults[-1].rerun_output = final_output
        assert code == 0, f"the final dvc repro failed:\n{final_output[-4000:]}"
    finally:
        (base / "timeline.log").write_text("\n".join(timeline) + "\n")
        print(f"\nfault injection: timeline in {base / 'timeline.log'}")
    print(f"fault injection: stage durations: {stage_durations(timeline)}")
    print(f"fault injection: {len(faults)} faults and the final repro took {time.monotonic() - began:.0f} s")
    return root, env, faults, final_output, ref_root


def test_killed_repros_end_identical_to_the_uninterrupted_run(faulted):
    root, env, faults, final_output, ref_root = faulted
    ours, reference = lock_outs(root), lock_outs(ref_root)
    src_changed = sorted(p for p, md5 in lock_src_deps(root).items() if lock_src_deps(ref_root).get(p) != md5)
    note = (f"\n(src/ changed between the reference run and this one: {src_changed}; other work in progress "
            "may explain a difference)") if src_changed else ""
    identical = {stage: stage_identical(stage, ours, reference, root, ref_root) for stage in reference}
    print("\n" + table(faults, identical))

    # every kind of stage had its fault; the SIGTERM stopped training within seconds, said so once, and was resumed
    kinds = {f.stage.split("@")[0] for f in faults if f.fired_after is not None and f.signum == signal.SIGKILL}
    assert kinds == KINDS, f"stages never killed: {KINDS - kinds}"
    term = next(f for f in faults if f.signum == signal.SIGTERM)
    assert term.fired_after is not None, "the SIGTERM was never sent"
    assert term.stopped_after is not None and term.stopped_after <= SIGTERM_STOP_SECONDS, \
        f"{term.stage} took {term.stopped_after} s to stop after SIGTERM:\n{term.output[-3000:]}"
    saved = [line for line in term.output.splitlines() if "checkpoint saved" in line]
    print(f"SIGTERM in {term.stage}: stopped {term.stopped_after} s after the signal, saying: {saved}")
    assert len(saved) == 1 and "interrupted by SIGTERM" in saved[0], term.output[-3000:]
    assert "Traceback" not in term.output, term.output[-3000:]
    layer = term.stage.split("@")[1]
    assert f"resuming from checkpoints/train-L{layer}.pt" in term.rerun_output, term.rerun_output[-3000:]

    # dvc.lock: the same outputs with the same hashes (the files quoting the commit compared below, masked)
    assert ours.keys() == reference.keys()
    different = {(stage, path) for stage in reference for path, md5 in reference[stage].items()
                 if path not in QUOTE_COMMIT and ours[stage].get(path) != md5}
    assert not different, f"dvc.lock output hashes differ from the uninterrupted run: {sorted(different)}{note}"

    # every output byte for byte
    for rel in COMPARED:
        mine, theirs = output_files(root, rel), output_files(ref_root, rel)
        assert mine.keys() == theirs.keys(), f"{rel}: files differ: {sorted(mine.keys() ^ theirs.keys())}"
        changed = [name for name in mine if mine[name] != theirs[name]]
        assert not changed, f"not byte-identical to the uninterrupted run: {changed}{note}"
    ref_commit = run(["git", "rev-parse", "HEAD"], ref_root, env).strip()
    commit = run(["git", "rev-parse", "HEAD"], root, env).strip()
    for rel in QUOTE_COMMIT:
        assert ref_commit.encode() in (ref_root / rel).read_bytes() and commit.encode() in (root / rel).read_bytes()
        assert masked((root / rel).read_bytes()) == masked((ref_root / rel).read_bytes()), \
            f"{rel} differs from the uninterrupted run beyond the git commit{note}"

    # nothing left to do, nothing left behind
    status = run(["dvc", "status"], root, env)
    assert "Data and pipelines are up to date" in status, status
    assert leftovers(root) == []


def mlflow_layers(root: Path, env: dict):
    from mlflow.tracking import MlflowClient

    uri = env["MLFLOW_TRACKING_URI"]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.get_experiment_by_name("attnsae")
    layers = yaml.safe_load((root / "params.yaml").read_text())["layers"]
    return client, experiment.experiment_id, layers


def test_mlflow_holds_one_set_of_curves_and_one_version_per_sae(faulted):
    """Killed and rerun train stages leave each layer one set of train/loss points (in the layer's active runs:
    tracking deletes the attempts a rerun supersedes) and the registry one version per SAE md5, the SAE in
    dvc.lock among them."""
    root, env, _, _, _ = faulted
    client, experiment_id, layers = mlflow_layers(root, env)
    problems = []
    for layer in layers:
        runs = client.search_runs([experiment_id], filter_string=f"tags.`attnsae.layer` = '{layer}'")
        points = [(m.step, m.value) for r in runs for m in client.get_metric_history(r.info.run_id, "train/loss")]
        with open(root / "reports" / "curves" / f"L{layer}.csv") as f:
            rows = list(csv.DictReader(f))
        if len(points) != len(rows):
            problems.append(f"L{layer}: {len(points)} train/loss points in {len(runs)} run(s), "
                            f"reports/curves/L{layer}.csv has {len(rows)} rows")
        print(f"MLflow L{layer}: {len(points)} train/loss points in {len(runs)} active run(s) of the layer; "
              f"reports/curves/L{layer}.csv: {len(rows)} rows")
    versions: dict[tuple[str, str], int] = {}
    for version in client.search_model_versions():
        key = (version.name, version.tags.get("attnsae.dvc_md5", ""))
        versions[key] = versions.get(key, 0) + 1
    print(f"MLflow registry: {sum(versions.values())} versions for {len(versions)} (model, SAE md5) pairs")
    problems += [f"{name}: {count} registry versions for SAE md5 {md5}" for (name, md5), count in versions.items()
                 if count > 1]
    lock = lock_outs(root)
    for layer in layers:  # the SAE that dvc.lock holds has its version
        md5 = lock[f"train@{layer}"][f"models/sae/L{layer}"]
        if not any(m == md5 and name.endswith(f"-L{layer}") for name, m in versions):
            problems.append(f"L{layer}: no registry version for the SAE in dvc.lock (md5 {md5})")
    assert not problems, "; ".join(problems)
