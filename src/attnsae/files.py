"""Atomic writes, content hashes and checked reads: nothing already written is lost or left half-written,
and a file that is missing or corrupt is one line naming it."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from pydantic import BaseModel, ValidationError

from attnsae.errors import UserError

if TYPE_CHECKING:
    import torch

Schema = TypeVar("Schema", bound=BaseModel)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_sha256(path: str | Path, expected: str) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise UserError(f"{path}: sha256 {actual} does not match the pinned {expected}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def missing_file(path: str | Path, written_by: str | None) -> UserError:
    """The error for a missing artifact, naming the command that writes it."""
    hint = f"; run `attnsae {written_by}` first" if written_by else ""
    return UserError(f"{path}: missing{hint}")


def read_text_file(path: str | Path, written_by: str | None = None) -> str:
    """A UTF-8 text file; missing, unreadable or not UTF-8 is a one-line error naming it."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise missing_file(path, written_by) from None
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte {err.start}); the file is corrupt") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror})") from None


def read_json_object(path: str | Path, expected: str, written_by: str | None = None) -> dict[str, Any]:
    """A JSON file holding an object; a missing, non-UTF-8 or corrupt file or another JSON type is a one-line error.

    ``expected`` completes "expected a JSON object ..." in that error (e.g. "of metrics"); ``written_by``
    names the command that writes the file, for the error when it is missing.
    """
    text = read_text_file(path, written_by)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: corrupt JSON ({err.msg}: line {err.lineno} column {err.colno})") from None
    except ValueError as err:  # json's only other one: Python's cap (4300 by default) on the digits of an int
        digits = re.search(r"value has (\d+) digits", str(err))
        raise UserError(f"{path}: corrupt JSON ({f'a {digits[1]}-digit number' if digits else err})") from None
    except RecursionError:  # json's parser recurses once per nested [ or {
        raise UserError(f"{path}: corrupt JSON (nested too deeply)") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object {expected}, got {type(data).__name__}")
    return data


def read_json_as(path: str | Path, schema: type[Schema], written_by: str | None = None) -> Schema:
    """A JSON object checked against ``schema``; a missing key or a value of the wrong type names the key."""
    data = read_json_object(path, f"({schema.__name__})", written_by)
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        raise UserError(f"{path}: {describe_validation_error(err)}") from None


def describe_validation_error(err: ValidationError) -> str:
    """The first problem pydantic found, in one line: the key and what is wrong with it."""
    first = err.errors()[0]
    key = ".".join(str(part) for part in first["loc"])
    if not key:  # a check of the whole object: its own message, without pydantic's "Value error, " prefix
        return str(first["ctx"]["error"]) if first["type"] == "value_error" else first["msg"]
    if first["type"] == "missing":
        return f"missing key '{key}'"
    got = repr(first.get("input"))
    return f"bad value for '{key}': {first['msg']} (got {got if len(got) <= 60 else got[:57] + '...'})"


def read_safetensors(path: str | Path, written_by: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file; missing, truncated or garbled is a one-line error naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise missing_file(path, written_by)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise UserError(f"{path}: corrupt safetensors file ({err})") from None


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    """Serialize in memory, write with Python: a full disk then raises OSError with its errno
    (safetensors' own file writer reports it as a SafetensorError with the errno in its text)."""
    from safetensors.torch import save

    Path(path).write_bytes(save(tensors))


def write_npy(path: str | Path, array: np.ndarray) -> None:
    """np.save through memory, for the same reason: numpy's own file writer reports a full disk as a
    short write without an errno."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    Path(path).write_bytes(buffer.getbuffer())


# errno -> what the message says; ``refuse_full_disk`` turns these into a one-line UserError.
DISK_FULL = {
    errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded", errno.EFBIG: "file too large",
}
# Rust's io::Error (safetensors, tokenizers: what transformers' save_pretrained writes with) ends "(os error N)".
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def _disk_full_reason(err: BaseException) -> str | None:
    if isinstance(err, OSError):
        return DISK_FULL.get(err.errno)
    match = _RUST_OS_ERROR.search(str(err))
    return DISK_FULL.get(int(match.group(1))) if match else None


@contextlib.contextmanager
def refuse_full_disk(path: str | Path) -> Iterator[None]:
    """A full disk, quota or file-size limit while writing ``path`` becomes one line (the writer cleans up)."""
    try:
        yield
    except UserError:
        raise
    except Exception as err:
        reason = _disk_full_reason(err)
        if reason is None:
            raise
        raise UserError(f"{path}: {reason} while writing (nothing was replaced)") from None


def remove_stale_temps(path: Path) -> None:
    """Remove the ``.NAME.<random>.tmp`` siblings of ``path`` that a killed writer left behind.

    A kill -9 or a power cut runs no cleanup handler, so the next writer of the same output cleans up
    instead. Each output has one writer at a time (its pipeline stage), so any such sibling is a leftover.
    """
    temp_name = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.tmp")  # tempfile's 8 random characters
    for sibling in path.parent.iterdir():
        if not temp_name.fullmatch(sibling.name):
            continue
        if sibling.is_dir() and not sibling.is_symlink():
            shutil.rmtree(sibling, ignore_errors=True)
        else:
            sibling.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write UTF-8 ``text`` via a temporary sibling: readers see the old file or the complete new one."""
    write_texts_atomic({Path(path): text})


def write_texts_atomic(texts: dict[Path, str]) -> None:
    """Write several UTF-8 files as one output: each via a temporary sibling, and none replaced before all are
    written, so a full disk or a file-size limit leaves every old file as it was."""
    temps: dict[Path, str] = {}
    try:
        for path, text in texts.items():
            with refuse_full_disk(path):
                path.parent.mkdir(parents=True, exist_ok=True)
                remove_stale_temps(path)
                fd, temps[path] = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(text)
                os.chmod(temps[path], 0o666 & ~_umask())  # mkstemp makes owner-only files; outputs get the usual mode
        for path, tmp in temps.items():  # renames take no space: once all are written, all are replaced
            os.replace(tmp, path)
    except BaseException:
        for tmp in temps.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise


def write_json_atomic(path: str | Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``path`` whole, on failure it is removed.

    A full disk or a file-size limit while the body writes is one line naming ``path``.
    """
    path = Path(path)
    old = path.with_name(f".{path.name}.old")  # holds the previous output between the two replaces at the end
    with refuse_full_disk(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
        # left by a writer killed between those replaces: kill -9 runs no cleanup
        shutil.rmtree(old, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes an owner-only folder; outputs get the usual mode
    try:
        with refuse_full_disk(path):
            yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for file in tmp.rglob("*"):  # some writers (safetensors) make owner-only files: outputs get the usual mode
        if file.is_file():
            os.chmod(file, 0o666 & ~_umask())
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
