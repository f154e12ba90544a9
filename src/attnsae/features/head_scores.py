"""`attnsae head-scores`: do the induction tags agree with the heads? A check of the tags against the model.

Head-level induction scores on repeated random tokens are the standard, robust measurement (the mean attention
from each second-repeat position to the token after the earlier copy of its token). A feature whose decoder
weight sits mostly on high-scoring heads writes mostly what those heads write, so the induction tag should be
far more common among those features than among the others. Reads the model, the layer's SAE and its
dashboards' features.json; writes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from attnsae.data.models import load_bridge, load_tokenizer
from attnsae.features import attribution, families
from attnsae.formats.features import read_features
from attnsae.formats.model_info import read_model_info
from attnsae.sae.autoencoder import load_sae


@dataclass
class HeadScores:
    """What `attnsae head-scores` measured on one layer."""

    head_scores: list[float]
    induction_heads: list[int]  # heads scoring at least the threshold
    on_heads: tuple[int, int]  # (tagged induction, features) among fired features mostly on those heads
    elsewhere: tuple[int, int]  # the same among the other fired features

    def lines(self, layer: int, min_score: float, min_share: float) -> list[str]:
        scores = ", ".join(f"H{h} {s:.3f}" for h, s in enumerate(self.head_scores))
        heads = ", ".join(f"H{h}" for h in self.induction_heads) or "none"
        return [
            f"L{layer} head induction scores (repeated random tokens): {scores}",
            f"L{layer} induction heads (score >= {min_score}): {heads}",
            f"L{layer} features tagged induction, among features that fire on the dashboard tokens: "
            f"{_share(self.on_heads)} with decoder weight >= {min_share} on those heads; "
            f"{_share(self.elsewhere)} of the others",
        ]


def _share(counts: tuple[int, int]) -> str:
    tagged, total = counts
    return f"{tagged}/{total} ({tagged / total:.0%})" if total else "0/0"


def score_heads(model_dir: str | Path, sae_dir: str | Path, features_path: str | Path, layer: int, prompts: int,
                seed: int, min_score: float, min_share: float) -> HeadScores:
    doc = read_features(features_path, layer, sae_dir)
    info = read_model_info(model_dir)
    bridge, _ = load_bridge(model_dir, torch.device("cpu"))
    scores = families.head_induction_scores(bridge, layer, load_tokenizer(model_dir), info.bos_token_id, prompts, seed)
    heads = [h for h, s in enumerate(scores.tolist()) if s >= min_score]
    sae, _ = load_sae(sae_dir)
    shares = attribution.decoder_head_shares(sae, info.n_heads)
    on_heads = (shares[:, heads].sum(1) >= min_share).tolist()
    fired = [d > 0 for d in doc["summary"]["density"]]
    tagged = ["induction" in t for t in doc["summary"]["tags"]]

    def count(where: bool) -> tuple[int, int]:
        chosen = [t for t, f, o in zip(tagged, fired, on_heads) if f and o == where]
        return sum(chosen), len(chosen)

    return HeadScores([float(s) for s in scores], heads, count(True), count(False))
