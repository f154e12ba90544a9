"""The sparse SAE step (issue 23): after a TopK (or any) selection only k latents per row are nonzero, so only the
encoder's pre-activation needs the dense matmul; everything else touches the selected latents alone.

For a batch x [B, d_in] and the latents each row keeps, ``idx`` [B, k] (TopK: its k largest pre-activations):

    pre     = (x - b_dec) @ W_enc + b_enc          dense, without autograd: B x d_in x d_sae multiply-adds
    values  = ReLU(pre[b, idx[b, j]])              ``SelectedPreActivations``: its backward touches idx's latents only
    x_hat   = sum_j values[b, j] W_dec[idx[b, j]] + b_dec        ``embedding_bag`` (its backward: the k rows)

The dense step does five B x d_in x d_sae matmuls (encoder forward; decoder forward; the decoder's weight and input
gradients; the encoder's weight gradient); this one does the first and four of B x d_in x k. Gradients are those of
the dense step to float rounding (tests/test_sparse_step.py), since the unselected latents carry zero gradient there.
AuxK (``sparse_auxk_loss``) selects its aux_k dead latents the same way. BatchTopK and JumpReLU keep a varying
number of latents per row: ``padded_selection`` pads each row to the largest count with masked entries; JumpReLU's
threshold gradient (straight-through, nonzero within bandwidth / 2 of the threshold) also reads latents just below
their thresholds, so ``jumprelu_selection`` keeps those too and ``SelectedJumpReLU`` scatters the threshold's
gradient back.

Training uses it with ``sae.kernel: sparse`` (objectives.py chooses per architecture and device).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnsae.sae.autoencoder import SAE, SAEOutput, scored


class SelectedPreActivations(torch.autograd.Function):
    """pre[b, idx[b, j]], given the dense ``pre`` computed without autograd, with the gradient of the dense
    pre-activation restricted to the selected latents:

        d W_enc[:, l] = sum over (b, j) with idx[b, j] = l of g[b, j] * centred[b]  (a sparse [d_sae, B] x [B, d_in])
        d b_enc[l]    = sum over the same (b, j) of g[b, j]
        d centred[b]  = sum_j g[b, j] * W_enc[:, idx[b, j]]                         (embedding_bag over W_enc's columns)
    """

    @staticmethod
    def forward(ctx, pre: torch.Tensor, centred: torch.Tensor, w_enc: torch.Tensor, b_enc: torch.Tensor,
                idx: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(centred, w_enc, idx)
        return pre.gather(1, idx)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        centred, w_enc, idx = ctx.saved_tensors
        d_sae, (batch, k) = w_enc.shape[1], idx.shape
        latents, g = idx.reshape(-1), grad.reshape(-1).to(centred.dtype)
        rows = torch.arange(batch, device=idx.device).repeat_interleave(k)
        selection = torch.sparse_coo_tensor(torch.stack([latents, rows]), g, (d_sae, batch), check_invariants=False)
        grad_w_enc = torch.sparse.mm(selection, centred).T
        grad_b_enc = torch.zeros(d_sae, dtype=g.dtype, device=g.device).index_add_(0, latents, g)
        # embedding_bag over a strided view of W_enc reads 30x slower than over a contiguous copy (measured on CPU)
        grad_centred = F.embedding_bag(idx, w_enc.T.contiguous(), per_sample_weights=grad.to(w_enc.dtype), mode="sum")
        return None, grad_centred, grad_w_enc, grad_b_enc, None


def encode(sae: SAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(centred, pre): x - b_dec (with autograd, for the sparse backward) and the dense pre-activation (without)."""
    centred = x - sae.b_dec
    with torch.no_grad():
        pre = centred @ sae.W_enc + sae.b_enc
    return centred, pre


def selected_values(sae: SAE, x: torch.Tensor, select) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pre, idx, values): the dense pre-activation (no autograd), the latents ``select(pre)`` keeps per row, and
    their ReLU'd pre-activations with the sparse gradient."""
    centred, pre = encode(sae, x)
    idx = select(pre)
    values = SelectedPreActivations.apply(pre, centred, sae.W_enc, sae.b_enc, idx).relu()
    return pre, idx, values


