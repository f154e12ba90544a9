"""``features.json``: the dashboards stage's document of every number a layer page shows (format
``attnsae-dashboards``, version 2; its fields are described in docs/features-json.md).

The format's name and version, its rounding, its content hash (what people's ratings are tied to), its bytes,
the checked reader, and the tag counts the report tables. labels, the report and the head-scores check read the
document through this module, so they do not depend on the code that makes it (or on torch).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from attnsae.errors import UserError
from attnsae.files import read_json_object

FORMAT = "attnsae-dashboards"
VERSION = 2  # 2: each family's features ranked and its best one carded (``families``)
FEATURES_FILE = "features.json"


def rounded(value):
    """Floats to 6 significant digits, all the way down: features.json holds what the page shows, not noise."""
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v) for v in value]
    return value


def content_hash(doc: dict) -> str:
    """sha256 of the canonical JSON of the document without its own hash: what a rating is tied to."""
    body = {k: v for k, v in doc.items() if k != "content_hash"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def features_json_text(doc: dict) -> str:
    """The file's text: compact JSON, UTF-8 as is, one line."""
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")) + "\n"


def tag_counts(doc: dict) -> tuple[dict[str, int], int]:
    """How many features carry each tag of the document, and how many carry none."""
    tags = doc["summary"]["tags"]
    return {tag: sum(tag in t for t in tags) for tag in doc["tag_definitions"]}, sum(not t for t in tags)


def families_of(tags: list[list[str]], scores: dict[str, list[float]]) -> dict[str, dict]:
    """Per tag: the features carrying it, best score first (ties: lower feature first), and the best one (None when
    no feature carries it: none scored above the tag's threshold and its null on this layer)."""
    families = {}
    for tag, score in scores.items():
        ranked = sorted((f for f, carried in enumerate(tags) if tag in carried), key=lambda f: (-score[f], f))
        families[tag] = {"ranked": ranked, "best": ranked[0] if ranked else None}
    return families


def read_features(path: str | Path, layer: int, sae: str | Path | None = None) -> dict:
    """Layer ``layer``'s features.json (of the SAE folder ``sae``, when given) as the stage wrote it, or one line naming
    the file and what is wrong. Intact is not enough: another layer's file copied here is intact too."""
    doc = read_json_object(path, "of dashboard features", written_by="dashboards")
    if doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise UserError(f"{path}: not an {FORMAT} file of version {VERSION} "
                        f"(got format {doc.get('format')!r}, version {doc.get('version')!r}); "
                        "re-run `attnsae dashboards`")
    if doc.get("content_hash") != content_hash(doc):
        raise UserError(f"{path}: its content does not match its content_hash (edited by hand?); "
                        "re-run `attnsae dashboards`")
    again = f"re-run `attnsae dashboards --layer {layer}`"
    if doc.get("layer") != layer:
        raise UserError(f"{path}: holds the dashboards of layer {doc.get('layer')!r}, not of layer {layer} "
                        f"(copied from another layer?); {again}")
    if sae is not None and not (isinstance(doc.get("sae"), str) and Path(doc["sae"]).resolve() == Path(sae).resolve()):
        raise UserError(f"{path}: holds the dashboards of the SAE {doc.get('sae')!r}, not of {sae}; {again}")
    return doc
