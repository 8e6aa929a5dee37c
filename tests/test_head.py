"""Head reconstruction (Eq. 4–9) against cvxpy and plain least squares."""

import cvxpy as cp
import numpy as np
import pytest

from protonmf.converter.head import augmented_heatmaps, fit_coefficients, fold_residual, residual_heatmaps


def random_head(C=6, p=3, D=32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((C, D)), np.abs(rng.standard_normal((C, p, D)))


def test_closed_form_equals_cvxpy():
    V, B = random_head()
    a, R = fit_coefficients(V, B)
    for c in range(len(V)):
        x = cp.Variable(B.shape[1])
        cp.Problem(cp.Minimize(cp.sum_squares(B[c].T @ x - V[c]))).solve()
        np.testing.assert_allclose(a[c], x.value, atol=1e-6)
    np.testing.assert_allclose(R, V - np.einsum("cp,cpd->cd", a, B), atol=1e-12)


def test_nonneg_coefficients_via_cvxpy():
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


def test_residual_heatmaps_match_lstsq():
    rng = np.random.default_rng(4)
    A, E, B, R = (rng.random(s) for s in [(50, 16), (50, 3), (3, 16), (16,)])
    H = residual_heatmaps(A, E, B, R)
    want = np.linalg.lstsq(R[:, None], (A - E @ B).T, rcond=None)[0][0]
    np.testing.assert_allclose(H, want, rtol=1e-10)


def test_augmented_heatmaps_match_lstsq():
    rng = np.random.default_rng(5)
    A, Bp = rng.random((40, 16)), rng.standard_normal((3, 16))
    E = augmented_heatmaps(A, Bp)
    x = cp.Variable((40, 3))
    cp.Problem(cp.Minimize(cp.sum_squares(A - x @ Bp))).solve()
    np.testing.assert_allclose(E, x.value, atol=1e-5)


def test_shape_errors():
    with pytest.raises(ValueError, match="expected V"):
        fit_coefficients(np.zeros((3, 4)), np.zeros((2, 3, 4)))
