"""Benchmark converter.nmf against scikit-learn's NMF on a realistic class matrix.

What it measures
----------------
For p = 3 and p = 10, on one class matrix A (n × D, non-negative, float32):

* ours, solver="mu"   (Lee–Seung, the paper's solver), on a (1, n, D) tensor
* ours, solver="hals" (same stopping rule: tol 1e-4, max_iter 200)
* sklearn NMF(solver="mu", init="random", tol=1e-4, max_iter=200, random_state=0)
* sklearn NMF(solver="cd", init="random", tol=1e-4, max_iter=200, random_state=0)

Wall-clock time (one process, repeats interleaved A B C D A B C D …, medians), iterations
run, and the final relative reconstruction error ||A − E B||_F / ||A||_F. The error in the
table is recomputed here for every method the same way (float64, chunked, outside the
timed region), so it does not depend on how each library tracks its own error. The best
rank-p error from the SVD (Eckart–Young) is printed as a floor no rank-p factorisation,
non-negative or not, can beat.

Then a batched case: K classes of n_b × D each, factorised by one call of ours on a
(K, n_b, D) tensor vs a Python loop of K single-class calls (solver="mu").

Note the stopping rules are not identical across libraries: ours stops per class when
(err_prev − err)/err_init < tol on the *squared* error, every iteration; sklearn's "mu"
checks the same ratio on the (non-squared) Frobenius norm every 10 iterations; sklearn's
"cd" stops on a projected-gradient violation ratio. Same tol and max_iter, different
meaning — compare time *and* error, not either alone.

Usage
-----
    .venv/bin/python benchmarks/bench_nmf.py                # 50,000 × 512, 3 repeats
    .venv/bin/python benchmarks/bench_nmf.py --quick        # 5,000 × 128, 1 repeat (smoke)
    .venv/bin/python benchmarks/bench_nmf.py --features feats.npy   # real (n, D) features
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import sklearn
import torch
from _machine import RESULTS
from sklearn.decomposition import NMF
from sklearn.exceptions import ConvergenceWarning
from threadpoolctl import threadpool_info, threadpool_limits

from protonmf.converter.nmf import nmf

TOL = 1e-4
MAX_ITER = 200
PS = (3, 10)

GENERATOR_DOC = (
    "synthetic ReLU-like features, float32: latent z ~ mixture of {m} Gaussians in R^{r} "
    "(centres ~ N(0, I), within-cluster sd 0.5); pre-activation h = z W / sqrt(r) + b + "
    "0.3·N(0, 1) noise per entry, W ~ N(0, 1) of shape ({r}, D), per-feature bias "
    "b ~ N(-0.3, 0.3²); A = max(0, h). Low-rank-ish (rank-{r} signal) but not exactly "
    "low-rank (ReLU + noise), ~half the entries exactly 0, as after a ReLU backbone."
)


# ----------------------------------------------------------------------------- data


def make_class_matrix(n, D, seed, r=32, m=16, chunk=10_000):
    """ReLU of a noisy low-rank Gaussian mixture, (n, D) float32. See GENERATOR_DOC."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((m, r))
    W = rng.standard_normal((r, D)) / np.sqrt(r)
    b = rng.normal(-0.3, 0.3, size=D)
    out = np.empty((n, D), dtype=np.float32)
    for s in range(0, n, chunk):
        k = min(chunk, n - s)
        z = centres[rng.integers(0, m, size=k)] + 0.5 * rng.standard_normal((k, r))
        h = z @ W + b + 0.3 * rng.standard_normal((k, D))
        out[s : s + k] = np.maximum(h, 0.0)
    return out


def load_features(path, n=None):
    X = np.load(path, mmap_mode="r")
    if X.ndim != 2:
        X = X.reshape(-1, X.shape[-1])  # e.g. (N, H, W, D) -> (N·H·W, D)
    if n is not None:
        X = X[:n]
    X = np.array(X, dtype=np.float32, order="C", copy=True)  # writable, in memory
    n_neg = int((X < 0).sum())
    if n_neg:
        print(f"note: {n_neg} negative entries in {path} clipped to 0")
        np.maximum(X, 0, out=X)
    return X