def sparse_decode(w_dec: torch.Tensor, idx: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """sum_j values[b, j] * W_dec[idx[b, j]] (without b_dec), [B, d_in], in W_dec's dtype (under bf16 autocast the
    values are bf16: a gather-sum gains nothing from rounding the weights too)."""
    return F.embedding_bag(idx, w_dec, per_sample_weights=values.to(w_dec.dtype), mode="sum")


@dataclass
class SparseFeatures:
    """A batch's feature activations as the latents each row kept: ``values`` [B, m] of latents ``idx`` [B, m]
    (zero where an entry is padding or did not fire). autoencoder.DenseFeatures's questions, answered without the
    [B, d_sae] matrix."""

    idx: torch.Tensor
    values: torch.Tensor
    d_sae: int

    def fires_per_feature(self) -> torch.Tensor:
        fired = (self.values > 0).float()
        return torch.zeros(self.d_sae, device=fired.device).index_add_(0, self.idx.reshape(-1), fired.reshape(-1))

    def fires_per_row(self) -> torch.Tensor:
        return (self.values > 0).sum(-1).float()

    def smallest_active(self) -> torch.Tensor:
        return torch.where(self.values > 0, self.values, torch.inf).min()

    def dense(self) -> torch.Tensor:
        return dense_features(self.idx, self.values, self.d_sae)


def sparse_reconstruction_loss(sae: SAE, x: torch.Tensor, idx: torch.Tensor, values: torch.Tensor,
                               l1_coeff: float = 0.0) -> SAEOutput:
    """autoencoder.reconstruction_loss for the activations ``values`` of latents ``idx``."""
    x_hat = sparse_decode(sae.W_dec, idx, values) + sae.b_dec
    return scored(x, x_hat, SparseFeatures(idx, values, sae.d_sae), values, l1_coeff)


def topk_indices(k: int):
    return lambda pre: pre.topk(min(k, pre.shape[-1]), dim=-1).indices


def dense_features(idx: torch.Tensor, values: torch.Tensor, d_sae: int) -> torch.Tensor:
    """The [B, d_sae] activations the sparse form stands for (for bookkeeping and tests, not the step)."""
    return torch.zeros(idx.shape[0], d_sae, dtype=values.dtype, device=values.device).scatter(1, idx, values)


def sparse_auxk_loss(sae: SAE, pre: torch.Tensor, centred: torch.Tensor, residual: torch.Tensor,
                     dead: torch.Tensor, aux_k: int) -> torch.Tensor:
    """objectives.auxk_loss over the aux_k selected dead latents only: their best reconstruction of ``residual``
    (detached) as a fraction of its total variance; 0 when no latent is dead. With fewer dead latents than aux_k
    only those are selected (the dense form's other candidates are -inf, zeroed). The count of dead latents is read
    back once per step: the selection is no wider than it, and most steps of a healthy run have none."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return torch.zeros((), device=pre.device)
    with torch.no_grad():
        top = pre.relu().masked_fill(~dead, -torch.inf).topk(min(aux_k, n_dead), dim=-1)
    values = SelectedPreActivations.apply(pre, centred, sae.W_enc, sae.b_enc, top.indices).relu()
    error = (sparse_decode(sae.W_dec, top.indices, values).float() - residual).pow(2).sum(-1).mean()
    variance = (residual - residual.mean(0)).pow(2).sum(-1).mean()  # a constant: the residual is detached
    return error * torch.where(variance > 0, 1 / variance, 0.0) * dead.any()


def padded_selection(chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(idx [B, m], mask [B, m]) for a [B, d_sae] boolean choice whose rows hold different counts (BatchTopK,
    JumpReLU): each row's chosen latents, padded to the largest row's count m with unchosen ones masked out."""
    width = max(int(chosen.sum(-1).max()), 1)
    idx = chosen.to(torch.int8).topk(width, dim=-1, sorted=False).indices
    return idx, chosen.gather(1, idx)


def batch_topk_selection(k: int):
    """The latents BatchTopK keeps (objectives.batch_topk: the batch's k * B largest ReLU'd pre-activations)."""
    def select(pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = pre.relu().flatten()
        kept = torch.zeros(flat.numel(), dtype=torch.bool, device=pre.device)
        kept[flat.topk(min(k * pre.shape[0], flat.numel())).indices] = True
        return padded_selection(kept.view_as(pre))
    return select


class SelectedJumpReLU(torch.autograd.Function):
    """objectives.JumpReLUFunction and StepFunction on selected entries, with the threshold gathered per entry
    ([B, m]): returns (pre * H(pre - t), H(pre - t)); the thresholds' straight-through gradients are scattered back to
    their latents. Exact when the selection holds every latent above its threshold or within bandwidth / 2 of it
    (elsewhere both gradients are zero)."""

    @staticmethod
    def forward(ctx, values, threshold, idx, mask, bandwidth: float):
        ctx.save_for_backward(values, threshold, idx, mask)
        ctx.bandwidth, ctx.d_sae = bandwidth, threshold.shape[0]
        t = threshold[idx]
        above = (values > t) & mask
        return values * above, above.to(values.dtype)

    @staticmethod
    def backward(ctx, grad_f, grad_step):
        values, threshold, idx, mask = ctx.saved_tensors
        t, bw = threshold[idx], ctx.bandwidth
        above = (values > t) & mask
        kernel = ((values - t) / bw > -0.5) & ((values - t) / bw < 0.5) & mask
        per_entry = kernel * (-(t / bw) * grad_f - (1.0 / bw) * grad_step)
        grad_threshold = torch.zeros_like(threshold).index_add_(0, idx.reshape(-1), per_entry.reshape(-1))
        return above * grad_f, grad_threshold, None, None, None


def jumprelu_selection(threshold: torch.Tensor, bandwidth: float):
    """Every latent above its threshold or within bandwidth / 2 of it (where the straight-through kernel is nonzero)."""
    def select(pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return padded_selection((pre > threshold) | ((pre - threshold).abs() < bandwidth / 2))
    return select
