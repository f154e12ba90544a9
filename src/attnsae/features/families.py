"""Family tags, measured: one score per feature and tag, its probe prompts, and a null baseline.

Every tag is a single number per feature (``TAG_DEFINITIONS`` gives each formula, quoted by docs/features-json.md and
the dashboard pages). Most read the feature's direct feature attribution (DFA, attribution.py) through one quantity:

    p(s) = max(sum_h DFA_f[b,d,s,h], 0) / sum_s' max(sum_h DFA_f[b,d,s',h], 0)

the share of the positive attribution at a firing token (b, d) that comes from source position s (0 for every s
when no source attributes positively). Position 0 of every row and probe is BOS and is left out of every sum: a
BOS token has itself as its only source, so every share there is 1 and says nothing about the feature.

Corpus tags (``CorpusFamilyStats``) are exact activation-weighted statistics over every firing token of the
dashboard tokens; probe tags (``build_probes``, ``probe_scores_many``) come from prompts generated deterministically
from the model's tokenizer. A feature gets a tag when its score reaches the tag's threshold (params
``dashboards.tags``) and its percentile against the null baseline (``null_encoder``: the same score for random
encoder directions) reaches ``dashboards.null_percentile``.
"""

from __future__ import annotations

import itertools
import string
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from attnsae.config import TagThresholds
from attnsae.features import attribution
from attnsae.sae.autoencoder import SAE

TAGS = ("induction", "previous_token", "duplicate_token", "successor", "name_mover", "local_context",
        "high_level_context", "current_token", "bos_sink")
PROBE_TAGS = ("induction", "duplicate_token", "successor", "name_mover")
CORPUS_TAGS = tuple(tag for tag in TAGS if tag not in PROBE_TAGS)

# Firing persistence R(k) = P(fires at d+k | fires at d) within a row: a few tokens on (local) and far on (document).
LOCAL_LAG, DOCUMENT_LAG = 4, 64
# Attended distance: a source more than this many positions back is "far" (the context tags' second factor).
FAR_SOURCES = 16

# Repeat lengths of the induction probe, cycled over its prompts (BOS + R + R is at most 65 tokens). Length 2 is
# left out: there the induction source d-1 is also the previous token, so a previous-token feature would score.
INDUCTION_PREFIX_LENGTHS = (3, 4, 5, 6, 8, 10, 12, 16, 24, 32)
# The duplicate-token probe: this many random tokens, one of them repeated at least this far from its first copy
# (adjacent copies would make the duplicate the previous token).
DUPLICATE_PROMPT_TOKENS = (8, 32)
DUPLICATE_MIN_GAP = 3
SUCCESSOR_ITEMS = (3, 6)  # items per ordinal sequence, inclusive

ORDINAL_SEQUENCES = {
    "numerals": [str(n) for n in range(21)],
    "number words": ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                     "twelve"],
    "days": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"],
    "months": ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
               "November", "December"],
    "capital letters": list(string.ascii_uppercase),
    "letters": list(string.ascii_lowercase),
}
# How items are written: (item format, separator). "1, 2, 3," tokenizes as items without a space and ", ";
# " Monday, Tuesday," as items with their space and ",".
ORDINAL_FORMS = (("{}", ", "), ("{}", " "), (" {}", ","), (" {}", ""))

# IOI-style templates (Wang et al. 2022): {A} and {B} are introduced, {S} (one of them) is repeated, and the
# model should name the other one (the indirect object, IO) after the final token.
IOI_TEMPLATES = (
    "When{A} and{B} went to the store,{S} gave a drink to",
    "When{A} and{B} went to the park,{S} gave a ball to",
    "Then,{A} and{B} had a long argument, and afterwards{S} said to",
    "After the lunch,{A} and{B} went to the garden.{S} gave a flower to",
    "While{A} and{B} were working at the office,{S} handed a letter to",
)
IOI_NAMES = ("Mary", "John", "Tom", "James", "Dan", "Sid", "Martin", "Amy", "Anna", "Paul", "Kate", "Lisa", "Mark",
             "Sarah", "David", "Alice", "Bob", "Jack", "Emma", "Peter", "Jane", "Mike", "Laura", "Steve", "Rose",
             "George", "Susan", "Henry", "Linda", "Frank")

# At most this many floats in any intermediate tensor of the DFA-share computation (16 MiB in fp32).
CHUNK_ELEMENTS = 1 << 22