def describe(A):
    return {
        "shape": list(A.shape),
        "dtype": str(A.dtype),
        "frac_zero": float((A == 0).mean()),
        "mean": float(A.mean(dtype=np.float64)),
        "max": float(A.max()),
    }


# ----------------------------------------------------------------------------- errors


def rel_error(A, E, B, chunk=8192):
    """||A − E B||_F / ||A||_F in float64, chunked over rows."""
    B = np.asarray(B, dtype=np.float64)
    num = den = 0.0
    for s in range(0, A.shape[0], chunk):
        a = A[s : s + chunk].astype(np.float64)
        r = a - np.asarray(E[s : s + chunk], dtype=np.float64) @ B
        num += float((r * r).sum())
        den += float((a * a).sum())
    return float(np.sqrt(num / den)) if den > 0 else 0.0


def svd_floor(A, ps, chunk=8192):
    """Best rank-p relative error (Eckart–Young) from the eigenvalues of AᵀA."""
    G = np.zeros((A.shape[1], A.shape[1]))
    for s in range(0, A.shape[0], chunk):
        a = A[s : s + chunk].astype(np.float64)
        G += a.T @ a
    ev = np.clip(np.sort(np.linalg.eigvalsh(G))[::-1], 0, None)
    total = ev.sum()
    return {p: float(np.sqrt(ev[p:].sum() / total)) for p in ps}


# ----------------------------------------------------------------------------- methods


def run_ours(A_t, p, solver):
    """A_t: (K, n, D) torch tensor on its device. Returns (seconds, NMFResult on the host)."""
    t0 = time.perf_counter()
    res = nmf(A_t, p, solver=solver, init="random", tol=TOL, max_iter=MAX_ITER, seed=0)
    res = type(res)(**{k: v.cpu() for k, v in vars(res).items()})  # waits for the GPU
    dt = time.perf_counter() - t0
    return dt, res


def run_sklearn(A, p, solver):
    model = NMF(
        n_components=p, solver=solver, init="random", tol=TOL, max_iter=MAX_ITER, random_state=0
    )
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always", ConvergenceWarning)
        t0 = time.perf_counter()
        W = model.fit_transform(A)
        dt = time.perf_counter() - t0
    hit_max = any(issubclass(x.category, ConvergenceWarning) for x in w)
    return dt, model, W, hit_max


METHODS = [
    ("ours mu", "ours", "mu"),
    ("ours hals", "ours", "hals"),
    ("sklearn mu", "sklearn", "mu"),
    ("sklearn cd", "sklearn", "cd"),
]
GPU_METHODS = [("ours mu cuda", "ours-cuda", "mu"), ("ours hals cuda", "ours-cuda", "hals")]


def bench_single(A, p, repeats):
    A_t = torch.from_numpy(A).unsqueeze(0)  # (1, n, D), shares memory
    # On the GPU the features are already there in the converter: the copy is not timed.
    A_dev = {"ours": A_t, "ours-cuda": A_t.cuda() if METHODS[-1][1] == "ours-cuda" else None}
    times = {name: [] for name, _, _ in METHODS}
    last = {}
    for rep in range(repeats):
        for name, lib, solver in METHODS:  # interleaved: A B C D A B C D …
            if lib.startswith("ours"):
                dt, res = run_ours(A_dev[lib], p, solver)
                rec = {
                    "n_iter": int(res.n_iter[0]),
                    "E": res.E[0].numpy(),
                    "B": res.B[0].numpy(),
                    "reported_rel_error": float(res.rel_error[0]),
                    "hit_max_iter": int(res.n_iter[0]) >= MAX_ITER,
                }
            else:
                dt, model, W, hit_max = run_sklearn(A, p, solver)
                rec = {
                    "n_iter": int(model.n_iter_),
                    "E": W,
                    "B": model.components_,
                    "reported_rel_error": float(model.reconstruction_err_)
                    / float(np.linalg.norm(A.astype(np.float64))),
                    "hit_max_iter": hit_max or int(model.n_iter_) >= MAX_ITER,
                }
            times[name].append(dt)
            if name in last and last[name]["n_iter"] != rec["n_iter"]:
                print(f"  warning: {name} p={p}: n_iter differs between repeats")
            last[name] = rec
            print(
                f"  p={p:<3d} rep {rep + 1}/{repeats}  {name:<11s} {dt:8.3f} s  "
                f"{rec['n_iter']:4d} it",
                flush=True,
            )
    rows = []
    for name, lib, solver in METHODS:
        rec = last[name]
        rows.append(
            {
                "method": name,
                "library": lib,
                "solver": solver,
                "p": p,
                "times_s": times[name],
                "median_s": statistics.median(times[name]),
                "n_iter": rec["n_iter"],
                "hit_max_iter": bool(rec["hit_max_iter"]),
                "rel_error": rel_error(A, rec["E"], rec["B"]),
                "reported_rel_error": rec["reported_rel_error"],
            }
        )
    ref = next(r for r in rows if r["method"] == "sklearn mu")
    for r in rows:
        r["time_ratio_vs_sklearn_mu"] = r["median_s"] / ref["median_s"]
        r["error_ratio_vs_sklearn_mu"] = r["rel_error"] / ref["rel_error"]
    return rows


