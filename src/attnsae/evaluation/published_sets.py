"""The published attention SAEs `attnsae import` fetches, one entry per set: its name, its hub repository and the
model it was trained on (every ``model.source`` that names that model).

Light (no torch): the CLI's ``--set`` choices, `attnsae profile` (which adds a streaming profile's published-SAE
stages when its model has a set) and the report's "is this GPT-2 Small?" read it without loading an importer. The
importers, with each set's file layout and checks, are paper_saes.py and gemma_scope.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from attnsae.evaluation import paper


@dataclass(frozen=True)
class PublishedSet:
    name: str
    repo: str
    model_sources: tuple[str, ...]  # the first is the one an imported SAE records

    def trained_on(self, source: str) -> bool:
        """Whether ``model.source`` names this set's model (an ``hf:`` source at any revision)."""
        return source.split("@")[0] in self.model_sources


KISSANE = PublishedSet("kissane-gpt2-small", paper.WEIGHTS_REPO, (paper.MODEL_SOURCE, f"hf:{paper.MODEL_REPO}"))
GEMMA_SCOPE = PublishedSet("gemma-scope-2b-att", "google/gemma-scope-2b-pt-att", ("hf:google/gemma-2-2b",))
SETS = (KISSANE, GEMMA_SCOPE)
NAMES = tuple(s.name for s in SETS)


def for_model(source: str) -> PublishedSet | None:
    """The set trained on the model ``source`` names, if any."""
    return next((s for s in SETS if s.trained_on(source)), None)
