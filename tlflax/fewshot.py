"""Few-shot evaluation of a backbone's pooled features, with closed-form ridge probes.

k-shot: k training examples per class are drawn (per seed), a linear classifier is fitted
to them in closed form, and its top-1 on the eval split is the score; repeated over seeds,
reported as mean +- std. The classifier is ridge regression on one-hot targets (as in
big_vision's few-shot evaluator), with an unpenalised intercept; its L2 regulariser is
chosen on the training examples alone, by exact leave-one-out error (PRESS, from one SVD
for every candidate), never on the eval split. At 1 shot each left-out example's class is
absent from its fold, so the choice goes to the strongest shrinkage of the grid, which
makes the probe a centred nearest-prototype classifier.

    tlflax eval --workdir DIR --fewshot 1,5,10,25 [--fewshot_seeds 5] [--split test] [--ema]

and, with train.fewshot_shots, at every evaluation of a training phase (fewshot/Kshot in
metrics.jsonl and TensorBoard), to watch what fine-tuning does to the representation.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np

log = logging.getLogger("tlflax")

# Candidate regularisers, as multiples of the mean squared singular value of the centred
# features (so the grid follows the features' scale).
LAMBDAS = tuple(float(x) for x in 10.0 ** np.arange(-6.0, 3.01, 0.5))


@dataclasses.dataclass(frozen=True)
class Ridge:
    """A fitted linear classifier: logits = x @ kernel + bias."""

    kernel: np.ndarray  # (D, C) float64
    bias: np.ndarray  # (C,)
    lam: float  # the chosen regulariser, relative to the mean squared singular value
    press: float  # its leave-one-out squared error
    loo: np.ndarray  # (n, C): each training example's outputs from the fit without it

    def predict(self, x) -> np.ndarray:
        return np.argmax(np.asarray(x, np.float64) @ self.kernel + self.bias, axis=-1)


def fit_ridge(x, labels, num_classes: int, *, lambdas: Sequence[float] = LAMBDAS) -> Ridge:
    """Ridge regression of one-hot targets on `x` (n, D), the regulariser picked by exact
    leave-one-out error over `lambdas`: with the centred features' thin SVD U S V^T, the
    hat matrix is 11^T / n + U diag(s^2 / (s^2 + lam)) U^T for every lam."""
    x = np.asarray(x, np.float64)
    labels = np.asarray(labels)
    if x.ndim != 2 or len(x) != len(labels) or len(x) < 2:
        raise ValueError(f"fit_ridge: need (n >= 2, D) features and n labels, got {x.shape}")
    y = np.eye(num_classes)[labels]
    mx, my = x.mean(0), y.mean(0)
    u, s, vt = np.linalg.svd(x - mx, full_matrices=False)
    s2 = s**2
    scale = float(s2.mean()) or 1.0
    uty = u.T @ (y - my)
    best = None
    for rel in lambdas:
        shrink = s2 / (s2 + rel * scale)
        fitted = my + u @ (shrink[:, None] * uty)
        leverage = 1.0 / len(x) + (u**2) @ shrink
        residual = (y - fitted) / np.maximum(1.0 - leverage, 1e-12)[:, None]
        press = float(np.sum(residual**2))
        if best is None or press < best[1]:
            best = (rel, press, y - residual)
    rel, press, loo = best
    kernel = vt.T @ ((s / (s2 + rel * scale))[:, None] * uty)
    return Ridge(kernel, my - mx @ kernel, rel, press, loo)


TEMPERATURES = tuple(float(t) for t in np.geomspace(1.0, 1000.0, 61))


def linear_head(x, labels, num_classes: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """(kernel (D, C), bias (C,), info) of a closed-form linear head on features `x`: the
    ridge fit, its logits scaled by the temperature of least leave-one-out cross-entropy
    (ridge outputs regress one-hot targets, so their raw scale is far too flat for softmax;
    the training fit itself is often perfect, so its own loss would pick no finite scale)."""
    labels = np.asarray(labels)
    ridge = fit_ridge(x, labels, num_classes)
    rows = np.arange(len(labels))
    best = None
    for t in TEMPERATURES:
        z = t * ridge.loo
        z = z - z.max(-1, keepdims=True)
        xent = float(np.mean(np.log(np.exp(z).sum(-1)) - z[rows, labels]))
        if best is None or xent < best[1]:
            best = (t, xent)
    t, xent = best
    logits = np.asarray(x, np.float64) @ ridge.kernel + ridge.bias
    info = {
        "lambda": ridge.lam,
        "temperature": t,
        "loo_xent": xent,
        "loo_top1": float(np.mean(np.argmax(ridge.loo, -1) == labels)),
        "train_top1": float(np.mean(np.argmax(logits, -1) == labels)),
        "n": int(len(labels)),
    }
    return t * ridge.kernel, t * ridge.bias, info


@dataclasses.dataclass(frozen=True)
class ShotResult:
    shots: int
    top1: tuple[float, ...]  # one per seed (empty when the shots could not be drawn)
    lambdas: tuple[float, ...]  # the regulariser each seed's fit chose
    note: str = ""  # why there is no result, or what was left out

    @property
    def mean(self) -> float:
        return float(np.mean(self.top1)) if self.top1 else float("nan")

    @property
    def std(self) -> float:
        return float(np.std(self.top1, ddof=1)) if len(self.top1) > 1 else 0.0

    def row(self) -> dict:
        if not self.top1:
            return {"shots": self.shots, "top1": "-", "seeds": 0, "note": self.note}
        return {
            "shots": self.shots,
            "top1": f"{100 * self.mean:.2f} +- {100 * self.std:.2f} %",
            "min": f"{100 * min(self.top1):.2f} %",
            "max": f"{100 * max(self.top1):.2f} %",
            "seeds": len(self.top1),
            "lambda": f"{np.median(self.lambdas):.3g}",
            "note": self.note,
        }

    def to_json(self) -> dict:
        return {
            "shots": self.shots,
            "top1_mean": self.mean if self.top1 else None,
            "top1_std": self.std if self.top1 else None,
            "top1": list(self.top1),
            "lambda": list(self.lambdas),
            "note": self.note,
        }


COLUMNS = ("shots", "top1", "min", "max", "seeds", "lambda", "note")


def draw(labels, shots: int, *, seed: int, classes: Sequence[int]) -> np.ndarray:
    """Indices of `shots` examples of each class in `classes`, drawn without replacement."""
    rng = np.random.default_rng([seed, shots])
    labels = np.asarray(labels)
    picks = [rng.choice(np.flatnonzero(labels == c), shots, replace=False) for c in classes]
    return np.sort(np.concatenate(picks))


def evaluate(
    train_x, train_y, eval_x, eval_y, *, shots: Sequence[int], seeds: int, num_classes: int
) -> list[ShotResult]:
    """k-shot top-1 on the eval features for each k in `shots`, over seeds 0..seeds-1.
    Classes with no training example are left out of the draws (and named); a k larger
    than a present class's count gives no result, with the reason."""
    train_y, eval_y = np.asarray(train_y), np.asarray(eval_y)
    counts = np.bincount(train_y, minlength=num_classes)
    present = [c for c in range(num_classes) if counts[c]]
    missing = [c for c in range(num_classes) if not counts[c]]
    results = []
    for k in shots:
        note = f"classes without training examples left out: {missing}" if missing else ""
        short = [c for c in present if counts[c] < k]
        if k < 1 or short or len(present) < 2:
            why = (
                f"class {short[0]} has {counts[short[0]]} training examples"
                if short
                else "fewer than 2 classes"
                if len(present) < 2
                else "shots must be >= 1"
            )
            results.append(ShotResult(int(k), (), (), why))
            continue
        top1, lams = [], []
        for seed in range(seeds):
            idx = draw(train_y, int(k), seed=seed, classes=present)
            ridge = fit_ridge(np.asarray(train_x)[idx], train_y[idx], num_classes)
            top1.append(float(np.mean(ridge.predict(eval_x) == eval_y)))
            lams.append(ridge.lam)
        results.append(ShotResult(int(k), tuple(top1), tuple(lams), note))
    return results


def scalars(results: Sequence[ShotResult], prefix: str = "fewshot/") -> dict[str, float]:
    out = {}
    for r in results:
        if r.top1:
            out[f"{prefix}{r.shots}shot"] = r.mean
            out[f"{prefix}{r.shots}shot_std"] = r.std
    return out


def parse_shots(text: str) -> tuple[int, ...]:
    """'1,5,10' -> (1, 5, 10); a ValueError naming what is wrong."""
    try:
        shots = tuple(int(part) for part in str(text).split(",") if part.strip())
    except ValueError:
        raise ValueError(f"give comma-separated integers, e.g. 1,5,10 (got {text!r})") from None
    if not shots or min(shots) < 1:
        raise ValueError(f"give shots as comma-separated integers >= 1 (got {text!r})")
    return shots
