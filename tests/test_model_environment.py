"""The model stage's output depends on its params only: not on HF_HUB_OFFLINE, HF_HOME or the locale.

Measured: a fresh clone's `make quickstart` under HF_HUB_OFFLINE=1 wrote "local_files_only": true into
models/base/tokenizer_config.json where the committed run had false, so models/base hashed differently and every later
stage reran with byte-identical results. Each variant below runs in its own process, as a user's shell would."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from attnsae.data.models import LOADING_KEYS, byte_level_tokenizer
from helpers import OFFLINE_ENV, TINY_PROFILE

ATTNSAE = Path(sys.executable).with_name("attnsae")


def environments(tmp_path: Path) -> dict[str, dict[str, str]]:
    return {
        "hub offline": {"HF_HUB_OFFLINE": "1"},
        "hub online": {"HF_HUB_OFFLINE": "0"},
        "another HF_HOME": {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "elsewhere")},
        "C locale": {"HF_HUB_OFFLINE": "1", "LC_ALL": "C", "LANG": "C"},
        "UTF-8 locale": {"HF_HUB_OFFLINE": "1", "LC_ALL": "C.utf8", "LANG": "C.utf8"},
    }


def folder_digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_python(code: str, cwd: Path, env: dict[str, str]) -> None:
    base = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_HOME", "LC_ALL", "LANG")}
    subprocess.run([sys.executable, "-c", code], cwd=cwd, env={**base, **env}, check=True, capture_output=True)


@pytest.mark.parametrize("writer", ["save_pretrained", "save_tokenizer"])
def test_a_reloaded_tokenizer_is_saved_the_same_in_every_environment(tmp_path, writer):
    """The SmolLM2 path loads its tokenizer (from the GGUF) and saves it: plain save_pretrained records how it was
    loaded, so this test fails for it, which shows it can; the stage's save_tokenizer does not."""
    byte_level_tokenizer().save_pretrained(tmp_path / "source")
    code = textwrap.dedent(f"""
        import os
        from pathlib import Path
        from transformers import AutoTokenizer
        from attnsae.data.models import save_tokenizer
        tokenizer = AutoTokenizer.from_pretrained("source")
        out = Path(os.environ["OUT"])
        {"tokenizer.save_pretrained(out)" if writer == "save_pretrained" else "save_tokenizer(tokenizer, out)"}
    """)
    digests = {}
    for name, env in environments(tmp_path).items():
        if writer == "save_pretrained" and name not in ("hub offline", "hub online"):
            continue  # the control needs only the pair it differs on
        out = tmp_path / name
        run_python(code, tmp_path, {**env, "OUT": str(out)})
        digests[name] = folder_digest(out)
    if writer == "save_pretrained":
        assert digests["hub offline"] != digests["hub online"]
    else:
        assert all(d == digests["hub offline"] for d in digests.values()), digests
        config = (tmp_path / "hub offline" / "tokenizer_config.json").read_text()
        assert not any(f'"{key}"' in config for key in LOADING_KEYS)


def test_the_model_stage_writes_the_same_folder_in_every_environment(tmp_path):
    digests = {}
    for name, env in environments(tmp_path).items():
        out = tmp_path / "models" / name
        subprocess.run([str(ATTNSAE), "model", "--params", str(TINY_PROFILE), "--out", str(out)], cwd=tmp_path,
                       env={**{k: v for k, v in os.environ.items() if k not in env}, **OFFLINE_ENV, **env},
                       check=True, capture_output=True)
        digests[name] = folder_digest(out)
    assert all(d == digests["hub offline"] for d in digests.values()), digests
