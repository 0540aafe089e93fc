"""The grounding losses (DESIGN.md §1.1): symmetric in-batch InfoNCE ``L_CL`` and the
collaborative distillation ``L_KD``, and their sum."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["grounding_loss", "info_nce_loss", "kd_loss"]

def _cosine_logits(v: torch.Tensor, u: torch.Tensor, tau: float) -> torch.Tensor:
    return F.normalize(v, dim=-1) @ F.normalize(u, dim=-1).T / tau


def _check_tau(tau: float) -> float:
    if not tau > 0:
        raise ValueError(f"tau must be > 0; got {tau}")
    return float(tau)


def info_nce_loss(v: torch.Tensor, u: torch.Tensor, tau: float = 0.05) -> torch.Tensor:
    """Symmetric in-batch InfoNCE (``L_CL``) for positive pairs ``(v[i], u[i])``.

    With ``S[i, j] = cos(v[i], u[j]) / tau`` (B x B)::

        L = 1/2 * mean_i( -log softmax_j S[i, :][i] )  +  1/2 * mean_j( -log softmax_i S[:, j][j] )

    Every other row of the batch is a negative.
    """
    if v.shape != u.shape or v.dim() != 2:
        raise ValueError(f"v and u must both be [B, D]; got {list(v.shape)} and {list(u.shape)}")
    logits = _cosine_logits(v, u, _check_tau(tau))
    target = torch.arange(v.shape[0], device=v.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def kd_loss(v_text: torch.Tensor, v_id: torch.Tensor, tau: float = 0.05, *,
            u_text: torch.Tensor | None = None, u_id: torch.Tensor | None = None) -> torch.Tensor:
    """``L_KD = mean_i KL(P_ID[i] || P_text[i])``, the collaborative teacher's in-batch
    similarity distribution distilled into the text space.

    ``P_text[i, j] = softmax_j cos(v_text[i], u_text[j]) / tau`` and likewise ``P_ID`` from the
    ID embeddings, which are the frozen teacher: no gradient flows into ``v_id`` / ``u_id``.
    The columns default to the rows (``u = v``, the batch against itself); grounding passes the
    positives of the pairs as columns, matching ``L_CL``'s similarity matrix::

        KL(P || Q)[i] = sum_j P[i, j] * (log P[i, j] - log Q[i, j])
    """
    u_text = v_text if u_text is None else u_text
    u_id = v_id if u_id is None else u_id
    if v_text.shape[0] != v_id.shape[0] or u_text.shape[0] != u_id.shape[0]:
        raise ValueError(f"text and ID embeddings must have the same batch size; got "
                         f"{v_text.shape[0]}/{u_text.shape[0]} text rows and "
                         f"{v_id.shape[0]}/{u_id.shape[0]} ID rows")
    tau = _check_tau(tau)
    log_q = F.log_softmax(_cosine_logits(v_text, u_text, tau), dim=-1)
    with torch.no_grad():
        log_p = F.log_softmax(_cosine_logits(v_id.detach(), u_id.detach(), tau), dim=-1)
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)


def grounding_loss(v_text: torch.Tensor, u_text: torch.Tensor, v_id: torch.Tensor | None = None,
                   u_id: torch.Tensor | None = None, *, tau: float = 0.05,
                   lam: float = 1.0) -> torch.Tensor:
    """``L_CL + lam * L_KD`` for a batch of positive pairs: ``v_*`` are the anchors' text / ID
    embeddings, ``u_*`` the positives'. Without ID embeddings (or with ``lam = 0``) it is
    ``L_CL`` alone (the "without KD" ablation)."""
    loss = info_nce_loss(v_text, u_text, tau)
    if lam != 0:
        if v_id is None or u_id is None:
            raise ValueError("grounding_loss with lam != 0 needs v_id and u_id")
        loss = loss + lam * kd_loss(v_text, v_id, tau, u_text=u_text, u_id=u_id)
    return loss
