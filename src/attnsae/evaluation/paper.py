"""The published result attnsae reproduces first: Kissane, Krzyzanowski, Conmy, Nanda, "Attention SAEs
Scale to GPT-2 Small" (Feb 2024), docs/design.md 2.

One row per layer holds everything the post and its weights repository say about that layer: the
recipe values its checkpoint's file name spells, the pinned sha256 of that checkpoint, and the numbers
of the post's table. ``comparison`` sets our numbers against the table, ``paper_saes`` imports the
checkpoints, and ``profiles/gpt2-small.yaml`` spells the same recipe (tests/test_import.py keeps it in step).
"""

from __future__ import annotations

from dataclasses import dataclass

SOURCE = (
    "Kissane, Krzyzanowski, Conmy, Nanda, 'Attention SAEs Scale to GPT-2 Small' (Feb 2024); "
    "weights: ckkissane/attn-saes-gpt2-small-all-layers"
)
WEIGHTS_REPO = "ckkissane/attn-saes-gpt2-small-all-layers"
# https://huggingface.co/ckkissane/attn-saes-gpt2-small-all-layers/commits/97e0da0e9182695e9813d15ea32184da83f5c874
WEIGHTS_REVISION = "97e0da0e9182695e9813d15ea32184da83f5c874"
MODEL_SOURCE = "gpt2"  # our model source name for GPT-2 Small (data/models.py)
MODEL_REPO = "openai-community/gpt2"  # the same model as an hf: source (any revision: its weights never changed)
N_LAYERS, D_IN = 12, 768  # GPT-2 Small: 12 layers; hook_z 12 heads x 64, concatenated
DATASET = "Skylion007/openwebtext"
CONTEXT_SIZE = 128
# The original evaluated 5 batches of 512 x 128 tokens (docs/design.md 4); dead fractions depend on it.
EVAL_TOKENS = 5 * 512 * 128


@dataclass(frozen=True)
class PaperLayer:
    layer: int
    d_sae: int
    l1_coeff: float
    dead_cutoff: float
    version: int  # the checkpoint's _v<N> suffix
    # Git LFS sha256 of the checkpoint, from its hub file page ("Git LFS Details") with main at WEIGHTS_REVISION.
    sha256: str
    # The post's table. L0 is rounded to an integer and percentages to whole points there.
    l0: float
    loss_recovered: float
    dead_fraction: float
    alive_interpretable: float  # a person's judgement of the first 30 features; kept, never compared


LAYERS: dict[int, PaperLayer] = {
    row.layer: row
    for row in (
        PaperLayer(0, 24576, 1.8, 1e-6, 9, "b822b5e489757eb94e18b0ba4bdb9ca9ff04eef25ff9c9cd824026b5d5edf38f", 3, 0.99, 0.13, 0.97),
        PaperLayer(1, 24576, 0.8, 1e-6, 5, "48f07690fa645b6fb8db5cbc7b9a981847ac132d1684d9b82bd15d3befe205fc", 20, 0.78, 0.49, 0.87),
        PaperLayer(2, 24576, 1.0, 1e-6, 4, "6f3541a135a32f2c69de8e7bd5d5fd184b3696c4bf8421b51e855bb2e4630e5e", 16, 0.90, 0.20, 0.95),
        PaperLayer(3, 24576, 0.9, 1e-6, 9, "0fd318e6fe6b33bd7fd0ece3e4d06df945ad3217ff84aa707f5dddedb44b4bcf", 15, 0.84, 0.08, 0.75),
        PaperLayer(4, 24576, 1.1, 1e-6, 7, "74f68e3d0afafef447e83c0aaa77085c83b18f562c407aa76265fc24dc3c3dcf", 15, 0.88, 0.05, 1.00),
        PaperLayer(5, 49152, 1.0, 1e-6, 9, "5fc134321b85ecf653ed67c0a3fd36998c88c0073f77403a320db6f1244c263d", 20, 0.85, 0.40, 0.82),
        PaperLayer(6, 24576, 1.1, 1e-6, 9, "33aad2927d141bcb4aa1306648dd497f125bb00af0ca9c15fb54ad7ca27a4a26", 19, 0.82, 0.28, 0.75),
        PaperLayer(7, 49152, 1.1, 1e-6, 9, "d6829f8d529c4444a3d3d9b72418181811282215705be4b5010b41a7edb54770", 19, 0.83, 0.58, 0.70),
        PaperLayer(8, 24576, 1.3, 1e-5, 6, "43ae59496e61e5845a42fa8cea5da0f58f5852003340a434e33cef0f9145ff8e", 20, 0.76, 0.37, 0.64),
        PaperLayer(9, 24576, 1.2, 1e-6, 9, "0aecf46e40ea4db5fcc5247bf0da81354192b697a1614a3aff9ee978cf1e2d7f", 21, 0.83, 0.48, 0.85),
        PaperLayer(10, 24576, 1.3, 1e-5, 9, "887e17c99430f925b36a645819d1275e58ccd534b9612f5c6614bb215840a8a9", 16, 0.85, 0.41, 0.81),
        PaperLayer(11, 24576, 3.0, 3.16e-6, 9, "0aae765f1116d42a1a319af1db93cb2f6e134ec292bb0eccd43bd4021834fefe", 8, 0.89, 0.84, 0.66),
    )
}
