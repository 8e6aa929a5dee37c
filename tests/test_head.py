"""Head reconstruction (Eq. 4–5, 8) and Eq. 9's presence filters against cvxpy and plain
least squares. The head fit is numpy only; cvxpy (the dev extra) and the presence
filters (torch: the convert extra) skip the tests that need them where they are missing."""

import numpy as np
import pytest

from protonmf.converter.head import fit_coefficients, fold_residual


def presence_filters(prototypes):
    pytest.importorskip("torch")
    from protonmf.converter.exemplars import presence_filters

    return presence_filters(prototypes)


def random_head(C=6, p=3, D=32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((C, D)), np.abs(rng.standard_normal((C, p, D)))


def test_closed_form_equals_cvxpy():
    cp = pytest.importorskip("cvxpy")
    V, B = random_head()
    a, R = fit_coefficients(V, B)
    for c in range(len(V)):
        x = cp.Variable(B.shape[1])
        cp.Problem(cp.Minimize(cp.sum_squares(B[c].T @ x - V[c]))).solve()
        np.testing.assert_allclose(a[c], x.value, atol=1e-6)
    np.testing.assert_allclose(R, V - np.einsum("cp,cpd->cd", a, B), atol=1e-12)


def test_nonneg_coefficients_via_cvxpy():
    pytest.importorskip("cvxpy")  # fit_coefficients(nonneg=True) solves with it
    V, B = random_head(seed=1)
    a, R = fit_coefficients(V, B, nonneg=True)
    assert (a >= 0).all()
    # KKT: no feasible direction improves, so a ≥ 0 does no better than the free solution.
    a_free, R_free = fit_coefficients(V, B)
    assert (np.linalg.norm(R, axis=1) >= np.linalg.norm(R_free, axis=1) - 1e-9).all()


def test_residual_is_orthogonal_to_prototypes():
    V, B = random_head()
    _, R = fit_coefficients(V, B)
    np.testing.assert_allclose(np.einsum("cd,cpd->cp", R, B), 0, atol=1e-9)


def rebuild_rel_error(fold, V):
    rebuilt = np.einsum("cp,cpd->cd", fold.coefficients, fold.prototypes)
    return np.linalg.norm(rebuilt - V, axis=1) / np.linalg.norm(V, axis=1)


def test_fold_rebuilds_class_vectors_exactly():
    V, B = random_head()
    a, R = fit_coefficients(V, B)
    fold = fold_residual(a, B, R)
    assert (rebuild_rel_error(fold, V) < 1e-5).all()


def test_guard_catches_cancelling_coefficients():
    """The paper's sled dog: a = (−0.004, −0.007, 0.014), Σa = 0.003."""
    rng = np.random.default_rng(3)
    B = np.abs(rng.standard_normal((1, 3, 64)))
    a = np.array([[-0.004, -0.007, 0.014]])
    R = rng.standard_normal((1, 64)) * 0.05
    V = np.einsum("cp,cpd->cd", a, B) + R
    eq8 = fold_residual(a, B, R, min_sum_ratio=0.0)
    guarded = fold_residual(a, B, R)  # default threshold
    assert eq8.method == ["sum"] and guarded.method == ["min_norm"]
    assert guarded.sum_ratio[0] == pytest.approx(0.003 / 0.025)
    assert (rebuild_rel_error(eq8, V) < 1e-5).all()
    assert (rebuild_rel_error(guarded, V) < 1e-5).all()
    # Eq. 8 amplifies R by 1/Σa ≈ 333; the min-norm split by less than that, and its
    # residual shares a_i w_i are all ≥ 0 (no cancellation between prototypes).
    shares = guarded.coefficients * guarded.weights
    assert (shares >= 0).all() and shares.sum() == pytest.approx(1.0)
    shift_eq8 = np.linalg.norm(eq8.prototypes - B)
    shift_guard = np.linalg.norm(guarded.prototypes - B)
    assert shift_guard < shift_eq8


def test_zero_coefficients_keep_class_vector():
    V, B = random_head(C=2)
    a, R = np.zeros((2, 3)), V.copy()
    fold = fold_residual(a, B, R)
    assert fold.method == ["class_vector", "class_vector"]
    assert (rebuild_rel_error(fold, V) < 1e-12).all()


def test_presence_filters_are_eq9_least_squares():
    """E' = argmin ||A − E' B'||² per class: A · filtersᵀ against cvxpy (independent solver)."""
    cp = pytest.importorskip("cvxpy")
    rng = np.random.default_rng(5)
    A, prototypes = rng.random((40, 16)), rng.standard_normal((2, 3, 16))
    filters = presence_filters(prototypes)
    assert filters.shape == prototypes.shape
    for c, Bp in enumerate(prototypes):
        x = cp.Variable((40, 3))
        cp.Problem(cp.Minimize(cp.sum_squares(A - x @ Bp))).solve()
        np.testing.assert_allclose(A @ filters[c].T, x.value, atol=1e-5)


def test_presence_filters_minimum_norm_when_prototypes_repeat():
    """A repeated prototype (rank-deficient B'): the minimum-norm solution, shared equally."""
    rng = np.random.default_rng(6)
    A, b = rng.random((20, 8)), rng.standard_normal((2, 8))
    Bp = np.stack([b[0], b[0], b[1]])  # prototypes 0 and 1 identical
    E = A @ presence_filters(Bp[None])[0].T
    want = np.linalg.lstsq(Bp.T, A.T, rcond=None)[0].T
    np.testing.assert_allclose(E, want, atol=1e-10)
    np.testing.assert_allclose(E[:, 0], E[:, 1], atol=1e-10)


def test_shape_errors():
    with pytest.raises(ValueError, match="expected V"):
        fit_coefficients(np.zeros((3, 4)), np.zeros((2, 3, 4)))
