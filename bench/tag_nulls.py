"""Family tags against the null each architecture gets (issue 24, item 1): not a speed benchmark, a measurement on
the quickstart's data of what the null baseline does to the tag counts.

    python bench/tag_nulls.py [--layer 17] [--architecture topk ...]  # after the quickstart's `dvc repro`
    python bench/tag_nulls.py --layer 17 --architecture topk --seeds 49 1 2 3  # the spread over training seeds

One SAE per architecture at L0 about 20 on one layer, trained on the quickstart's activation cache with the
quickstart's recipe and the frontier's settings for the architecture (params.yaml `frontier`): standard (l1_coeff
1.2, between the frontier's 0.8 and 1.6, whose layer-17 L0 were 37 and 13), topk k 20 (the committed quickstart SAE),
batchtopk k 20, jumprelu l0_coeff 0.005. Each is tagged as the dashboards stage tags it (same rows, probes and
thresholds) twice: against a ReLU null, as every architecture was before, and against a null through the SAE's own
activation (families.null_encoder). Prints the features per tag for both, and how many reach each tag's score
threshold before any null is asked. Kernels and threads pinned as the stages pin them (numerics.py), so the TopK
row's right-hand counts are the committed dashboards'.

With --seeds, each architecture is trained once per seed (``sae.seed``: its initialisation and batch order; the
quickstart's own SAE stands for its seed, 49) and tagged against its own activation's null only: one row per seed,
then each tag's least, median and most, which is how far one training's counts are from another's.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
from pathlib import Path

from attnsae import numerics

numerics.pin_kernels()  # before torch's first operation, as the CLI

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
POINTS = {"standard": {"l1_coeff": 1.2}, "topk": {"k": 20}, "batchtopk": {"k": 20}, "jumprelu": {"l0_coeff": 0.005}}


def trained_sae(params: dict, architecture: str, layer: int, seed: int | None = None):
    from attnsae import config, layout
    from attnsae.data.activations import DiskActivations
    from attnsae.sae.autoencoder import load_sae
    from attnsae.sae.training import train_sae

    seed = params["sae"]["seed"] if seed is None else seed
    own = architecture == params["sae"]["architecture"] and params["sae"].get("k") == POINTS[architecture].get("k")
    if own and seed == params["sae"]["seed"]:
        return load_sae(REPO / "models" / "sae" / f"L{layer}")[0]  # the quickstart's own
    frontier = params["frontier"][architecture]
    recipe = {key: value for key, value in params["sae"].items() if key not in config.ARCHITECTURE_SETTINGS["topk"]}
    values = {**recipe, **frontier["settings"], "architecture": architecture, **POINTS[architecture], "seed": seed}
    cfg = config.SAEConfig.model_validate(values)
    return train_sae(cfg, DiskActivations(layout.activations_dir(layer, REPO / "data" / "activations")),
                     progress=False).sae


def tag_counts(bridge, sae, layer: int, rows, cfg, tokenizer, bos: int, own_activation: bool) -> tuple[dict, float]:
    from attnsae.features import dashboards, families

    device = torch.device("cpu")
    make_null = functools.partial(families.null_encoder, own_activation=own_activation)
    scanned = dashboards.scan(bridge, sae, layer, rows, len(rows), cfg, device, make_null=make_null)
    scores, pct, _ = dashboards.tag_scores(bridge, sae, layer, scanned, tokenizer, bos, cfg)
    fired = scanned.firings.counts() > 0
    tags = [t if f else [] for t, f in zip(families.assign_tags(scores, pct, cfg.tags, cfg.null_percentile), fired)]
    counts = {tag: sum(tag in t for t in tags) for tag in families.TAGS}
    reaching = {tag: int(((scores[tag] >= getattr(cfg.tags, tag)) & torch.as_tensor(fired)).sum())
                for tag in families.TAGS}
    return counts, reaching, float(scanned.firings.counts().sum() / rows.size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", type=int, default=17)
    parser.add_argument("--architecture", dest="architectures", action="append", choices=list(POINTS),
                        help="Only this architecture (repeatable) [default: all four].")
    parser.add_argument("--seeds", type=int, nargs="+", help="Train each architecture once per seed (sae.seed) "
                        "and tag it against its own activation's null: the spread between trainings.")
    args = parser.parse_args()
    from attnsae import config
    from attnsae.data.models import load_bridge, load_tokenizer, resolve_device
    from attnsae.data.tokenization import load_rows
    from attnsae.features import families
    from attnsae.formats.model_info import read_model_info

    params = config.read_params(REPO / "params.yaml")
    cfg = config.dashboards_config(params)
    model_dir = REPO / "models" / "base"
    info = read_model_info(model_dir)
    rows = load_rows(REPO / "data" / "tokens", "eval", vocab_size=info.vocab_size)[: cfg.max_rows or None]
    bridge, _ = load_bridge(model_dir, resolve_device("cpu"))
    tokenizer = load_tokenizer(model_dir)
    if args.seeds:
        return seed_spread(params, args, bridge, rows, cfg, tokenizer, info.bos_token_id)
    print(f"layer {args.layer}, {rows.size:,} dashboard tokens, {cfg.null_directions} null directions, null "
          f"percentile {cfg.null_percentile}; features per tag, ReLU null -> the SAE's own activation", flush=True)
    print("| architecture | L0 | " + " | ".join(families.TAGS) + " |")
    print("|---|---|" + "---|" * len(families.TAGS))
    reaching = {}
    for architecture in args.architectures or list(POINTS):
        sae = trained_sae(params, architecture, args.layer).eval()
        before, reaching[architecture], l0 = tag_counts(bridge, sae, args.layer, rows, cfg, tokenizer,
                                                        info.bos_token_id, False)
        after, _, _ = tag_counts(bridge, sae, args.layer, rows, cfg, tokenizer, info.bos_token_id, True)
        cells = " | ".join(f"{before[tag]} -> {after[tag]}" for tag in families.TAGS)
        point = POINTS[architecture]
        print(f"| {architecture} {', '.join(f'{k} {v:g}' for k, v in point.items())} | {l0:.1f} | "
              f"{cells} |", flush=True)
    for architecture, counts in reaching.items():
        print(f"{architecture}: features reaching each tag's score threshold: "
              + ", ".join(f"{tag} {n}" for tag, n in counts.items()))


def seed_spread(params: dict, args, bridge, rows, cfg, tokenizer, bos: int) -> None:
    """Features per tag (the SAE's own activation's null) for each architecture and training seed, then each tag's
    least, median and most over the seeds."""
    from attnsae.features import families

    print(f"layer {args.layer}, {rows.size:,} dashboard tokens, {cfg.null_directions} null directions (seed "
          f"{cfg.seed}), null percentile {cfg.null_percentile}; features per tag against the SAE's own activation",
          flush=True)
    print("| architecture | sae.seed | L0 | " + " | ".join(families.TAGS) + " |")
    print("|---|---|---|" + "---|" * len(families.TAGS))
    for architecture in args.architectures or list(POINTS):
        runs = []
        for seed in args.seeds:
            sae = trained_sae(params, architecture, args.layer, seed).eval()
            counts, _, l0 = tag_counts(bridge, sae, args.layer, rows, cfg, tokenizer, bos, True)
            runs.append(counts)
            print(f"| {architecture} | {seed} | {l0:.1f} | " + " | ".join(str(counts[t]) for t in families.TAGS)
                  + " |", flush=True)
        spread = [sorted(run[tag] for run in runs) for tag in families.TAGS]
        print(f"| {architecture} | least, median, most | | "
              + " | ".join(f"{s[0]}, {statistics.median(s):g}, {s[-1]}" for s in spread) + " |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
