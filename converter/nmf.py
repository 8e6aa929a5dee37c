"""Non-negative matrix factorisation A ≈ E·B, batched over classes (ProtoNMF Sec. 3.1).

Every class c has its own matrix A^c of shape (n_c, D) (n_c = images × H × W feature
vectors). Classes are stacked into one zero-padded tensor (K, n_max, D) so one set of
batched matmuls updates all of them at once, on the GPU when there is one. Padded rows
start at E = 0 and multiplicative updates keep them there, so they change nothing.

Two solvers:

- ``"mu"``: Lee–Seung multiplicative updates (Eq. 2), the paper's solver.
- ``"hals"``: hierarchical alternating least squares (one column of E / row of B at a
  time, exact for that block). Same objective, usually far fewer iterations; see
  benchmarks/bench_nmf.py for what it buys here.

Both stop per class when (err_prev − err) / err_init < ``tol`` (Eq. 3 relative change) or
after ``max_iter`` iterations. The error ||A − E B||² is computed by the trace identity
||A||² − 2⟨EᵀA, B⟩ + ⟨EᵀE, B Bᵀ⟩, never by forming A − E B.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["NMFResult", "nmf"]

_EPS = 1e-10


@dataclass
class NMFResult:
    """Factors and per-class convergence record.

    E : (K, n_max, p)  non-negative, rows past a class's n_c are 0
    B : (K, p, D)      non-negative prototypes
    error : (K,)       final ||A − E B||² (Frobenius, squared)
    rel_error : (K,)   final ||A − E B|| / ||A||
    n_iter : (K,)      iterations run per class
    """

    E: torch.Tensor
    B: torch.Tensor
    error: torch.Tensor
    rel_error: torch.Tensor
    n_iter: torch.Tensor


def _draw(K, n, p, D, n_rows, generator, seeds):
    """Standard Gaussian E (K, n, p) and B (K, p, D), float64 on the CPU. With ``seeds``,
    class k's draw depends on seeds[k] and its own row count only: the same whichever
    classes share its batch and however far it is padded (chunked, streamed or sharded
    conversions then factorise every class alike)."""
    opts = dict(dtype=torch.float64, device="cpu")
    if seeds is None:
        return (
            torch.randn(K, n, p, generator=generator, **opts),
            torch.randn(K, p, D, generator=generator, **opts),
        )
    E, B = torch.zeros(K, n, p, **opts), torch.empty(K, p, D, **opts)
    for k, seed in enumerate(seeds):
        g = torch.Generator().manual_seed(int(seed))
        B[k] = torch.randn(p, D, generator=g, **opts)
        E[k, : int(n_rows[k])] = torch.randn(int(n_rows[k]), p, generator=g, **opts)
    return E, B


def _init(A, p, mask, init, generator, seeds=None):
    K, n, D = A.shape
    # Drawn in float64 on the CPU whatever A is, so float32/float64 and CPU/GPU runs start
    # from the same point.
    E, B = _draw(K, n, p, D, mask.sum(1).long().cpu(), generator, seeds)
    E, B = E.to(A.device, A.dtype), B.to(A.device, A.dtype)
    if init == "paper":
        # The paper: standard Gaussian with negatives set to 0.
        E, B = E.clamp_min(0), B.clamp_min(0)
    elif init == "random":
        # scikit-learn's "random": |Gaussian| scaled so E·B has A's mean magnitude.
        # Zeros are absorbing under multiplicative updates; |·| avoids locking half the
        # entries at 0 from the start.
        n_rows = mask.sum(1).clamp_min(1)  # (K,)
        mean = A.sum((1, 2)) / (n_rows * D)
        scale = torch.sqrt(mean / p).view(K, 1, 1)
        E, B = E.abs() * scale, B.abs() * scale
    else:
        raise ValueError(f"init must be 'paper' or 'random', got {init!r}")
    return E * mask.unsqueeze(-1), B


def _error(sq_norm_A, EtA, EtE, B):
    # ||A − EB||² = ||A||² − 2<EᵀA, B> + <EᵀE, BBᵀ>
    BBt = B @ B.transpose(1, 2)
    err = sq_norm_A - 2 * (EtA * B).sum((1, 2)) + (EtE * BBt).sum((1, 2))
    return err.clamp_min(0)


def _mu_step(A, E, B):
    # E ← E ⊙ (A Bᵀ) / (E B Bᵀ);  B ← B ⊙ (Eᵀ A) / (Eᵀ E B)
    Bt = B.transpose(1, 2)
    E = E * (A @ Bt) / (E @ (B @ Bt)).clamp_min(_EPS)
    Et = E.transpose(1, 2)
    EtA, EtE = Et @ A, Et @ E
    B = B * EtA / (EtE @ B).clamp_min(_EPS)
    return E, B, EtA, EtE


def _hals_step(A, E, B):
    # One exact non-negative least-squares update per column of E, then per row of B.
    p = B.shape[1]
    Bt = B.transpose(1, 2)
    ABt, BBt = A @ Bt, B @ Bt  # (K, n, p), (K, p, p)
    for k in range(p):
        bbk = BBt[:, k, k].unsqueeze(1)  # (K, 1)
        num = ABt[:, :, k] - (E @ BBt[:, :, k : k + 1]).squeeze(-1) + E[:, :, k] * bbk
        E[:, :, k] = (num / bbk.clamp_min(_EPS)).clamp_min(0)
    Et = E.transpose(1, 2)
    EtA, EtE = Et @ A, Et @ E
    for k in range(p):
        eek = EtE[:, k, k].unsqueeze(1)  # (K, 1)
        num = EtA[:, k, :] - (EtE[:, k : k + 1, :] @ B).squeeze(1) + B[:, k, :] * eek
        B[:, k, :] = (num / eek.clamp_min(_EPS)).clamp_min(0)
    return E, B, EtA, EtE


def nmf(
    A: torch.Tensor,
    p: int,
    *,
    n_rows: torch.Tensor | None = None,
    solver: str = "mu",
    init: str = "random",
    tol: float = 1e-4,
    max_iter: int = 200,
    seed: int = 0,
    seeds=None,
    progress=None,
) -> NMFResult:
    """Factorise each class matrix A[k, :n_rows[k]] ≈ E[k] B[k] with E, B ≥ 0.

    Parameters
    ----------
    A : tensor of shape (K, n_max, D), non-negative
        K class matrices, zero-padded to n_max rows. Clip negatives before calling.
    p : int
        Prototypes per class.
    n_rows : tensor of shape (K,), optional
        Valid rows per class (default: all n_max).
    solver : "mu" (Lee–Seung, the paper) or "hals".
    init : "random" (|Gaussian|, scaled) or "paper" (Gaussian with negatives set to 0).
    tol, max_iter : stopping rule, per class.
    seeds : optional, one per class: its initialisation then depends on its own seed and
        rows only (else one generator seeded by ``seed`` draws the whole padded batch).
    progress : optional tqdm-like object with ``update(n)``, advanced once per iteration.
    """
    _check(A, p, solver)
    K, n, D = A.shape
    if n_rows is None:
        n_rows = torch.full((K,), n, device=A.device)
    n_rows = n_rows.to(A.device)
    mask = (torch.arange(n, device=A.device).unsqueeze(0) < n_rows.unsqueeze(1)).to(A.dtype)
    gen = torch.Generator().manual_seed(seed)
    if seeds is not None and len(seeds) != K:
        raise ValueError(f"{len(seeds)} seeds for {K} classes")
    E, B = _init(A, p, mask, init, gen, seeds)
    step = _mu_step if solver == "mu" else _hals_step
    return _iterate(A, E, B, step, tol, max_iter, progress)


def _check(A: torch.Tensor, p: int, solver: str) -> None:
    if A.ndim != 3:
        raise ValueError(f"A must have shape (K, n, D), got {tuple(A.shape)}")
    if p < 1:
        raise ValueError(f"p must be >= 1, got {p}")
    if solver not in ("mu", "hals"):
        raise ValueError(f"solver must be 'mu' or 'hals', got {solver!r}")
    if bool((A < 0).any()):
        raise ValueError("A has negative entries; clip features to >= 0 before NMF")


def _iterate(A, E, B, step, tol, max_iter, progress) -> NMFResult:
    """``step`` from (E, B) until every class has converged (Eq. 3) or ``max_iter``."""
    K = A.shape[0]
    sq_norm_A = torch.linalg.vector_norm(A, dim=(1, 2)) ** 2  # no A-sized temporary
    Et = E.transpose(1, 2)
    err_init = _error(sq_norm_A, Et @ A, Et @ E, B).clamp_min(_EPS)
    err_prev = err_init.clone()
    active = torch.ones(K, dtype=torch.bool, device=A.device)
    n_iter = torch.zeros(K, dtype=torch.long, device=A.device)
    for _ in range(max_iter):
        E_new, B_new, EtA, EtE = step(A, E.clone(), B.clone())
        err = _error(sq_norm_A, EtA, EtE, B_new)
        # Converged classes keep their factors: batching must not change any result.
        keep = active.view(K, 1, 1)
        E, B = torch.where(keep, E_new, E), torch.where(keep, B_new, B)
        n_iter += active.long()
        done = (err_prev - err) / err_init < tol
        err_prev = torch.where(active, err, err_prev)
        active &= ~done
        if progress is not None:
            progress.update(1)
        if not bool(active.any()):
            break
    rel = torch.sqrt(err_prev / sq_norm_A.clamp_min(_EPS))
    return NMFResult(E=E, B=B, error=err_prev, rel_error=rel, n_iter=n_iter)
