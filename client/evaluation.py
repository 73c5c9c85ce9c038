"""Evaluation of a model on one dataset: plain PyTorch + scikit-learn, no Flower inside.

torch and scikit-learn are imported by the functions that use them, as in client/training.py:
client/app.py imports this module in processes that never evaluate.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.utils.data import Dataset

METRIC_NAMES = ("loss", "accuracy", "balanced_accuracy", "auroc", "auprc", "macro_f1",
                "collapsed")


def predict(
    model: nn.Module, dataset: Dataset, batch_size: int = 256, device: str = "cpu",
    generator: torch.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities and true labels for every example of ``dataset``.

    ``generator``: what the DataLoader draws its one base seed from (None: torch's global RNG,
    as every DataLoader does even unshuffled). The server's pooled evaluation passes its own:
    it runs beside round 1's training (server/rounds.py), which may be in the same process
    (tests, in-process sites) and seeds its dropout masks from the global RNG."""
    import torch
    from torch.utils.data import DataLoader

    model.eval()
    probs, labels = [], []
    with torch.no_grad():
        for *inputs, y in DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                     generator=generator):
            logits = model(*(t.to(device) for t in inputs))
            probs.append(torch.softmax(logits.float(), dim=1).cpu())
            labels.append(y)
    if not probs:
        return np.zeros((0, 0)), np.zeros((0,), dtype=np.int64)
    return torch.cat(probs).numpy(), torch.cat(labels).numpy()


def classification_metrics(
    labels: np.ndarray, probs: np.ndarray, num_classes: int
) -> dict[str, float]:
    """Loss, accuracy, balanced accuracy, AUROC (macro one-vs-rest), AUPRC, macro-F1.

    A metric that is undefined on this data (AUROC when only one class is present) is NaN,
    never a made-up number. Averages over classes (balanced accuracy, macro AUROC/AUPRC,
    macro-F1) run over the classes present in ``labels``: a class absent from a site's test
    split has no recall and no F1 (never a zero filled in); predicting it counts as an error
    against the true classes. Binary tasks also get ``positive_rate`` (prevalence of class 1).
    ``collapsed`` is 1.0 when the model predicts one and the same class for every example
    although at least two classes are present (a constant predictor), else 0.0.
    """
    from sklearn import metrics as skm

    nan = float("nan")
    if len(labels) == 0:
        return {name: nan for name in METRIC_NAMES}
    preds = probs.argmax(axis=1)
    eps = 1e-12
    present = np.unique(labels)
    out = {
        "loss": float(-np.mean(np.log(probs[np.arange(len(labels)), labels] + eps))),
        "accuracy": float(skm.accuracy_score(labels, preds)),
        # zero_division=0 only where a present class is never predicted: its recall is 0,
        # so its F1 is 0 either way
        "macro_f1": float(skm.f1_score(labels, preds, labels=present, average="macro",
                                       zero_division=0)),
        "collapsed": float(len(present) >= 2 and len(np.unique(preds)) == 1),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns on classes absent from y_pred
        out["balanced_accuracy"] = float(skm.balanced_accuracy_score(labels, preds))
    if len(present) < 2:
        out["auroc"] = out["auprc"] = nan
    elif num_classes == 2:
        out["auroc"] = float(skm.roc_auc_score(labels, probs[:, 1]))
        out["auprc"] = float(skm.average_precision_score(labels, probs[:, 1]))
    else:
        onehot = np.eye(num_classes)[labels][:, present]
        scores = probs[:, present]
        out["auroc"] = float(skm.roc_auc_score(onehot, scores, average="macro"))
        out["auprc"] = float(skm.average_precision_score(onehot, scores, average="macro"))
    if num_classes == 2:
        out["positive_rate"] = float(np.mean(labels == 1))
    return out


def evaluate(
    model: nn.Module, dataset: Dataset, num_classes: int, device: str = "cpu",
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    probs, labels = predict(model, dataset, device=device, generator=generator)
    return classification_metrics(labels, probs, num_classes)
