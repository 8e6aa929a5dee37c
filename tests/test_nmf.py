"""NMF against independent references: scikit-learn, a readable loop, synthetic truth.
The converter's NMF is torch (the convert extra): without torch the module skips."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from protonmf.converter.nmf import nmf  # noqa: E402


def low_rank(n=300, d=40, r=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, r)) @ rng.random((r, d))


def features_like(n=600, d=64, seed=1):
    """ReLU-like sparse non-negative features, not exactly low rank."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 8)) @ rng.standard_normal((8, d)) + 0.3 * rng.standard_normal(
        (n, d)
    )
    return np.maximum(x, 0)


def reference_mu(A, E, B, iters):
    """Eq. 2 written out plainly, one class, no batching, no stopping rule."""
    for _ in range(iters):
        E = E * (A @ B.T) / np.maximum(E @ B @ B.T, 1e-10)
        B = B * (E.T @ A) / np.maximum(E.T @ E @ B, 1e-10)
    return E, B


@pytest.mark.parametrize("p", [3, 10])
def test_error_matches_sklearn_mu(p):
    A = features_like()
    ours = nmf(torch.tensor(A[None], dtype=torch.float64), p, tol=1e-4, max_iter=200)
    ours_err = np.linalg.norm(A - ours.E[0].numpy() @ ours.B[0].numpy())
    NMF = pytest.importorskip("sklearn.decomposition").NMF
    sk = NMF(n_components=p, solver="mu", init="random", tol=1e-4, max_iter=200, random_state=0)
    W = sk.fit_transform(A)
    sk_err = np.linalg.norm(A - W @ sk.components_)
    assert ours_err <= sk_err * 1.02, (ours_err, sk_err)


@pytest.mark.parametrize("solver", ["mu", "hals"])
def test_factors_non_negative_and_error_consistent(solver):
    A = torch.tensor(features_like()[None], dtype=torch.float64)
    res = nmf(A, 4, solver=solver)
    assert (res.E >= 0).all() and (res.B >= 0).all()
    direct = torch.linalg.norm(A[0] - res.E[0] @ res.B[0]) ** 2
    # The trace-identity error equals the directly computed one.
    torch.testing.assert_close(res.error[0], direct, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("solver, rtol", [("mu", 2e-2), ("hals", 1e-4)])
def test_recovers_exact_low_rank(solver, rtol):
    # MU converges sublinearly (0.9% after 2000 iterations here); HALS reaches 1e-5.
    A = low_rank()
    res = nmf(torch.tensor(A[None]), 3, solver=solver, tol=1e-12, max_iter=2000)
    assert res.rel_error[0] < rtol
    np.testing.assert_allclose(res.E[0].numpy() @ res.B[0].numpy(), A, atol=rtol * 10 * A.max())


def test_matches_reference_loop():
    A = features_like(n=100, d=20)
    At = torch.tensor(A[None])
    res = nmf(At, 3, tol=0.0, max_iter=1)  # one step from the seeded init
    gen = torch.Generator().manual_seed(0)
    E0 = torch.randn(1, 100, 3, generator=gen, dtype=torch.float64).abs()
    B0 = torch.randn(1, 3, 20, generator=gen, dtype=torch.float64).abs()
    scale = np.sqrt(A.mean() / 3)
    E, B = reference_mu(A, E0[0].numpy() * scale, B0[0].numpy() * scale, 1)
    np.testing.assert_allclose(res.E[0].numpy(), E, rtol=1e-10)
    np.testing.assert_allclose(res.B[0].numpy(), B, rtol=1e-10)


def test_float32_agrees_with_float64():
    A = features_like()
    r64 = nmf(torch.tensor(A[None], dtype=torch.float64), 3, max_iter=50, tol=0)
    r32 = nmf(torch.tensor(A[None], dtype=torch.float32), 3, max_iter=50, tol=0)
    np.testing.assert_allclose(r32.rel_error.numpy(), r64.rel_error.numpy(), rtol=1e-3)
    np.testing.assert_allclose(r32.B.double().numpy(), r64.B.numpy(), rtol=1e-2, atol=1e-4)


def test_batched_padding_changes_nothing():
    """Two classes of different sizes in one padded batch == each class alone."""
    A1, A2 = features_like(n=200, seed=2), features_like(n=120, seed=3)
    batch = np.zeros((2, 200, A1.shape[1]))
    batch[0], batch[1, :120] = A1, A2
    both = nmf(torch.tensor(batch), 3, n_rows=torch.tensor([200, 120]), seed=5)
    alone = nmf(torch.tensor(A2[None]), 3, seed=5)
    # Same init draw only for class 0; for class 1 compare quality, and padding rows stay 0.
    assert (both.E[1, 120:] == 0).all()
    assert both.rel_error[1] <= alone.rel_error[0] * 1.05
    assert both.n_iter[0] >= 1 and both.n_iter[1] >= 1


def test_stopping_rule_and_cap():
    A = torch.tensor(features_like()[None])
    capped = nmf(A, 3, tol=0.0, max_iter=7)
    assert int(capped.n_iter[0]) == 7
    early = nmf(A, 3, tol=1e-2, max_iter=200)
    assert int(early.n_iter[0]) < 200


def test_paper_init_runs_and_stays_non_negative():
    A = torch.tensor(features_like()[None])
    res = nmf(A, 3, init="paper")
    assert (res.B >= 0).all() and res.rel_error[0] < 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(p=0), "p must be >= 1"),
        (dict(p=3, solver="als"), "solver must be"),
        (dict(p=3, init="nndsvd"), "init must be"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        nmf(torch.rand(1, 10, 5), **kwargs)


def test_negative_input_refused():
    with pytest.raises(ValueError, match="negative entries"):
        nmf(-torch.rand(1, 10, 5), 2)


@pytest.mark.gpu
def test_cuda_matches_cpu():
    """Same init (drawn on the CPU), same updates: the GPU run lands where the CPU run does."""
    A = features_like()
    cpu = nmf(torch.tensor(A[None], dtype=torch.float64), 3, max_iter=100, tol=0)
    gpu = nmf(torch.tensor(A[None], dtype=torch.float64, device="cuda"), 3, max_iter=100, tol=0)
    assert gpu.B.device.type == "cuda"
    np.testing.assert_allclose(gpu.B.cpu().numpy(), cpu.B.numpy(), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(gpu.rel_error.cpu().numpy(), cpu.rel_error.numpy(), rtol=1e-9)
