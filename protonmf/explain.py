"""The explanation maths, numpy only: the one place where a class's logit is split into
prototype contributions, their NMF and residual parts, and where the shares that the
service, ``protonmf evaluate`` and ``protonmf report`` show are defined.

For class c with coefficients a_c (p,), NMF prototypes b_ci, augmented prototypes b'_ci
(Eq. 8) and pooled features f (D,)::

    contribution_ci = a_ci (b'_ci · f) [/σ]       Σ_i contribution_ci + bias_c = logit_c
    residual_ci     = a_ci ((b'_ci − b_ci) · f) [/σ]    nmf_ci = contribution_ci − residual_ci

σ is the LayerNorm head's per-image scale (1 for a plain linear head). Where a class is
folded "class_vector" or "no_images" its prototype 0 is V itself: all of it is residual.
docs/method.md has the derivation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from protonmf.artifact.manifest import Manifest

__all__ = [
    "ALL_RESIDUAL_FOLDS",
    "explained_share",
    "folds",
    "heads",
    "inv_sigma",
    "layer_norm_eps",
    "ratio",
    "residual_logits",
    "residual_shares",
    "residual_terms",
    "rival",
]

# folds where prototype 0 is V itself: the whole logit is residual, nothing is NMF's
ALL_RESIDUAL_FOLDS = ("class_vector", "no_images")
EPS = 1e-12  # a denominator at or below this makes a share undefined (None / NaN)


def folds(manifest: dict | Manifest) -> list[str]:
    """Each class's fold (manifest diagnostics; "sum", Eq. 8, where older ones say nothing)."""
    return Manifest.of(manifest).folds


def layer_norm_eps(manifest: dict | Manifest) -> float | None:
    """The LayerNorm head's epsilon, or None for a plain linear head."""
    return Manifest.of(manifest).layer_norm_eps


def _whole(fold_list: Sequence[str]) -> np.ndarray:
    return np.array([f in ALL_RESIDUAL_FOLDS for f in fold_list], bool)


def inv_sigma(pooled: np.ndarray, eps: float | None) -> np.ndarray:
    """1/σ(f) of a LayerNorm head per row of ``pooled`` (…, D); ones for a plain head."""
    f = np.asarray(pooled, np.float64)
    if eps is None:
        return np.ones(f.shape[:-1])
    return 1.0 / np.sqrt(((f - f.mean(-1, keepdims=True)) ** 2).mean(-1) + eps)


def heads(tensors: dict, fold_list: Sequence[str]) -> dict[str, np.ndarray]:
    """The four heads (C, D), float64: ``black_box`` V, ``augmented`` Σ_i a_i b'_i,
    ``nmf_only`` Σ_i a_i b_i (0 for whole-vector folds) and ``residual_only`` = augmented −
    nmf_only (R; all of V for whole-vector folds)."""
    a = tensors["coefficients"].astype(np.float64)
    aug = np.einsum("cp,cpd->cd", a, tensors["prototypes"].astype(np.float64))
    nmf = np.einsum("cp,cpd->cd", a, tensors["nmf_prototypes"].astype(np.float64))
    nmf[_whole(fold_list)] = 0.0
    return {
        "black_box": tensors["class_vectors"].astype(np.float64),
        "augmented": aug,
        "nmf_only": nmf,
        "residual_only": aug - nmf,
    }


def explained_share(tensors: dict, fold_list: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per class, how much of its class vector V the NMF prototypes carry: ``energy`` =
    1 − ‖R‖²/‖V‖² and ``norm_ratio`` = ‖Σ a_i b_i‖/‖V‖. Both 0 for whole-vector folds, NaN
    where V = 0 (nothing to explain)."""
    h = heads(tensors, fold_list)
    v2 = (h["black_box"] ** 2).sum(1)
    safe = np.where(v2 > 0, v2, 1.0)
    energy = np.where(v2 > 0, 1.0 - (h["residual_only"] ** 2).sum(1) / safe, np.nan)
    norm_ratio = np.where(v2 > 0, np.sqrt((h["nmf_only"] ** 2).sum(1) / safe), np.nan)
    whole = _whole(fold_list) & (v2 > 0)  # exactly 0, not V's float32 round-off against itself
    energy[whole], norm_ratio[whole] = 0.0, 0.0
    return energy, norm_ratio


def residual_terms(
    tensors: dict,
    fold_list: Sequence[str],
    pooled: np.ndarray,
    classes: Sequence[int],
    eps: float | None,
) -> np.ndarray:
    """residual_ci (len(classes), p) for one image's pooled features (D,), float64. Only the
    classes asked for, in one gather: a 1,000-class model pays for a few (p, D)."""
    cs = [int(c) for c in classes]
    f = np.asarray(pooled, np.float64)
    delta = tensors["prototypes"][cs].astype(np.float64)  # (n, p, D)
    folded = [k for k, w in enumerate(_whole([fold_list[c] for c in cs])) if not w]
    delta[folded] -= tensors["nmf_prototypes"][[cs[k] for k in folded]]
    return tensors["coefficients"][cs] * (delta @ f) * float(inv_sigma(f, eps))


def residual_logits(
    tensors: dict, fold_list: Sequence[str], pooled: np.ndarray, eps: float | None
) -> np.ndarray:
    """Σ_i residual_ci for every image and class (N, C): the residual's part of each logit."""
    f = np.asarray(pooled, np.float64)
    return (f @ heads(tensors, fold_list)["residual_only"].T) * inv_sigma(f, eps)[:, None]


def ratio(num, den) -> np.ndarray:
    """num / den, NaN where |den| ≤ EPS (a share of nothing is undefined)."""
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    ok = np.abs(den) > EPS
    return np.where(ok, num / np.where(ok, den, 1.0), np.nan)


def residual_shares(logit_c, bias_c, r_c, logit_o, r_o) -> tuple[np.ndarray, np.ndarray]:
    """How much of class c's logit without bias, and of its margin over its rival o, the
    residual carries: r_c / (logit_c − bias_c) and (r_c − r_o) / (logit_c − logit_o); NaN
    where a denominator is 0. Scalars or arrays of images alike."""
    logit_c, logit_o = np.asarray(logit_c, np.float64), np.asarray(logit_o, np.float64)
    return ratio(r_c, logit_c - bias_c), ratio(np.subtract(r_c, r_o), logit_c - logit_o)


def rival(logits: np.ndarray, c: int) -> int | None:
    """The best other class than ``c``: the runner-up for the top class, the top for the rest."""
    if len(logits) < 2:
        return None
    others = np.array(logits, np.float64)
    others[c] = -np.inf
    return int(np.argmax(others))
