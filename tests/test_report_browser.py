"""The report page in a real browser: headless Chromium (the Debian package; `make browser` installs it).

Renders a report compared with the published table, then drives the chromium binary directly (no
CDP client, no downloaded browser): a screenshot that must not be blank, the rendered DOM with one
row per layer in table#layers, and the console log on stderr, which must hold no messages. A page
with a deliberate script error checks that this console check can fail at all.
"""

from __future__ import annotations

import html.parser
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from attnsae.reporting.report import build_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (`make browser` installs the Debian package)"
)
LAYERS = [0, 3, 7, 11]
WINDOW = (1280, 2400)
# Chromium with --enable-logging=stderr writes console messages and uncaught errors as
# "[...:INFO:CONSOLE:12] "message", source: file:///... (12)" (older builds: "CONSOLE(12)").
CONSOLE_LINE = re.compile(r":CONSOLE[:(]")


def chromium(tmp_path: Path, page: Path, *args: str) -> subprocess.CompletedProcess:
    """One headless run on a file:// URL with a throwaway profile; nothing reaches the network."""
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-dev-shm-usage", "--no-first-run", "--disable-extensions", f"--user-data-dir={profile}",
        "--enable-logging=stderr", "--v=0", *args, page.as_uri(),
    ]
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"chromium failed ({result.returncode}):\n{result.stderr[-2000:]}"
    return result


def console_messages(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if CONSOLE_LINE.search(line)]


class Dom(html.parser.HTMLParser):
    """Rows in table#layers's tbody, and script elements anywhere."""

    def __init__(self):
        super().__init__()
        self.stack: list[tuple[str, str | None]] = []
        self.layer_rows = 0
        self.scripts = 0

    def handle_starttag(self, tag, attrs):
        if tag == "tr" and ("tbody", None) in self.stack and ("table", "layers") in self.stack:
            self.layer_rows += 1
        self.scripts += tag == "script"
        self.stack.append((tag, dict(attrs).get("id") if tag == "table" else None))

    def handle_endtag(self, tag):
        while self.stack and self.stack.pop()[0] != tag:
            pass


def fake_gpt2_run(root: Path) -> Path:
    """A GPT-2 Small run's files (model info, token metadata, metrics, density), so the page has a reference."""
    for name in ("model", "tokens", "metrics", "density"):
        (root / name).mkdir(parents=True)
    (root / "model/attnsae_model.json").write_text(json.dumps({
        "source": "gpt2", "name": "gpt2 (test)", "n_layers": 12, "n_heads": 12, "d_head": 64,
        "vocab_size": 50257, "bos_token_id": 50256, "sha256": {},
    }))
    (root / "tokens/meta.json").write_text(json.dumps({"corpus": "hf:Skylion007/openwebtext (streamed)",
                                                       "context_size": 128,
                                                       "bos_token_id": 50256, "eval_fraction": 0.05, "split_seed": 49,
                                                       "documents": {"train": 5000, "eval": 60},
                                                       "rows": {"train": 7813, "eval": 64},
                                                       "tokens": {"train": 10**6, "eval": 8192}}))
    for i, layer in enumerate(LAYERS):
        metrics = {"layer": layer, "hook_name": f"blocks.{layer}.attn.hook_z", "model": "gpt2 (test)", "d_sae": 24576,
                   "eval_rows": 64, "l0": 8.0 + 3 * i, "loss_recovered": 0.8 + 0.04 * i, "ce_clean": 3.3,
                   "ce_sae": 3.4, "ce_zero": 4.3, "ce_increase": 0.1, "ce_increase_zero": 1.0, "kl_sae": 0.05,
                   "kl_zero": 0.5, "kl_score": 0.9, "mse": 1.0, "explained_variance": 0.6, "dead_fraction": 0.1 * i,
                   "dead_fraction_tokens": 8192, "dense_fraction": 0.01, "dense_threshold": 0.1, "eval_tokens": 8192}
        (root / f"metrics/L{layer}.json").write_text(json.dumps(metrics))
        bins = "\n".join(f"{-6 + 0.5 * b:.1f},{(b * 37) % 50}" for b in range(12))
        (root / f"density/L{layer}.csv").write_text("log10_density,features\n" + bins + "\n")
    build_report(LAYERS, root / "out", "auto", metrics_dir=root / "metrics", density_dir=root / "density",
                 model_dir=root / "model", tokens_dir=root / "tokens", sae_root=None)
    return root / "out" / "index.html"


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    return fake_gpt2_run(tmp_path_factory.mktemp("report"))


def test_screenshot_is_not_blank(page, tmp_path):
    import matplotlib.image

    shot = tmp_path / "report.png"
    chromium(tmp_path, page, "--hide-scrollbars", f"--screenshot={shot}", f"--window-size={WINDOW[0]},{WINDOW[1]}")
    assert shot.is_file() and shot.stat().st_size > 10_000
    pixels = matplotlib.image.imread(shot)[..., :3]
    assert pixels.shape[:2] == (WINDOW[1], WINDOW[0])
    assert pixels.std() > 0.05  # text, table rules and plots, not one flat colour
    not_white = (pixels < 0.9).any(axis=-1).mean()
    assert 0.01 < not_white < 0.9, not_white


def test_rendered_table_has_a_row_per_layer_and_no_script_errors(page, tmp_path):
    result = chromium(tmp_path, page, "--dump-dom")
    dom = Dom()
    dom.feed(result.stdout)
    assert dom.layer_rows == len(LAYERS)
    assert dom.scripts == 0
    assert "published" in result.stdout  # the reference columns rendered
    assert console_messages(result.stderr) == []


def test_console_check_catches_a_script_error(tmp_path):
    """Without this, an empty console log could just mean the log format changed."""
    bad = tmp_path / "bad.html"
    bad.write_text('<!doctype html><html><body><table id="layers"></table><script>notDefined();</script></body></html>')
    messages = console_messages(chromium(tmp_path, bad, "--dump-dom").stderr)
    assert any("notDefined" in m for m in messages), messages
