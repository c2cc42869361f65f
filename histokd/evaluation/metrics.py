"""Classification metrics reported by every run: accuracy, balanced accuracy,
macro-F1, one-vs-rest AUC and the confusion matrix (More From Less §2.3 reports
accuracy; the others are what a pathology user also needs)."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn import metrics as skm


def classification_metrics(y_true, probs, class_names=None) -> dict:
    """Metrics of predicted class probabilities against integer labels.

    Args:
        y_true: array [N] of int. True labels.
        probs: array [N, K]. Predicted class probabilities.
        class_names: list of str. Names of the K classes.

    Returns:
        dict with ``accuracy``, ``balanced_accuracy``, ``macro_f1``, ``auc_ovr`` (None when
        fewer than two classes occur in ``y_true``), ``confusion_matrix`` (K×K list,
        rows = truth), ``num_examples`` and ``class_names``.

    Example:
        >>> classification_metrics([0, 1], [[0.9, 0.1], [0.2, 0.8]])["accuracy"]
        1.0
    """
    y_true = np.asarray(y_true).astype(int).ravel()
    probs = np.asarray(probs, dtype="float64")
    k = probs.shape[1]
    labels = np.arange(k)
    pred = probs.argmax(1)
    present = np.unique(y_true)
    out = {
        "num_examples": int(len(y_true)),
        "accuracy": float(skm.accuracy_score(y_true, pred)),
        "macro_f1": float(skm.f1_score(y_true, pred, labels=present, average="macro", zero_division=0)),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out["balanced_accuracy"] = float(skm.balanced_accuracy_score(y_true, pred))
    auc = None
    if len(present) >= 2:
        p = probs / np.clip(probs.sum(1, keepdims=True), 1e-12, None)
        try:
            if k == 2:
                auc = float(skm.roc_auc_score(y_true, p[:, 1]))
            else:
                # one-vs-rest over the classes that occur (a class with no positives has no ROC)
                aucs = [skm.roc_auc_score(y_true == c, p[:, c]) for c in present]
                auc = float(np.mean(aucs))
        except ValueError:
            auc = None
    out["auc_ovr"] = auc
    out["confusion_matrix"] = skm.confusion_matrix(y_true, pred, labels=labels).tolist()
    out["class_names"] = list(class_names) if class_names is not None else [str(i) for i in labels]
    return out
