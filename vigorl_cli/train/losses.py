"""GRPO objective: group advantages, dual-clip PPO (GRPO / GSPO ratios), KL estimators, loss aggregation.

What we use by default, and how it relates to the papers (reference §5.8 is the EasyR1 fork ViGoRL trained with):

* **Advantages** ``A_i = (r_i − mean_g) / (std_g + 1e-6)`` per prompt group, ``std`` unbiased (N−1) as
  ``torch.std`` — the code's choice; the ViGoRL paper writes ``r − mean`` (Dr. GRPO, ``grpo.adv_norm: none``).
  A sequence advantage is broadcast to every response token.
* **Policy loss** (``grpo.objective: grpo``): PPO with separate clip bounds ``[1 − clip_low, 1 + clip_high]``
  (clip-higher, DAPO) and the dual clip for negative advantages (loss never above ``−A · clip_dual``)::

      ratio = exp(logp − old_logp)
      L = max(−A·ratio, −A·clip(ratio, 1−ε_low, 1+ε_high));   if A < 0: L = min(L, −A·c_dual)

  The clipped ratio is computed in log space, ``exp(clamp(logp − old_logp, log(1−ε_low), log(1+ε_high)))``, which
  equals clamping the ratio and avoids overflow.
* **GSPO** (``objective: gspo``): the ratio is the geometric mean over the sequence,
  ``s_i = exp(mean_t(logp − old_logp))``, applied to every token with a straight-through per-token gradient
  (``s_i · exp(logp − sg(logp))``), clipped as above (GSPO uses much smaller ε in practice: set them).
* **KL to the frozen reference** (``kl_estimator``): with ``k = ref_logp − logp``:
  ``k1 = −k`` (= logp − ref_logp), ``k2 = ½ k²``, ``k3 = exp(k) − k − 1`` (low-variance, always ≥ 0); each clamped to
  ``[−10, 10]`` as the reference does. Added to the loss as ``kl_coef · agg(kl)`` (``kl_in: loss``) or subtracted
  from the token rewards (``kl_in: reward``, see :func:`kl_penalised_rewards`).
* **Aggregation** (``loss_agg``): ``token_mean`` — masked mean over all tokens of the micro-batch (reference; long
  answers weigh more); ``seq_mean_token_mean`` — mean per sequence, then over sequences (original GRPO);
  ``seq_mean_token_sum`` — sum per sequence, mean over sequences (Dr. GRPO with a fixed normaliser).
* **Truncated importance sampling** (``tis_cap``): when the rollout engine's log-probs differ from the trainer's
  (vLLM vs HF numerics), the per-token loss is weighted by ``min(exp(old_logp − engine_logp), cap)``.
* **DAPO filtering** (``filter_equal_groups``): groups whose rewards are all equal carry no signal under group
  normalisation; :func:`informative_groups` finds the others.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

KL_CLAMP = 10.0


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, norm: str = "std",
                     eps: float = 1e-6) -> torch.Tensor:
    """Per-sequence advantages: reward minus its group mean, divided by the group std (``norm="std"``).

    ``rewards``: ``[N]``; ``group_ids``: ``[N]`` ints (one id per prompt). Returns ``[N]``. A group of one gets 0.
    """
    adv = torch.zeros_like(rewards, dtype=torch.float32)
    for g in torch.unique(group_ids):
        idx = group_ids == g
        r = rewards[idx].float()  # [G]
        if r.numel() < 2:
            continue
        centred = r - r.mean()
        adv[idx] = centred / (r.std(unbiased=True) + eps) if norm == "std" else centred
    return adv


def informative_groups(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Boolean ``[N]``: True for sequences whose group's rewards are not all equal (DAPO dynamic sampling)."""
    keep = torch.zeros_like(rewards, dtype=torch.bool)
    for g in torch.unique(group_ids):
        idx = group_ids == g
        r = rewards[idx]
        keep[idx] = bool((r.max() - r.min()).abs() > 0)
    return keep


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token KL(π‖π_ref) estimate from sampled tokens; clamped to ±10. Shapes ``[B, T]``."""
    k = ref_logp - logp  # [B, T]
    if kind == "k1":
        kl = -k
    elif kind == "k2":
        kl = 0.5 * k.square()
    elif kind == "k3":
        kl = torch.exp(k) - k - 1.0
    else:
        raise ValueError(f"unknown KL estimator {kind!r}; use k1, k2 or k3")
    return kl.clamp(-KL_CLAMP, KL_CLAMP)


def aggregate(values: torch.Tensor, mask: torch.Tensor, mode: str = "token_mean") -> torch.Tensor:
    """Reduce per-token ``values`` ``[B, T]`` under ``mask`` ``[B, T]`` to a scalar."""
    mask = mask.to(values.dtype)
    if mode == "token_mean":
        return (values * mask).sum() / mask.sum().clamp(min=1.0)
    per_seq_tokens = mask.sum(dim=-1)  # [B]
    seq_sum = (values * mask).sum(dim=-1)  # [B]
    has = per_seq_tokens > 0
    if not bool(has.any()):
        return values.sum() * 0.0
    if mode == "seq_mean_token_mean":
        return (seq_sum[has] / per_seq_tokens[has]).mean()
    if mode == "seq_mean_token_sum":
        return seq_sum[has].mean()
    raise ValueError(f"unknown loss aggregation {mode!r}")


@dataclass
class PolicyLossOutput:
    loss: torch.Tensor  # scalar, to backpropagate
    pg_loss: torch.Tensor  # scalar (detached)
    kl: torch.Tensor  # scalar (detached), aggregated KL estimate (0 when no reference)
    clip_frac: float  # fraction of tokens where the clipped branch was taken
    clip_frac_low: float
    clip_frac_high: float
    dual_clip_frac: float
    ratio_mean: float


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                clip_low: float = 0.2, clip_high: float = 0.28, clip_dual: float = 3.0, objective: str = "grpo",
                loss_agg: str = "token_mean", ref_logp: torch.Tensor | None = None, kl_coef: float = 0.0,
                kl_estimator: str = "k3", engine_logp: torch.Tensor | None = None,
                tis_cap: float | None = None) -> PolicyLossOutput:
    """The GRPO/GSPO loss for one micro-batch.

    ``logp``, ``old_logp``, ``ref_logp``, ``engine_logp``, ``mask``: ``[B, T]`` over response positions;
    ``advantages``: ``[B]`` (one per sequence) or ``[B, T]``.
    """
    mask_f = mask.to(logp.dtype)  # [B, T]
    adv = advantages[:, None].expand_as(logp) if advantages.dim() == 1 else advantages  # [B, T]
    log_ratio = logp - old_logp  # [B, T]
    if objective == "gspo":
        n_tok = mask_f.sum(-1).clamp(min=1.0)  # [B]
        seq_log_ratio = (log_ratio * mask_f).sum(-1) / n_tok  # [B]
        # sequence ratio with a per-token straight-through gradient (GSPO-token)
        log_ratio = seq_log_ratio.detach()[:, None] + logp - logp.detach()  # [B, T]
    ratio = torch.exp(log_ratio)  # [B, T]
    clipped = torch.exp(log_ratio.clamp(math.log(1.0 - clip_low), math.log(1.0 + clip_high)))  # [B, T]
    l_unclipped = -adv * ratio
    l_clipped = -adv * clipped
    l_ppo = torch.maximum(l_unclipped, l_clipped)  # [B, T]
    l_dual = torch.minimum(l_ppo, -adv * clip_dual)
    per_token = torch.where(adv < 0, l_dual, l_ppo)  # [B, T]
    if tis_cap is not None and engine_logp is not None:
        weight = torch.exp(old_logp - engine_logp).clamp(max=tis_cap).detach()  # [B, T]
        per_token = per_token * weight
    pg = aggregate(per_token, mask, loss_agg)
    loss = pg
    kl_val = torch.zeros((), dtype=logp.dtype, device=logp.device)
    if ref_logp is not None and kl_coef != 0.0:
        kl_val = aggregate(kl_estimate(logp, ref_logp, kl_estimator), mask, loss_agg)
        loss = loss + kl_coef * kl_val
    with torch.no_grad():
        m = mask.bool()
        n = max(int(m.sum()), 1)
        took_clip = (l_clipped > l_unclipped) & m
        low = took_clip & (ratio < 1.0 - clip_low)
        high = took_clip & (ratio > 1.0 + clip_high)
        dual = (adv < 0) & (l_ppo > -adv * clip_dual) & m
        stats = (float(took_clip.sum()) / n, float(low.sum()) / n, float(high.sum()) / n, float(dual.sum()) / n,
                 float((ratio * mask_f).sum()) / n)
    return PolicyLossOutput(loss, pg.detach(), kl_val.detach(), *stats)


def kl_penalised_rewards(token_rewards: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                         kl_coef: float, kind: str = "k1") -> torch.Tensor:
    """``kl_in: reward``: subtract ``kl_coef · kl_t`` from every response token's reward. ``[B, T]``."""
    return token_rewards - kl_coef * kl_estimate(logp, ref_logp, kind) * mask.to(token_rewards.dtype)


def masked_entropy_from_logp(logp: torch.Tensor, mask: torch.Tensor) -> float:
    """Monte-Carlo entropy estimate ``−mean(logp)`` of the sampled tokens (logged, as EasyR1 does)."""
    m = mask.to(logp.dtype)
    return float(-(logp * m).sum() / m.sum().clamp(min=1.0))
