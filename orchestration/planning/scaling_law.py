"""The Chinchilla scaling law, fitted the way Hoffmann et al. (2022, appendix D.2) fit it.

``python -m orchestration.plan fit RUNS.csv`` fits L(N, D) = E + A/N^alpha + B/D^beta to small
runs (:func:`fit_chinchilla`) and says how to spend a bigger FLOP budget.
"""

from __future__ import annotations

import csv
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class ChinchillaFit:
    """L(N, D) = E + A / N^alpha + B / D^beta, with the objective value it reached."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float = 0.0

    def loss(self, n: float, d: float) -> float:
        return self.E + self.A / n**self.alpha + self.B / d**self.beta

    def compute_optimal(self, flops: float) -> tuple[float, float]:
        """(N_opt, D_opt) minimising L subject to 6ND = C (Hoffmann et al. eq. 4).

        N_opt = G (C/6)^(beta/(alpha+beta)), D_opt = G^-1 (C/6)^(alpha/(alpha+beta)),
        G = (alpha A / (beta B))^(1/(alpha+beta)).
        """
        s = self.alpha + self.beta
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / s)
        return g * (flops / 6.0) ** (self.beta / s), (flops / 6.0) ** (self.alpha / s) / g


def _huber_objective(theta: np.ndarray, log_n, log_d, log_l, delta: float):
    """Sum of Huber(LSE(a - alpha log N, b - beta log D, e) - log L), and its gradient.

    Scaled by 1/delta^2 so residuals of order delta give an objective of order 1, which keeps
    L-BFGS's relative stopping rule meaningful (the minimiser is unchanged).
    """
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
    top = terms.max(axis=0)
    weights = np.exp(terms - top)
    total = weights.sum(axis=0)
    r = top + np.log(total) - log_l
    weights /= total
    small = np.abs(r) <= delta
    value = np.where(small, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta)).sum()
    dr = np.clip(r, -delta, delta)
    grad = np.array(
        [
            (dr * weights[0]).sum(),
            (dr * weights[1]).sum(),
            (dr * weights[2]).sum(),
            -(dr * weights[0] * log_n).sum(),
            -(dr * weights[1] * log_d).sum(),
        ]
    )
    return value / delta**2, grad / delta**2


def _grid_objectives(grid: np.ndarray, log_n, log_d, log_l, delta: float) -> np.ndarray:
    """Objective at every grid point at once, to choose where L-BFGS starts."""
    a, b, e, alpha, beta = (grid[:, i : i + 1] for i in range(5))
    terms = np.stack(
        [a - alpha * log_n, b - beta * log_d, np.broadcast_to(e, a.shape) * np.ones_like(log_n)]
    )
    r = np.logaddexp.reduce(terms, axis=0) - log_l
    return np.where(np.abs(r) <= delta, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta)).sum(1)


# Hoffmann et al.'s initialisation grid: e, alpha, beta, a, b.
HOFFMANN_GRID = {
    "a": np.arange(0.0, 30.0, 5.0),
    "b": np.arange(0.0, 30.0, 5.0),
    "e": np.arange(-1.0, 1.5, 0.5),
    "alpha": np.arange(0.0, 2.5, 0.5),
    "beta": np.arange(0.0, 2.5, 0.5),
}


def fit_chinchilla(
    n: Sequence[float],
    d: Sequence[float],
    loss: Sequence[float],
    delta: float = 1e-3,
    starts: int = 32,
    grid: dict[str, np.ndarray] | None = None,
) -> ChinchillaFit:
    """Fit L(N, D) like Hoffmann et al.: Huber loss (delta=1e-3) on log L, L-BFGS from a grid.

    Parameters are fitted as a = log A, b = log B, e = log E so the prediction is a
    log-sum-exp. The full grid (4,500 points by default) is scored in one vectorised pass
    and L-BFGS runs from the ``starts`` best points (running it from all 4,500 takes minutes
    and ends in the same basin); the best end point wins.
    """
    from scipy.optimize import minimize  # optional dependency: only the fit needs it

    log_n, log_d, log_l = (np.log(np.asarray(x, dtype=float)) for x in (n, d, loss))
    g = grid or HOFFMANN_GRID
    points = np.array(list(itertools.product(g["a"], g["b"], g["e"], g["alpha"], g["beta"])))
    order = np.argsort(_grid_objectives(points, log_n, log_d, log_l, delta))[:starts]
    best = None
    for theta0 in points[order]:
        res = minimize(
            _huber_objective,
            theta0,
            args=(log_n, log_d, log_l, delta),
            jac=True,
            method="L-BFGS-B",
            options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-12},
        )
        if best is None or res.fun < best.fun:
            best = res
    a, b, e, alpha, beta = best.x
    return ChinchillaFit(
        float(np.exp(e)),
        float(np.exp(a)),
        float(np.exp(b)),
        float(alpha),
        float(beta),
        float(best.fun) * delta**2,
    )


_ALIASES = {
    "n": ("n", "params", "parameters", "n_params"),
    "d": ("d", "tokens", "n_tokens"),
    "loss": ("loss", "l", "final_loss", "eval_loss"),
}


def read_runs(path: Path) -> tuple[list[float], list[float], list[float]]:
    """Rows of (N, D, loss) from CSV (header row) or JSON lines; column names per _ALIASES."""
    with open(path) as fh:
        if path.suffix in (".jsonl", ".json"):
            rows = [json.loads(line) for line in fh if line.strip()]
        else:
            rows = list(csv.DictReader(fh))
    out: dict[str, list[float]] = {}
    for key, names in _ALIASES.items():
        found = [c for c in (rows[0] if rows else {}) if c.strip().lower() in names]
        if not found:
            raise ValueError(f"{path}: no column for {key} (one of {names})")
        out[key] = [float(r[found[0]]) for r in rows]
    return out["n"], out["d"], out["loss"]
