"""Membership inference against a trained model: was this patient record in the training data?

Two attacks, both scoring "member" high:

- Loss threshold (Yeom et al., CSF 2018): score = −loss(model, x, y). Needs only the model.
- Calibrated, offline LiRA (Carlini et al., S&P 2022, §IV-C "offline"): a few shadow models
  trained on other records of the same distribution, never on the targets, give each target's
  "non-member" statistic; score = (φ_target − μ_out) / σ_out with φ = log(p_y / (1 − p_y)) the
  logit-scaled confidence. It corrects for records that are simply easy or hard, which is what
  makes low-FPR membership claims meaningful.

Metrics (scikit-learn ``roc_curve``/``roc_auc_score``): AUC and TPR at FPR 0.1 % and 1 % —
the low-FPR operating points are the ones that matter for individual patients (Carlini et al. §III).
TPR at a given FPR is the best TPR among thresholds whose FPR does not exceed it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve
from torch import nn
from torch.nn import functional as F

LOW_FPRS = (0.001, 0.01)
_VARIANCE_FLOOR = 1e-6  # a shadow statistic that never varies must not divide by zero


@torch.no_grad()
def _predict_logits(model: nn.Module, inputs: torch.Tensor, batch_size: int) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        chunks = [model(inputs[i:i + batch_size].to(device)).float().cpu()
                  for i in range(0, len(inputs), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(chunks) if chunks else torch.empty(0)


def _check_records(inputs: torch.Tensor, labels: torch.Tensor) -> None:
    if len(inputs) != len(labels) or len(inputs) == 0:
        raise ValueError(f"need the same non-zero number of inputs and labels, got "
                         f"{len(inputs)} and {len(labels)}")


def per_example_loss(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, *,
                     batch_size: int = 256) -> np.ndarray:
    """Cross-entropy of each record under ``model`` (eval mode, no gradients)."""
    _check_records(inputs, labels)
    logits = _predict_logits(model, inputs, batch_size)
    return F.cross_entropy(logits, labels.long().cpu(), reduction="none").double().numpy()


def logit_confidence(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, *,
                     batch_size: int = 256) -> np.ndarray:
    """φ = log p_y − log(1 − p_y) for each record, computed stably from the logits (LiRA §IV-A)."""
    _check_records(inputs, labels)
    logits = _predict_logits(model, inputs, batch_size).double()
    labels = labels.long().cpu()
    true_logit = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return (true_logit - torch.logsumexp(others, dim=1)).numpy()


def loss_attack_scores(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, *,
                       batch_size: int = 256) -> np.ndarray:
    """Loss-threshold attack: −loss per record (higher = more likely a member)."""
    return -per_example_loss(model, inputs, labels, batch_size=batch_size)


def calibrated_attack_scores(model: nn.Module, shadow_models: Sequence[nn.Module],
                             inputs: torch.Tensor, labels: torch.Tensor, *,
                             batch_size: int = 256) -> np.ndarray:
    """Offline LiRA: (φ_target − μ_out) / σ_out per record, with μ_out, σ_out over shadow models
    that did NOT train on these records (higher = more likely a member)."""
    if len(shadow_models) < 2:
        raise ValueError(f"the calibrated attack needs >= 2 shadow models to estimate a spread, "
                         f"got {len(shadow_models)}")
    target = logit_confidence(model, inputs, labels, batch_size=batch_size)
    shadow = np.stack([logit_confidence(s, inputs, labels, batch_size=batch_size)
                       for s in shadow_models])
    # one global variance, as LiRA recommends with few shadow models (per-example variance
    # from 2–8 models is too noisy)
    spread = np.sqrt(max(float(shadow.var(axis=0, ddof=1).mean()), _VARIANCE_FLOOR))
    return (target - shadow.mean(axis=0)) / spread


@dataclass(frozen=True)
class MembershipResult:
    """How well an attack separates members from non-members."""

    attack: str
    members: int
    non_members: int
    auc: float
    tpr_at_fpr: dict[str, float]  # "0.001" → TPR, "0.01" → TPR
    fpr: list[float]  # the ROC curve, for plots
    tpr: list[float]

    def summary(self) -> dict:
        """Everything but the curve (for tables)."""
        out = asdict(self)
        out.pop("fpr")
        out.pop("tpr")
        return out


def membership_metrics(member_scores: Sequence[float] | np.ndarray,
                       non_member_scores: Sequence[float] | np.ndarray, *,
                       attack: str = "loss", fprs: Sequence[float] = LOW_FPRS) -> MembershipResult:
    """AUC and TPR at low FPRs of an attack that scores members high."""
    members = np.asarray(member_scores, dtype=np.float64)
    non_members = np.asarray(non_member_scores, dtype=np.float64)
    if len(members) == 0 or len(non_members) == 0:
        raise ValueError(f"need members and non-members, got {len(members)} and "
                         f"{len(non_members)}")
    scores = np.concatenate([members, non_members])
    if not np.isfinite(scores).all():
        raise ValueError("attack scores must be finite")
    truth = np.concatenate([np.ones(len(members)), np.zeros(len(non_members))])
    fpr, tpr, _ = roc_curve(truth, scores)
    at = {}
    for target in fprs:
        if not 0 < target < 1:
            raise ValueError(f"FPR operating points must be in (0, 1), got {target}")
        at[str(target)] = float(tpr[fpr <= target].max())
    return MembershipResult(attack=attack, members=len(members), non_members=len(non_members),
                            auc=float(roc_auc_score(truth, scores)), tpr_at_fpr=at,
                            fpr=fpr.tolist(), tpr=tpr.tolist())