_SHARE = "p(s) = positive part of sum_h DFA[s,h] at a firing token, normalised over source positions s"
# Probe scores divide by at least one full-strength firing, so one faint firing on a probe scores near 0.
_FLOOR = "A_max (the feature's largest activation on the dashboard tokens)"
TAG_DEFINITIONS: dict[str, dict[str, str]] = {
    "induction": {
        "formula": "sum over second-repeat positions d of a(d) * p(d - L + 1) / max(sum over all probe positions of "
                   f"a, {_FLOOR}), where d - L + 1 is the token after the earlier copy of the current token; {_SHARE}",
        "source": "probe",
        "probe": "BOS + R + R, R distinct uniform random single tokens, repeat length L in "
                 + ", ".join(map(str, INDUCTION_PREFIX_LENGTHS)),
    },
    "previous_token": {
        "formula": "activation-weighted mean of p(d - 1) over all firing tokens d >= 1 of the dashboard tokens; "
                   f"{_SHARE}",
        "source": "corpus",
        "probe": "",
    },
    "duplicate_token": {
        "formula": "sum over second occurrences d of a(d) * p(first occurrence) / max(sum over all probe positions "
                   f"of a, {_FLOOR}); {_SHARE}",
        "source": "probe",
        "probe": f"BOS + {DUPLICATE_PROMPT_TOKENS[0]}..{DUPLICATE_PROMPT_TOKENS[1]} distinct random single tokens, one "
                 f"of them repeated once, at least {DUPLICATE_MIN_GAP} positions after its first copy "
                 "(no repeated context)",
    },
    "successor": {
        "formula": "mean over (sequence, control) pairs of (A_ordered - A_shuffled) / max(A_ordered + A_shuffled, "
                   f"{_FLOOR}), A = sum of a over all positions of the prompt (0 when both are 0); the control holds "
                   "the same tokens, so only their order differs",
        "source": "probe",
        "probe": f"{SUCCESSOR_ITEMS[0]}-{SUCCESSOR_ITEMS[1]} consecutive items of: "
                 + ", ".join(ORDINAL_SEQUENCES)
                 + " (single-token items only), comma or space separated, each sequence as the tokenizer writes "
                 "it in running text; each with a shuffled control that has no item followed by its successor",
    },
    "name_mover": {
        "formula": f"sum over END positions of a(END) * p(IO) / max(sum over all probe positions of a, {_FLOOR}); "
                   + _SHARE,
        "source": "probe",
        "probe": f"IOI sentences ({len(IOI_TEMPLATES)} templates, those the tokenizer writes as built; ABBA and BABA "
                 "orders, single-token names), END = the final token, IO = the name that appears once",
    },
    "local_context": {
        "formula": f"(R({LOCAL_LAG}) - max(R({DOCUMENT_LAG}), density)) * (1 - F - B), R(k) = P(fires at d+k | fires "
                   "at d) within a row, density = firing frequency (tokens d >= 1 of the dashboard tokens), "
                   f"F = activation-weighted mean of the share of p from sources more than {FAR_SOURCES} positions "
                   f"back (s < d - {FAR_SOURCES}, s >= 1), B = the bos_sink score; {_SHARE}",
        "source": "corpus",
        "probe": "",
    },
    "high_level_context": {
        "formula": f"(R({DOCUMENT_LAG}) - density) * F, R(k) = P(fires at d+k | fires at d) within a row, density = "
                   "firing frequency (tokens d >= 1 of the dashboard tokens), F = activation-weighted mean of the "
                   f"share of p from sources more than {FAR_SOURCES} positions back (s < d - {FAR_SOURCES}, s >= 1); "
                   f"{_SHARE}",
        "source": "corpus",
        "probe": "",
    },
    "current_token": {
        "formula": f"activation-weighted mean of p(d) over all firing tokens d >= 1 of the dashboard tokens; {_SHARE}",
        "source": "corpus",
        "probe": "",
    },
    "bos_sink": {
        "formula": f"activation-weighted mean of p(0) (the BOS position) over all firing tokens d >= 1 of the "
                   f"dashboard tokens; {_SHARE}",
        "source": "corpus",
        "probe": "",
    },
}

NULL_DESCRIPTION = ("each null direction is a uniformly random direction with the encoder norm of an SAE feature drawn "
                    "at random among those that fire on the first batch of dashboard rows, passed through the SAE's "
                    "own activation (ReLU; JumpReLU at the drawn feature's threshold; TopK: firing only where it "
                    "would win one of the k slots against the SAE's features at that token), with a bias that makes "
                    "it fire on as many tokens of that batch as the feature does; every tag's score is computed for "
                    "it exactly as for the features; percentile = 100 x (null scores below + half the ties) / null "
                    "directions")


