"""The Hugging Face hub (or a mirror, or the tests' loopback server): where it is, whether it answers, a
repository's files at a commit with their hashes, and one file fetched. Every failure is one line naming what
was asked for.

Used by the ``model`` stage (``hf:`` sources), ``attnsae import`` (published SAEs) and the corpus's ``hf:``
datasets. huggingface_hub reads ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` itself; where the files come from never
changes what they are: each is checked against the hash the hub lists for it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from attnsae.errors import UserError, innermost_cause
from attnsae.files import sha256_file

DEFAULT_ENDPOINT = "https://huggingface.co"
REACH_TIMEOUT_S = 5


@dataclass(frozen=True)
class HubFile:
    """One file of a repository at a commit, as the hub lists it: its Git LFS sha256 for large files, else the git
    blob id (sha1 of ``blob <size>\\0<content>``)."""

    name: str
    lfs_sha256: str | None
    blob_id: str | None

    def check(self, path: Path, where: str) -> str:
        """The file's sha256, after checking it against the hash the hub lists (one line naming it on a mismatch)."""
        sha256 = sha256_file(path)
        if self.lfs_sha256 is not None and sha256 != self.lfs_sha256:
            raise UserError(f"{where}: {self.name} has sha256 {sha256}, the hub lists {self.lfs_sha256}")
        if self.lfs_sha256 is None and self.blob_id is not None and git_blob_id(path) != self.blob_id:
            raise UserError(f"{where}: {self.name} has git blob id {git_blob_id(path)}, the hub lists {self.blob_id}")
        return sha256


def git_blob_id(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def check_endpoint(endpoint: str | None) -> str:
    """The hub to use: ``endpoint`` (a mirror, or the tests' loopback server), else HF_ENDPOINT, else the hub."""
    url = (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UserError(f"--endpoint must be an http(s) URL like http://127.0.0.1:8000, got {endpoint!r}")
    return url


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def unreachable_reason(endpoint: str, timeout: float = REACH_TIMEOUT_S) -> str | None:
    """Why the hub at ``endpoint`` cannot be used now (within seconds), or None when it answers: huggingface_hub
    would retry a refused connection five times with backoff (about 23 s) before giving up."""
    if offline():
        return "HF_HUB_OFFLINE is set"
    parts = urllib.parse.urlsplit(endpoint)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except OSError as err:  # refused, unknown host, timed out
        return f"{endpoint} is not reachable: {err.strerror or type(err).__name__}"
    return None


def require(endpoint: str, what: str, mirror: str = "HF_ENDPOINT") -> None:
    """A one-line error when the hub cannot be used now; ``mirror``: how the user names another endpoint."""
    reason = unreachable_reason(endpoint)
    if reason:
        raise UserError(f"{what} needs the Hugging Face hub (or a mirror: {mirror}), which cannot be used ({reason})")


class _QuietHub:
    """huggingface_hub's retry warnings off the terminal: a failure is reported once, in one line."""

    def __enter__(self) -> None:
        self.logger = logging.getLogger("huggingface_hub")
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc) -> None:
        self.logger.setLevel(self.level)


def repo_files(repo: str, revision: str, endpoint: str) -> tuple[str, dict[str, HubFile]]:
    """The commit ``revision`` names (a branch, tag or commit) and the files of ``repo`` there, with their hashes."""
    from huggingface_hub import HfApi

    try:
        with _QuietHub():
            info = HfApi(endpoint=endpoint).model_info(repo, revision=revision, files_metadata=True)
    except Exception as err:  # not found, gated, private, network: each means the listing did not arrive
        raise UserError(f"hf:{repo}@{revision}: cannot list its files on {endpoint} "
                        f"({innermost_cause(err, limit=200)})") from None
    if not info.sha:
        raise UserError(f"hf:{repo}@{revision}: {endpoint} did not say which commit the revision is")
    files = {sibling.rfilename: HubFile(sibling.rfilename, sibling.lfs.sha256 if sibling.lfs else None,
                                        sibling.blob_id) for sibling in info.siblings or []}
    return info.sha, files


def download(repo: str, revision: str, name: str, folder: Path, endpoint: str) -> Path:
    """One file of ``repo`` at ``revision``, fetched with huggingface_hub into ``folder`` (its own bookkeeping
    folder, ``.cache``, included: callers keep only the files they asked for)."""
    from huggingface_hub import hf_hub_download

    try:
        with _QuietHub():
            return Path(hf_hub_download(repo, name, revision=revision, endpoint=endpoint, local_dir=folder))
    except Exception as err:  # its own errors, httpx's and OSError: each means the file did not arrive
        raise UserError(f"could not download {name} of {repo} from {endpoint} (revision {revision[:12]}): "
                        f"{innermost_cause(err, limit=200)}") from None
