"""Rebuild the classifier head from prototypes (ProtoNMF Sec. 3.2–3.3), in float64 numpy.

Shapes: C classes, p prototypes per class, D feature channels.

- Eq. 4  a^c = argmin ||V^c − a B^c||²         ``fit_coefficients``
- Eq. 5  R^c = V^c − a^c B^c                     ``fit_coefficients`` (returned)
- Eq. 8  b'_i = b_i + w_i R with Σ a_i w_i = 1   ``fold_residual``

Eq. 9's presence maps E' = argmin ||A^c − E' B'^c||² are
``converter.exemplars.presence_filters`` (pseudo-inverse filters, also used in the graph).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "Fold",
    "fit_coefficients",
    "fold_residual",
]


def fit_coefficients(
    V: np.ndarray, B: np.ndarray, *, nonneg: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares coefficients and residual prototypes (Eq. 4 and 5).

    V : (C, D) class vectors;  B : (C, p, D) prototypes.
    Returns a : (C, p) and R : (C, D) with V = a B + R.

    The unconstrained problem has a closed form (``lstsq`` per class, minimum-norm when
    B^c is rank deficient). ``nonneg=True`` solves a ≥ 0 with cvxpy.
    """
    V, B = np.asarray(V, np.float64), np.asarray(B, np.float64)
    if V.ndim != 2 or B.ndim != 3 or B.shape[0] != V.shape[0] or B.shape[2] != V.shape[1]:
        raise ValueError(f"expected V (C, D) and B (C, p, D), got {V.shape} and {B.shape}")
    if nonneg:
        a = np.stack([_nonneg_lstsq(B[c], V[c]) for c in range(len(V))])
    else:
        # min ||V^c − a B^c||  ⇔  min ||B^cᵀ aᵀ − V^cᵀ||
        a = np.stack([np.linalg.lstsq(B[c].T, V[c], rcond=None)[0] for c in range(len(V))])
    R = V - np.einsum("cp,cpd->cd", a, B)
    return a, R


def _nonneg_lstsq(Bc: np.ndarray, v: np.ndarray) -> np.ndarray:
    import cvxpy as cp

    a = cp.Variable(Bc.shape[0])
    problem = cp.Problem(cp.Minimize(cp.sum_squares(Bc.T @ a - v)), [a >= 0])
    problem.solve()
    if a.value is None:
        raise RuntimeError(f"cvxpy could not solve the constrained head fit: {problem.status}")
    return np.maximum(a.value, 0.0)


@dataclass
class Fold:
    """Augmented prototypes and how the residual was folded into them, per class.

    prototypes : (C, p, D)  b' with Σ_i a_i b'_i == V
    weights : (C, p)        w with b'_i = b_i + w_i R, Σ_i a_i w_i = 1
    method : list[str]      "sum" (Eq. 8: w_i = 1/Σa), "min_norm" (w = a/||a||², the
                            guard), or "class_vector" (a ≈ 0: one prototype holds V)
    sum_ratio : (C,)        |Σa| / ||a||₁ ∈ [0, 1]: 1 when all a_i share a sign, ≈ 0
                            when they cancel and Eq. 8 would amplify R by 1/|Σa|
    """

    prototypes: np.ndarray
    coefficients: np.ndarray
    weights: np.ndarray
    method: list[str]
    sum_ratio: np.ndarray


def fold_residual(
    a: np.ndarray, B: np.ndarray, R: np.ndarray, *, min_sum_ratio: float = 0.5
) -> Fold:
    """Fold the residual R into the prototypes so that Σ a_i b'_i equals V exactly.

    Eq. 8 adds R/Σa to every prototype. When the a_i cancel (|Σa| small against ||a||₁,
    e.g. the paper's "sled dog", Σa = 0.003, ratio 0.12) that amplifies R hundreds of
    times: the residual's shares a_i/Σa then sum to 1 only by cancelling (Σ|shares| =
    1/ratio) and float32 loses precision. Below ``min_sum_ratio`` (default 0.5: at most
    2× cancellation) the guard uses the minimum-norm split w = a/||a||² instead: still
    Σ a_i w_i = 1, every share a_i²/||a||² ≥ 0, and ||w|| = 1/||a|| is as small as any
    exact split can be. If a itself is ≈ 0 the class keeps V as a single prototype.
    """
    a, B, R = (np.asarray(x, np.float64) for x in (a, B, R))
    C, p, _ = B.shape
    a = a.copy()
    B = B.copy()
    l1 = np.abs(a).sum(1)
    s = a.sum(1)
    sum_ratio = np.where(l1 > 0, np.abs(s) / np.maximum(l1, 1e-300), 0.0)
    w = np.zeros((C, p))
    method = []
    scale = np.linalg.norm(B, axis=2).max(1)  # typical prototype norm, for "a ≈ 0"
    for c in range(C):
        a_norm = np.linalg.norm(a[c])
        if a_norm * max(scale[c], 1e-300) < 1e-12 * max(np.linalg.norm(R[c]), 1e-300):
            # The prototypes explain nothing of V: keep V whole as prototype 0.
            V = R[c] + a[c] @ B[c]
            B[c] = 0.0
            B[c, 0] = V
            a[c] = 0.0
            a[c, 0] = 1.0
            method.append("class_vector")
            continue
        if sum_ratio[c] >= min_sum_ratio:
            w[c] = 1.0 / s[c]
            method.append("sum")
        else:
            w[c] = a[c] / a_norm**2
            method.append("min_norm")
    prototypes = B + w[:, :, None] * R[:, None, :]
    return Fold(
        prototypes=prototypes, coefficients=a, weights=w, method=method, sum_ratio=sum_ratio
    )