# ---------------------------------------------------------------------------------------------------
# DFA shares at firing tokens


def source_shares(t: attribution.LayerTensors, w_heads: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor,
                  features: torch.Tensor, sources: torch.Tensor, far_before: int | None = None) -> torch.Tensor:
    """p(s) (module docstring) of N (row, position, feature) triples at K given sources each: [N, K]. With
    ``far_before``, one more column: the summed share of the far sources, 1 <= s < d - far_before.

    The same DFA as ``attribution.dfa``, summed over heads, but computed from v . W_enc^h once per batch and
    feature ([B, S, H] per feature) instead of once per triple, and in chunks: no intermediate tensor holds more
    than ``CHUNK_ELEMENTS`` floats (about 4 of them are alive at once: 64 MiB), whatever N is.
    """
    n_rows, seq, n_heads, _ = t.v.shape
    pattern = t.pattern.permute(0, 2, 3, 1)  # [B, dest, src, H]: one gather per triple reads a contiguous block
    out = torch.zeros(len(sources), sources.shape[1] + (far_before is not None), dtype=t.v.dtype, device=t.v.device)
    source_index = torch.arange(seq, device=t.v.device)
    firing, feature_index = torch.unique(features, return_inverse=True)
    block_size = max(1, CHUNK_ELEMENTS // (n_rows * seq * n_heads))
    for start in range(0, len(firing), block_size):
        block = firing[start:start + block_size]
        reads = torch.einsum("bshd,hdf->bfsh", t.v, w_heads[:, :, block]).contiguous()  # v[b,s,h] . W_enc^h[:, f]
        in_block = ((feature_index >= start) & (feature_index < start + len(block))).nonzero().squeeze(1)
        for part in in_block.split(max(1, CHUNK_ELEMENTS // (seq * n_heads))):
            by_source = (pattern[rows[part], positions[part]] * reads[rows[part], feature_index[part] - start]).sum(-1)
            shares = positive_shares(by_source)
            out[part, : sources.shape[1]] = shares.gather(1, sources[part])
            if far_before is not None:
                far = (source_index >= 1) & (source_index < positions[part, None] - far_before)
                out[part, -1] = (shares * far).sum(1)
    return out


def positive_shares(by_source: torch.Tensor) -> torch.Tensor:
    """Each row's positive part divided by its sum, [N, S]; all zeros for a row with no positive entry."""
    positive = by_source.clamp_min(0)
    total = positive.sum(-1, keepdim=True)
    return torch.where(total > 0, positive / total.clamp_min(torch.finfo(positive.dtype).tiny), 0.0)


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator, 0 where the denominator is 0 (a feature that never fired there scores 0)."""
    return torch.where(denominator > 0, numerator / denominator.clamp_min(1e-30), 0.0)


# ---------------------------------------------------------------------------------------------------
# Corpus tags


class CorpusFamilyStats:
    """The corpus tags' statistics, streamed batch by batch over the dashboard tokens; exact, no top-k.

    Memory: a few [d_sae] accumulators, plus per ``add`` the batch's firing mask ([B, S, d_sae] bools) and
    ``source_shares``'s bounded chunks. Time: linear in the number of firing (token, feature) pairs.
    """

    SHARE_SOURCES = ("previous_token", "current_token", "bos_sink")  # p(d - 1), p(d), p(0): the columns below

    def __init__(self, sae: SAE, n_heads: int):
        self.w_heads = attribution.encoder_by_head(sae, n_heads)
        zeros = lambda: torch.zeros(sae.d_sae, dtype=torch.float64, device=self.w_heads.device)  # noqa: E731
        self.mass = zeros()  # sum of activations over firing tokens
        self.max_activation = zeros()  # the probe scores' floor (probe_scores_many)
        self.share_mass = {tag: zeros() for tag in self.SHARE_SOURCES}  # sum of a * p(source)
        self.far_mass = zeros()  # sum of a * (share of p from sources more than FAR_SOURCES back)
        self.fires = zeros()
        self.tokens = 0
        self.pairs = {lag: zeros() for lag in (LOCAL_LAG, DOCUMENT_LAG)}  # fires at d and at d + lag
        self.starts = {lag: zeros() for lag in (LOCAL_LAG, DOCUMENT_LAG)}  # fires at d, and d + lag is in the row

    @torch.inference_mode()
    def add(self, t: attribution.LayerTensors, acts: torch.Tensor) -> None:
        """Fold in one batch: ``acts`` [B, S, d_sae] is this encoder's activations on ``t`` (position 0 = BOS)."""
        acts = acts[:, 1:]
        fire = acts > 0
        self.tokens += fire.shape[0] * fire.shape[1]
        self.fires += fire.sum((0, 1))
        self.mass += acts.sum((0, 1))
        self.max_activation = torch.maximum(self.max_activation, acts.amax((0, 1)))
        for lag in self.pairs:
            if fire.shape[1] > lag:
                self.pairs[lag] += (fire[:, :-lag] & fire[:, lag:]).sum((0, 1))
                self.starts[lag] += fire[:, :-lag].sum((0, 1))
        rows, positions, features = fire.nonzero(as_tuple=True)
        positions = positions + 1
        sources = torch.stack([positions - 1, positions, torch.zeros_like(positions)], dim=1)
        shares = source_shares(t, self.w_heads, rows, positions, features, sources, far_before=FAR_SOURCES)
        weighted = shares * acts[rows, positions - 1, features][:, None]
        for column, tag in enumerate(self.SHARE_SOURCES):
            self.share_mass[tag].index_add_(0, features, weighted[:, column].double())
        self.far_mass.index_add_(0, features, weighted[:, -1].double())

    def scores(self) -> dict[str, torch.Tensor]:
        """Corpus tag -> [d_sae] float scores (``TAG_DEFINITIONS``)."""
        density = self.fires / max(self.tokens, 1)
        local, document = (_ratio(self.pairs[lag], self.starts[lag]) for lag in (LOCAL_LAG, DOCUMENT_LAG))
        scores = {tag: _ratio(self.share_mass[tag], self.mass) for tag in self.SHARE_SOURCES}
        far = _ratio(self.far_mass, self.mass)  # how far back the feature reads: the attended distance
        scores["local_context"] = (local - torch.maximum(document, density)) * (1 - far - scores["bos_sink"])
        scores["high_level_context"] = (document - density) * far
        return {tag: scores[tag].float().cpu() for tag in CORPUS_TAGS}


# ---------------------------------------------------------------------------------------------------
# Probes


@dataclass(frozen=True)
class ProbeSet:
    """The prompts behind one probe tag.

    ``kind`` "attributed": the score counts a(d) * p(source) at each target (row, position, source).
    ``kind`` "contrast": rows come in pairs, a sequence (even row) and its control (the next row, the same tokens in
    another order); the score compares their summed activations, and there are no targets.
    """

    tag: str
    kind: Literal["attributed", "contrast"]
    rows: list[list[int]]  # token ids, BOS first; lengths differ
    targets: list[tuple[int, int, int]]

    @property
    def prompts(self) -> int:
        return len(self.rows)


def build_probes(tokenizer, bos_token_id: int, prompts: int, seed: int) -> list[ProbeSet]:
    """The four probe sets (``PROBE_TAGS`` order), ``prompts`` prompts each (successor: that many sequences and as
    many controls), deterministic given ``seed``. A set the tokenizer cannot fill (no single-token names) is empty."""
    vocabulary = single_token_ids(tokenizer)
    return [
        induction_probe(vocabulary, bos_token_id, prompts, np.random.default_rng([seed, 0])),
        duplicate_probe(vocabulary, bos_token_id, prompts, np.random.default_rng([seed, 1])),
        successor_probe(tokenizer, bos_token_id, prompts, np.random.default_rng([seed, 2])),
        name_mover_probe(tokenizer, bos_token_id, prompts, np.random.default_rng([seed, 3])),
    ]


def probe_prompt_counts(probes: list[ProbeSet]) -> dict[str, int]:
    """Tag -> prompts behind it (0 for corpus tags and for an empty probe set)."""
    counts = {tag: 0 for tag in TAGS}
    counts.update({probe.tag: probe.prompts for probe in probes})
    return counts


def single_token_ids(tokenizer) -> np.ndarray:
    """Token ids, not special, whose text encodes back to exactly that one id (sorted)."""
    special = set(tokenizer.all_special_ids)
    ids = [i for i in range(len(tokenizer)) if i not in special]
    texts = tokenizer.batch_decode([[i] for i in ids])
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return np.array([i for i, back in zip(ids, encoded) if back == [i]], dtype=np.int64)


def _single_token(tokenizer, text: str) -> int | None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids[0] if len(ids) == 1 and ids[0] not in tokenizer.all_special_ids else None


def induction_probe(vocabulary: np.ndarray, bos: int, prompts: int, rng: np.random.Generator) -> ProbeSet:
    """BOS + R + R; targets: each second-repeat position d and its induction source d - L + 1."""
    rows, targets = [], []
    for row, length in zip(range(prompts), itertools.cycle(INDUCTION_PREFIX_LENGTHS)):
        repeat = rng.choice(vocabulary, size=length, replace=False).tolist()
        rows.append([bos] + repeat + repeat)
        targets += [(row, d, d - length + 1) for d in range(length + 1, 2 * length + 1)]
    return ProbeSet("induction", "attributed", rows, targets)


def duplicate_probe(vocabulary: np.ndarray, bos: int, prompts: int, rng: np.random.Generator) -> ProbeSet:
    """Distinct random tokens, one repeated once; target: the second occurrence, with the first as its source."""
    rows, targets = [], []
    for row in range(prompts):
        n = int(rng.integers(DUPLICATE_PROMPT_TOKENS[0], DUPLICATE_PROMPT_TOKENS[1] + 1))
        tokens = rng.choice(vocabulary, size=n, replace=False).tolist()
        first = int(rng.integers(1, n - DUPLICATE_MIN_GAP + 1))  # positions 1..n after BOS
        second = int(rng.integers(first + DUPLICATE_MIN_GAP, n + 1))
        tokens[second - 1] = tokens[first - 1]
        rows.append([bos] + tokens)
        targets.append((row, second, first))
    return ProbeSet("duplicate_token", "attributed", rows, targets)


def as_written(tokenizer, tokens: list[int], text: str) -> bool:
    """Whether ``tokens``, encoded piece by piece, are what the tokenizer makes of ``text`` in one go. A probe is
    built from pieces so that it knows where each name or item sits; it is only worth running on tokens the model
    meets in running text (a byte-level BPE writes "Monday, Tuesday" as Monday , ĠTuesday, never , Ġ Tuesday)."""
    return tokenizer.encode(text, add_special_tokens=False) == tokens


def ordinal_runs(tokenizer) -> list[tuple[list[int], list[int]]]:
    """(item ids, separator ids) for every ordinal sequence and written form whose consecutive items are single
    tokens: each maximal run of at least the minimum sequence length, kept when it is the tokenizer's own encoding
    of its text (``as_written``)."""
    runs = []
    for items, (item_format, separator) in itertools.product(ORDINAL_SEQUENCES.values(), ORDINAL_FORMS):
        separator_ids = tokenizer.encode(separator, add_special_tokens=False) if separator else []
        ids = [_single_token(tokenizer, item_format.format(item)) for item in items]
        run: list[int] = []
        for index, token in enumerate(ids + [None]):
            if token is not None:
                run.append(token)
                continue
            written = "".join(item_format.format(item) + separator for item in items[index - len(run):index])
            pieces = [piece for item in run for piece in [item] + separator_ids]
            if len(run) >= SUCCESSOR_ITEMS[0] and as_written(tokenizer, pieces, written):
                runs.append((run, separator_ids))
            run = []
    return runs


def _ordinal_prompt(bos: int, items: list[int], separator: list[int]) -> list[int]:
    """BOS + item sep item sep ... item [sep]: a trailing separator when there is one, where the next item is
    predicted."""
    return [bos] + [token for item in items for token in [item] + separator]


def _shuffled_without_successor(items: list[int], rng: np.random.Generator) -> list[int]:
    """A permutation of ``items`` (in ordinal order) where no item is directly followed by its successor."""
    while True:
        order = rng.permutation(len(items))
        if not np.any(np.diff(order) == 1):
            return [items[i] for i in order]


def successor_probe(tokenizer, bos: int, prompts: int, rng: np.random.Generator) -> ProbeSet:
    """Ordinal sequences, each followed by its shuffled control (the same tokens, no item followed by its successor).

    The whole prompt counts, not only the items after the second: the control then holds exactly the same tokens,
    so a feature of one token (say " March") scores 0 however the shuffle moved it.
    """
    runs = ordinal_runs(tokenizer)
    rows = []
    for _ in range(prompts if runs else 0):
        run, separator = runs[int(rng.integers(len(runs)))]
        n = int(rng.integers(SUCCESSOR_ITEMS[0], min(SUCCESSOR_ITEMS[1], len(run)) + 1))
        start = int(rng.integers(len(run) - n + 1))
        ordered = run[start:start + n]
        rows += [_ordinal_prompt(bos, ordered, separator),
                 _ordinal_prompt(bos, _shuffled_without_successor(ordered, rng), separator)]
    return ProbeSet("successor", "contrast", rows, [])


def name_mover_probe(tokenizer, bos: int, prompts: int, rng: np.random.Generator) -> ProbeSet:
    """IOI sentences, ABBA and BABA in turn; target: the final token (END) with the IO name as its source."""
    spelled = [(token, " " + name) for token, name in ((_single_token(tokenizer, " " + n), n) for n in IOI_NAMES)
               if token is not None]
    names = [token for token, _ in spelled]
    templates = [t for t in IOI_TEMPLATES if len(names) >= 2 and _ioi_as_written(tokenizer, t, spelled[:2])]
    rows, targets = [], []
    for row in range(prompts if templates else 0):
        template = templates[row % len(templates)]
        io, subject = rng.choice(names, size=2, replace=False).tolist()
        first, second = (io, subject) if row % 2 == 0 else (subject, io)  # ABBA, then BABA
        tokens, name_positions = [bos], []
        for piece, name in zip(_split_template(template), (first, second, subject, None)):
            tokens += tokenizer.encode(piece, add_special_tokens=False) if piece else []
            if name is not None:
                name_positions.append(len(tokens))
                tokens.append(name)
        rows.append(tokens)
        targets.append((row, len(tokens) - 1, name_positions[0] if first == io else name_positions[1]))
    return ProbeSet("name_mover", "attributed", rows, targets)


def _ioi_as_written(tokenizer, template: str, names: list[tuple[int, str]]) -> bool:
    """Whether the template, filled piece by piece with two single-token names (token, text), is the tokenizer's
    encoding of the sentence (``as_written``)."""
    tokens, text = [], ""
    for piece, name in zip(_split_template(template), (names[0], names[1], names[0], None)):
        tokens += tokenizer.encode(piece, add_special_tokens=False) if piece else []
        text += piece
        if name is not None:
            tokens.append(name[0])
            text += name[1]
    return as_written(tokenizer, tokens, text)


def _split_template(template: str) -> list[str]:
    """The text around {A}, {B} and {S}, in order (four pieces)."""
    pieces = []
    for name in ("{A}", "{B}", "{S}"):
        before, template = template.split(name)
        pieces.append(before)
    return pieces + [template]


# ---------------------------------------------------------------------------------------------------
# Running the probes


def _batches(probe: ProbeSet, batch_rows: int, device: torch.device):
    """(first row, tokens [b, S] right-padded with token 0, lengths [b]) for consecutive rows; padding never affects
    the real positions of a causal model, and it is masked out of every sum."""
    for first in range(0, probe.prompts, batch_rows):
        rows = probe.rows[first:first + batch_rows]
        longest = max(map(len, rows))
        tokens = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, row in enumerate(rows):
            tokens[i, :len(row)] = torch.tensor(row)
        yield first, tokens.to(device), torch.tensor(list(map(len, rows)), device=device)


class _AttributedScore:
    """sum over targets of a(d) * p(source) / max(sum over all positions of a, floor), per feature."""

    def __init__(self, probe: ProbeSet, sae: SAE, n_heads: int, floor: torch.Tensor):
        self.sae, self.w_heads = sae, attribution.encoder_by_head(sae, n_heads)
        self.targets = torch.tensor(probe.targets, dtype=torch.long, device=sae.W_enc.device).reshape(-1, 3)
        self.total = torch.zeros(sae.d_sae, dtype=torch.float64, device=sae.W_enc.device)
        self.attributed = torch.zeros_like(self.total)
        self.floor = floor

    def add(self, first: int, t: attribution.LayerTensors, acts: torch.Tensor, real: torch.Tensor) -> None:
        self.total += (acts * real[..., None]).sum((0, 1))
        here = self.targets[(self.targets[:, 0] >= first) & (self.targets[:, 0] < first + len(acts))]
        rows, positions = here[:, 0] - first, here[:, 1]
        which, features = (acts[rows, positions] > 0).nonzero(as_tuple=True)
        rows, positions = rows[which], positions[which]
        shares = source_shares(t, self.w_heads, rows, positions, features, here[which, 2:3])[:, 0]
        self.attributed.index_add_(0, features, (shares * acts[rows, positions, features]).double())

    def score(self) -> torch.Tensor:
        return _ratio(self.attributed, torch.maximum(self.total, self.floor))


class _ContrastScore:
    """mean over (sequence, control) pairs of (A_seq - A_control) / max(A_seq + A_control, floor), A summed over a
    prompt."""

    def __init__(self, probe: ProbeSet, sae: SAE, n_heads: int, floor: torch.Tensor):
        self.by_row = torch.zeros(probe.prompts, sae.d_sae, dtype=torch.float64, device=sae.W_enc.device)
        self.floor = floor

    def add(self, first: int, t: attribution.LayerTensors, acts: torch.Tensor, real: torch.Tensor) -> None:
        self.by_row[first:first + len(acts)] = (acts * real[..., None]).sum(1)

    def score(self) -> torch.Tensor:
        sequence, control = self.by_row[0::2], self.by_row[1::2]
        if not len(sequence):
            return torch.zeros(self.by_row.shape[1], dtype=torch.float64)
        return _ratio(sequence - control, torch.maximum(sequence + control, self.floor)).mean(0)


@torch.inference_mode()
def probe_scores_many(bridge, layer: int, saes: list[SAE], probes: list[ProbeSet], batch_rows: int,
                      floors: list[torch.Tensor | None] | None = None) -> list[dict[str, torch.Tensor]]:
    """Probe tag -> [d_sae] scores (``TAG_DEFINITIONS``) of several encoders (an SAE and its null) from one model
    pass over the probes; 0 for a feature that never fires on the tag's probe.

    ``floors`` (per encoder, [d_sae]: pass ``CorpusFamilyStats.max_activation``, the feature's largest activation on
    the dashboard tokens) are the least activation mass a score is divided by: a feature that barely fires on a
    probe then scores near 0 instead of anywhere in [-1, 1] on the strength of one faint firing. None: no floor.
    """
    n_heads = bridge.cfg.n_heads
    floors = [torch.zeros(sae.d_sae) if floor is None else floor for sae, floor in
              zip(saes, floors or [None] * len(saes))]
    results: list[dict[str, torch.Tensor]] = [{} for _ in saes]
    for probe in probes:
        scorer = _ContrastScore if probe.kind == "contrast" else _AttributedScore
        scorers = [scorer(probe, sae, n_heads, floor.to(sae.W_enc.device, torch.float64))
                   for sae, floor in zip(saes, floors)]
        for first, tokens, lengths in _batches(probe, batch_rows, saes[0].W_enc.device):
            t = attribution.capture_layer(bridge, tokens, layer)
            positions = torch.arange(tokens.shape[1], device=tokens.device)
            real = (positions[None] >= 1) & (positions[None] < lengths[:, None])  # not BOS, not padding
            for sae, each in zip(saes, scorers):
                each.add(first, t, sae.encode(t.x).reshape(*tokens.shape, sae.d_sae), real)
        for result, each in zip(results, scorers):
            result[probe.tag] = each.score().float().cpu()
    return results


@torch.inference_mode()
def head_induction_scores(bridge, layer: int, tokenizer, bos_token_id: int, prompts: int, seed: int) -> torch.Tensor:
    """Per head [H]: mean attention from second-repeat positions to their induction source on the induction probe
    (repeated random tokens), the standard head-level induction score."""
    probe = build_probes(tokenizer, bos_token_id, prompts, seed)[0]
    total = torch.zeros(bridge.cfg.n_heads, dtype=torch.float64)
    targets = torch.tensor(probe.targets, dtype=torch.long)
    device = next(bridge.parameters()).device
    for first, tokens, _ in _batches(probe, prompts, device):
        pattern = attribution.capture_layer(bridge, tokens, layer).pattern.cpu()
        here = targets[(targets[:, 0] >= first) & (targets[:, 0] < first + len(tokens))]
        total += pattern[here[:, 0] - first, :, here[:, 1], here[:, 2]].sum(0).double()
    return (total / len(targets)).float()


# ---------------------------------------------------------------------------------------------------
# The null baseline and the tags


class CompetingNull(SAE):
    """Null directions for a TopK SAE: a direction fires at a token where its pre-activation is positive and above
    the k-th largest of the SAE's own pre-activations there, i.e. where it would take one of the k slots from the
    SAE's features. Each direction competes with the features alone, never with the other null directions."""

    def __init__(self, d_in: int, n_directions: int, rivals: SAE):
        super().__init__(d_in, n_directions)
        self.rivals = rivals

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_activation(x)
        return pre * (pre > slot_bar(self.rivals, x).unsqueeze(-1))


def slot_bar(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    """[...]: what a pre-activation must exceed to fire in a TopK SAE at each row of ``x``: its k-th largest
    pre-activation there, and 0."""
    return sae.pre_activation(x).topk(min(sae.k, sae.d_sae), dim=-1).values[..., -1].clamp_min(0.0)


def null_encoder(sae: SAE, n_directions: int, seed: int, first_batch: torch.Tensor | None = None,
                 own_activation: bool = True) -> SAE:
    """``n_directions`` random encoder directions (``NULL_DESCRIPTION``): each a uniformly random direction scaled to
    the encoder norm of an SAE feature drawn at random, with the SAE's b_dec, through the SAE's own activation (a
    standard SAE's ReLU; a jumprelu SAE's at the drawn feature's threshold; a topk SAE's competition for its k slots,
    ``CompetingNull``). Its decoder is the directions' transpose (unit rows); only the encoder is used.

    With ``first_batch`` (SAE inputs [N, d_in]) each direction is drawn from the features that fire on it, and its
    bias makes it fire, under that activation, on as many of those N tokens as that feature does: a null as sparse as
    the features, so a score that sparse firing alone inflates (a feature firing only where one head's output is
    large) is inflated for the null too. Without it: any feature, with that feature's b_enc.

    ``own_activation`` False: a ReLU null whatever the SAE's activation, as every SAE's was before issue 24 (kept so
    bench/tag_nulls.py can show what the change does).
    """
    generator = torch.Generator().manual_seed(seed)
    weights = sae.W_enc.detach().cpu()
    firing = None if first_batch is None else (sae.encode(first_batch) > 0).float().sum(0).cpu()
    pool = torch.arange(sae.d_sae) if firing is None or not firing.any() else firing.nonzero().squeeze(1)
    drawn = pool[torch.randint(len(pool), (n_directions,), generator=generator)]
    directions = torch.randn(sae.d_in, n_directions, generator=generator)
    directions /= directions.norm(dim=0, keepdim=True)
    w_enc = directions * weights[:, drawn].norm(dim=0)
    kind = sae.kind if own_activation else "standard"
    if kind == "topk":
        null = CompetingNull(sae.d_in, n_directions, sae)
    else:
        null = SAE(sae.d_in, n_directions, kind=kind)
    threshold = sae.threshold.detach().cpu()[drawn] if kind == "jumprelu" else torch.zeros(n_directions)
    if firing is None:
        b_enc = sae.b_enc.detach().cpu()[drawn]
    else:
        with torch.no_grad():
            # fire where projection + b_enc exceeds the bar the SAE's activation sets: 0 (ReLU), the threshold
            # (JumpReLU), the k-th largest feature pre-activation at that token (TopK)
            bar = slot_bar(sae, first_batch).cpu().unsqueeze(1) if kind == "topk" else threshold
            margins = (first_batch.cpu() - sae.b_dec.detach().cpu()) @ w_enc - bar  # [N, n_directions]
        ranked = margins.sort(dim=0, descending=True).values
        count = firing[drawn].long().clamp(1, len(ranked) - 1)  # fire on the top `count` tokens of the batch
        columns = torch.arange(n_directions)
        # halfway between the last token in and the first out, so rounding in the encoder cannot move the cut
        b_enc = -(ranked[count - 1, columns] + ranked[count, columns]) / 2
    with torch.no_grad():
        null.W_enc.copy_(w_enc)
        null.W_dec.copy_(directions.T)
        null.b_enc.copy_(b_enc)
        null.b_dec.copy_(sae.b_dec.detach().cpu())
        if null.kind == "jumprelu":
            null.threshold.copy_(threshold)
    return null.to(sae.W_enc.device)


def percentiles(scores: torch.Tensor, null_scores: torch.Tensor) -> torch.Tensor:
    """100 x (null scores strictly below + half the null scores equal) / null count, per feature: [d_sae] in 0..100."""
    ordered = null_scores.float().sort().values
    below = torch.searchsorted(ordered, scores.float(), right=False)
    not_above = torch.searchsorted(ordered, scores.float(), right=True)
    return 100.0 * (below + 0.5 * (not_above - below)) / max(len(ordered), 1)


def assign_tags(scores: dict[str, torch.Tensor], percentiles: dict[str, torch.Tensor], thresholds: TagThresholds,
                null_percentile: float) -> list[list[str]]:
    """Per feature, the tags (``TAGS`` order) whose score reaches the threshold and beats the null percentile."""
    passed = torch.stack([(scores[tag] >= getattr(thresholds, tag)) & (percentiles[tag] >= null_percentile)
                          for tag in TAGS], dim=1)
    return [[tag for tag, hit in zip(TAGS, row) if hit] for row in passed.tolist()]