def bench_batched(classes, p, repeats, cuda=False):
    """classes: list of K (n_b, D) float32 arrays of equal shape. ours "mu" only."""
    A_t = torch.from_numpy(np.stack(classes))  # (K, n_b, D)
    singles = [torch.from_numpy(c).unsqueeze(0) for c in classes]
    devices = {"batched": A_t, **({"batched cuda": A_t.cuda()} if cuda else {})}
    times = {"batched": [], "loop": [], **({"batched cuda": []} if cuda else {})}
    out = {}
    for rep in range(repeats):
        for mode, A_d in devices.items():
            dt, res = run_ours(A_d, p, "mu")
            times[mode].append(dt)
            out[mode] = [
                (int(res.n_iter[k]), res.E[k].numpy(), res.B[k].numpy())
                for k in range(len(classes))
            ]
        t0 = time.perf_counter()
        loop_res = [
            nmf(a, p, solver="mu", init="random", tol=TOL, max_iter=MAX_ITER, seed=0)
            for a in singles
        ]
        times["loop"].append(time.perf_counter() - t0)
        out["loop"] = [(int(r.n_iter[0]), r.E[0].numpy(), r.B[0].numpy()) for r in loop_res]
        print(
            f"  p={p:<3d} rep {rep + 1}/{repeats}  "
            + "   ".join(f"{mode} {ts[-1]:8.3f} s" for mode, ts in times.items()),
            flush=True,
        )
    rows = []
    for mode in times:
        its = [it for it, _, _ in out[mode]]
        errs = [rel_error(c, E, B) for c, (_, E, B) in zip(classes, out[mode], strict=True)]
        rows.append(
            {
                "method": f"ours mu {mode}",
                "p": p,
                "K": len(classes),
                "shape": list(A_t.shape),
                "times_s": times[mode],
                "median_s": statistics.median(times[mode]),
                "n_iter_per_class": its,
                "total_class_iters": int(sum(its)),
                "rel_error_per_class": errs,
                "mean_rel_error": float(np.mean(errs)),
            }
        )
    loop = next(r for r in rows if r["method"] == "ours mu loop")
    for r in rows:
        r["speedup_vs_loop"] = loop["median_s"] / r["median_s"]
    return rows


# ----------------------------------------------------------------------------- reporting


