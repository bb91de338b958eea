"""Evaluation metrics (AUC, logloss, NE) and process figures: one implementation each."""

from __future__ import annotations

import math

import numpy as np


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC by the rank-sum formula, ties given their average rank."""
    labels = np.asarray(labels, dtype=np.float64).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    pos = labels.sum()
    neg = labels.size - pos
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(scores.size, dtype=np.float64)
    # average ranks over runs of equal scores
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [scores.size]])
    avg = (starts + ends + 1) / 2.0  # 1-based average rank of each run
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[labels > 0.5].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def logloss(labels: np.ndarray, logits: np.ndarray) -> float:
    """Mean binary cross-entropy computed stably from logits."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    z = np.asarray(logits, dtype=np.float64).ravel()
    if y.size == 0:
        return float("nan")
    return float(np.mean(np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))))


def normalized_entropy(logloss: float | None, ctr: float | None) -> float:
    """NE as TorchRec reports it: logloss over the entropy of the base click rate
    (1.0 = no better than always predicting the eval set's positive rate)."""
    if logloss is None or ctr is None or not 0.0 < ctr < 1.0:
        return float("nan")
    base = -(ctr * math.log(ctr) + (1.0 - ctr) * math.log(1.0 - ctr))
    return float(logloss) / base


def score_metrics(labels: np.ndarray, logits: np.ndarray) -> dict:
    """What every evaluation reports, in every mode: AUC, logloss, NE, the labels'
    positive rate and how many examples were scored. The figures do not depend on
    the order of the examples (trainers' slices arrive concatenated per trainer):
    the logloss is summed in (score, label) order."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    logits = np.asarray(logits, dtype=np.float64).ravel()
    order = np.lexsort((y, logits))
    y, logits = y[order], logits[order]
    if y.size == 0:
        return {"auc": float("nan"), "logloss": float("nan"), "ne": float("nan"), "ctr": float("nan"),
                "eval_examples": 0}
    ll, ctr = logloss(y, logits), float(np.mean(y))
    return {"auc": auc(y, logits), "logloss": ll, "ne": normalized_entropy(ll, ctr), "ctr": ctr,
            "eval_examples": int(y.size)}


def peak_rss_kb() -> int:
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def as_record_fields(result: dict) -> dict:
    """An evaluation during training, as fields of that iteration's metrics.jsonl record."""
    return {f"eval_{name}": result[name] for name in ("auc", "logloss", "ne", "ctr")}


def as_summary_fields(result: dict) -> dict:
    """The final evaluation, as summary.json fields."""
    return {"auc": result["auc"], "logloss": result["logloss"], "ne": result["ne"],
            "eval_examples": result["eval_examples"], "eval_ctr": result["ctr"]}
