"""ArmoRM's fitting arithmetic: ridge-regression probes per attribute (stage 1) and the verbosity-penalty search
that builds the reward transform matrix (stage 2). The numbers that define the method (alpha grid, penalty grid,
correlation threshold) are upstream's and live here once.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy.linalg import LinAlgWarning
from scipy.stats import spearmanr
from sklearn.linear_model import Ridge
from sklearn.metrics import mean_squared_error
from sklearn.model_selection import train_test_split

from useful_code.armo_data import VERBOSITY_INDEX
from useful_code.cli import UserError

RIDGE_ALPHAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4)
PENALTY_GRID = (0, 0.01, 0.025, 0.05, 0.075, 0.1, 0.125, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6,
                0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
CORRELATION_THRESHOLD = 0.03


def split_rows(rows: np.ndarray, val_fraction: float, seed: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, validation rows): a seeded split of rows (sklearn's, as upstream). A split that would leave
    either side empty (a fraction of 0 or 1, or too few rows) is a UserError naming --val_fraction and what is split,
    where sklearn would raise a traceback."""
    n_val = math.ceil(val_fraction * len(rows))  # sklearn's rounding of a float test_size
    if not 0 < val_fraction < 1 or n_val == 0 or n_val >= len(rows):
        raise UserError(f"--val_fraction {val_fraction} splits {len(rows)} {what} into {len(rows) - n_val} train and "
                        f"{n_val} validation rows; both need at least one (the fraction must lie strictly between 0 "
                        f"and 1)")
    return train_test_split(rows, test_size=val_fraction, random_state=seed)


def fit_ridge_probes(embeddings: np.ndarray, labels: np.ndarray, alphas=RIDGE_ALPHAS, val_fraction: float = 0.2,
                     seed: int = 42) -> dict:
    """Per attribute: ridge regression without intercept on the rows where that label is present, each alpha
    fit on the train split and scored by validation MSE; the best alpha's weights are kept (fit on the train
    split, as upstream). Returns {'weight': [K, D], 'alpha', 'val_mse', 'n_train', 'n_val'} (lists per attribute);
    an attribute with no labels gets zero weights and alpha None (with no validation labels, val_mse is NaN and the
    first alpha is kept)."""
    train_rows, val_rows = split_rows(np.arange(len(embeddings)), val_fraction, seed, "embedding rows")
    n_attr = labels.shape[1]
    result = {"weight": np.zeros((n_attr, embeddings.shape[1]), dtype=np.float32),
              "alpha": [None] * n_attr, "val_mse": [None] * n_attr, "n_train": [0] * n_attr, "n_val": [0] * n_attr}
    for k in range(n_attr):
        tr = train_rows[~np.isnan(labels[train_rows, k])]
        va = val_rows[~np.isnan(labels[val_rows, k])]
        result["n_train"][k], result["n_val"][k] = len(tr), len(va)
        if len(tr) == 0:
            continue
        best = None
        for alpha in alphas:
            with warnings.catch_warnings():
                # The grid's smallest alphas are near-singular on low-rank embeddings; validation MSE decides.
                warnings.simplefilter("ignore", LinAlgWarning)
                model = Ridge(alpha=alpha, fit_intercept=False).fit(embeddings[tr], labels[tr, k])
            mse = mean_squared_error(labels[va, k], model.predict(embeddings[va])) if len(va) else float("nan")
            if best is None or mse < best[1]:
                best = (alpha, mse, model.coef_)
        result["alpha"][k], result["val_mse"][k] = best[0], float(best[1])
        result["weight"][k] = best[2]
    return result


def verbosity_penalties(rewards: np.ndarray, verbosity_index: int = VERBOSITY_INDEX, grid=PENALTY_GRID,
                        threshold: float = CORRELATION_THRESHOLD) -> dict:
    """Upstream's verbosity debiasing: for each attribute k, the smallest penalty p in the grid for which the
    Spearman correlation between r_k - p * r_verbosity and r_verbosity is at most the threshold. An attribute
    that never gets there keeps penalty 1.0 (upstream's rule) and is listed; the verbosity attribute itself gets
    1.0, which removes it. rewards: [n, K]. Returns {'penalty', 'corr', 'not_reached'}."""

    n_attr = rewards.shape[1]
    verbosity = rewards[:, verbosity_index]
    penalty, corr = np.ones(n_attr), np.ones(n_attr)
    remaining = [k for k in range(n_attr) if k != verbosity_index]
    for p in sorted(grid):
        for k in list(remaining):
            rho = spearmanr(rewards[:, k] - p * verbosity, verbosity).statistic
            if rho <= threshold:
                penalty[k], corr[k] = p, rho
                remaining.remove(k)
            else:
                corr[k] = min(corr[k], rho)
        if not remaining:
            break
    return {"penalty": penalty, "corr": corr, "not_reached": remaining}


def transform_matrix(penalty: np.ndarray, verbosity_index: int = VERBOSITY_INDEX) -> np.ndarray:
    """T with (r @ T)_k = r_k - penalty_k * r_verbosity: the identity with the penalties subtracted from the
    verbosity row."""
    matrix = np.eye(len(penalty))
    matrix[verbosity_index] -= penalty
    return matrix