def top_load_line():
    try:
        out = subprocess.run(["top", "-bn1"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if "load average" in line:
                return line.strip()
        return out.splitlines()[0].strip() if out else "(empty)"
    except (OSError, subprocess.SubprocessError) as e:
        return f"(top failed: {e})"


def machine_info(threads):
    pools = []
    try:
        for d in threadpool_info():
            pools.append(
                {
                    k: d.get(k)
                    for k in ("user_api", "internal_api", "num_threads", "version", "architecture")
                }
            )
    except ImportError as e:
        pools.append({"error": str(e)})
    return {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "sklearn": sklearn.__version__,
        "numpy": np.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "threads_requested": threads,
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
        "threadpools": pools,
        "top_load_before": top_load_line(),
    }


def fmt_table(rows):
    lines = [
        "| method | p | median s | iterations | rel. error | time ratio vs sklearn mu "
        "| error ratio vs sklearn mu |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        it = f"{r['n_iter']}{' (max)' if r['hit_max_iter'] else ''}"
        lines.append(
            f"| {r['method']} | {r['p']} | {r['median_s']:.3f} | {it} | {r['rel_error']:.5f} | "
            f"{r['time_ratio_vs_sklearn_mu']:.2f} | {r['error_ratio_vs_sklearn_mu']:.4f} |"
        )
    return "\n".join(lines)


def fmt_batched(rows):
    lines = [
        "| method | p | K × n × D | median s | iterations per class (min–max, total) "
        "| mean rel. error | speedup vs loop |",
        "|---|---:|---|---:|---|---:|---:|",
    ]
    for r in rows:
        its = r["n_iter_per_class"]
        K, n, D = r["shape"]
        lines.append(
            f"| {r['method']} | {r['p']} | {K} × {n} × {D} | {r['median_s']:.3f} | "
            f"{min(its)}–{max(its)}, {sum(its)} | {r['mean_rel_error']:.5f} | "
            f"{r['speedup_vs_loop']:.2f}× |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--repeats", type=int, default=None, help="timed repeats (default 3; 1 with --quick)"
    )
    ap.add_argument(
        "--rows", type=int, default=None, help="rows n of the class matrix (default 50000)"
    )
    ap.add_argument("--dim", type=int, default=None, help="feature dim D (default 512)")
    ap.add_argument("--classes", type=int, default=10, help="K for the batched case (default 10)")
    ap.add_argument(
        "--batch-rows",
        type=int,
        default=None,
        help="rows per class in the batched case (default 5000; 500 with --quick)",
    )
    ap.add_argument(
        "--features",
        type=Path,
        default=None,
        help=".npy of real (n, D) features (last axis = D) instead of synthetic data",
    )
    ap.add_argument(
        "--threads", type=int, default=2, help="torch / BLAS / OpenMP threads (default 2)"
    )
    ap.add_argument("--seed", type=int, default=0, help="data generator seed")
    ap.add_argument("--quick", action="store_true", help="smoke test: 5,000 × 128, 1 repeat")
    ap.add_argument("--skip-batched", action="store_true", help="skip the batched case")
    ap.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cuda: also time ours on the GPU (same data, copy not timed)",
    )
    ap.add_argument("--out", type=Path, default=RESULTS / "bench_nmf.json")
    args = ap.parse_args(argv)

    rows_n = args.rows or (5_000 if args.quick else 50_000)
    dim = args.dim or (128 if args.quick else 512)
    repeats = args.repeats or (1 if args.quick else 3)
    batch_rows = args.batch_rows or (500 if args.quick else 5_000)

    torch.set_num_threads(args.threads)
    if args.device == "cuda":
        METHODS.extend(GPU_METHODS)
    with threadpool_limits(limits=args.threads):
        info = machine_info(args.threads)
        print("## Machine")
        for k in (
            "platform",
            "processor",
            "machine",
            "cpu_count",
            "python",
            "torch",
            "sklearn",
            "numpy",
            "torch_num_threads",
            "gpu",
        ):
            print(f"- {k}: {info[k]}")
        ct = info["OPENBLAS_CORETYPE"]
        print(f"- OPENBLAS_CORETYPE: {'set to ' + repr(ct) if ct is not None else 'not set'}")
        for pool in info["threadpools"]:
            print(f"- threadpool: {pool}")
        print(f"- load (before): {info['top_load_before']}")
        load1 = os.getloadavg()[0]
        info["loadavg_1min_before"] = load1
        if load1 + args.threads > (os.cpu_count() or 1) + 0.5:
            print(
                f"- WARNING: 1-min load {load1:.2f} + {args.threads} threads > "
                f"{os.cpu_count()} CPUs: other work is running, and OpenMP/OpenBLAS threads "
                "that share a core slow small matmuls down by several times. Treat the "
                "timings as unreliable (compare --threads 1) or rerun on an idle machine."
            )

        # ---- data
        if args.features is not None:
            A = load_features(args.features, args.rows)
            data_doc = f"real features from {args.features}"
            if args.dim and args.dim != A.shape[1]:
                print(f"note: --dim {args.dim} ignored, features have D = {A.shape[1]}")
        else:
            A = make_class_matrix(rows_n, dim, args.seed)
            data_doc = GENERATOR_DOC.format(m=16, r=32)
        data = describe(A)
        floors = svd_floor(A, PS)
        print("\n## Data")
        print(f"- {data_doc}")
        print(
            f"- A: {data['shape'][0]} × {data['shape'][1]} {data['dtype']}, "
            f"{100 * data['frac_zero']:.1f}% zeros, mean {data['mean']:.4f}, max {data['max']:.3f}"
        )
        print(
            "- best rank-p rel. error (SVD floor): "
            + ", ".join(f"p={p}: {floors[p]:.5f}" for p in PS)
        )
        print(
            f"- stopping rule: tol={TOL}, max_iter={MAX_ITER}; init='random', seed/random_state 0; "
            f"{repeats} repeat(s), interleaved, median"
        )

        # ---- warm-up (untimed): first-call overheads, thread pools, allocator
        w = A[: min(1000, A.shape[0])]
        wt = torch.from_numpy(np.ascontiguousarray(w)).unsqueeze(0)
        for solver in ("mu", "hals"):
            nmf(wt, 3, solver=solver, max_iter=5)
            if args.device == "cuda":  # CUDA context, kernels, allocator: not in the first rep
                nmf(wt.cuda(), 3, solver=solver, max_iter=5).B.cpu()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            for solver in ("mu", "cd"):
                NMF(
                    n_components=3, solver=solver, init="random", max_iter=5, random_state=0
                ).fit_transform(w)

        # ---- single class
        print("\n## Single class")
        single = []
        for p in PS:
            single.extend(bench_single(A, p, repeats))
        print()
        print(fmt_table(single))
        print(
            "\nrel. error = ||A − EB||_F/||A||_F recomputed in float64 for every method; "
            "'(max)' = stopped at max_iter (sklearn: ConvergenceWarning)."
        )
        for r in single:
            d = abs(r["reported_rel_error"] - r["rel_error"])
            if d > 1e-3 * max(r["rel_error"], 1e-12):
                print(
                    f"note: {r['method']} p={r['p']}: library-reported rel. error "
                    f"{r['reported_rel_error']:.6f} vs recomputed {r['rel_error']:.6f}"
                )

        # ---- batched
        batched = []
        if not args.skip_batched:
            K = args.classes
            if args.features is not None:
                need = K * batch_rows
                if A.shape[0] < need:
                    batch_rows = A.shape[0] // K
                    print(
                        f"note: only {A.shape[0]} feature rows; batched case uses "
                        f"{K} × {batch_rows}"
                    )
                classes = [
                    np.ascontiguousarray(A[k * batch_rows : (k + 1) * batch_rows]) for k in range(K)
                ]
                bdoc = f"{K} consecutive row blocks of the real features"
            else:
                classes = [make_class_matrix(batch_rows, dim, args.seed + 1 + k) for k in range(K)]
                bdoc = f"{K} classes from the same generator, seeds {args.seed + 1}…{args.seed + K}"
            print(f"\n## Batched over classes (ours, solver 'mu'): {bdoc}")
            for p in PS:
                batched.extend(bench_batched(classes, p, repeats, cuda=args.device == "cuda"))
            print()
            print(fmt_batched(batched))
            print(
                "\nbatched = one nmf() call on (K, n, D); loop = K calls on (1, n, D). "
                "Inits differ (one draw of shape (K, …) vs K draws with seed 0), so per-class "
                "iterations and errors can differ slightly."
            )

        info["top_load_after"] = top_load_line()
        info["loadavg_1min_after"] = os.getloadavg()[0]
        print(f"\n- load (after): {info['top_load_after']}")

    result = {
        "config": {
            "rows": int(A.shape[0]),
            "dim": int(A.shape[1]),
            "repeats": repeats,
            "quick": args.quick,
            "threads": args.threads,
            "device": args.device,
            "tol": TOL,
            "max_iter": MAX_ITER,
            "ps": list(PS),
            "classes": args.classes,
            "batch_rows": batch_rows,
            "features": str(args.features) if args.features else None,
            "seed": args.seed,
            "argv": sys.argv[1:] if argv is None else list(argv),
        },
        "machine": info,
        "data": {
            **data,
            "generator": data_doc,
            "svd_floor_rel_error": {str(p): v for p, v in floors.items()},
        },
        "single_class": single,
        "batched": batched,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
