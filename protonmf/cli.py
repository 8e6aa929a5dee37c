"""``protonmf`` command line: convert, inspect, verify, evaluate, serve.

``convert`` and ``verify`` need the convert extra (torch, timm); ``inspect`` and
``evaluate`` need only the artifact and onnxruntime.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from protonmf.artifact.manifest import Manifest
from protonmf.artifact.store import ArtifactError, load_manifest

# The folder the protonmf package is imported from: the source checkout, or site-packages
# after a wheel install (``bentoml serve --working-dir``).
PACKAGE_ROOT = Path(__file__).resolve().parents[1]
# convert's defaults: in a source checkout only (a wheel ships neither)
CHECKOUT_DEFAULTS = {
    "model": Path("models") / "fashion-resnet",
    "data": Path("data") / "fashion-mnist",
}
DEFAULT_MODEL = PACKAGE_ROOT / CHECKOUT_DEFAULTS["model"]
DEFAULT_DATA = PACKAGE_ROOT / CHECKOUT_DEFAULTS["data"]
DEFAULT_ARTIFACT = Path("artifacts") / "fashion-default"


def _add_convert(sub):
    p = sub.add_parser("convert", help="timm classifier + labelled images -> artifact directory")
    p.add_argument(
        "--model",
        help="timm local-dir model folder, or a timm architecture name with "
        "--checkpoint (default in a source checkout: the embedded "
        "Fashion-MNIST ResNet, models/fashion-resnet)",
    )
    p.add_argument("--checkpoint", help="weights file (.safetensors or .pth) for --model NAME")
    p.add_argument(
        "--model-kwargs",
        type=json.loads,
        default={},
        help='JSON kwargs for timm.create_model, e.g. \'{"global_pool": "avg"}\'',
    )
    p.add_argument(
        "--data",
        help="ImageFolder ROOT/<class>/<image>, or ROOT with train/ and val/ or "
        "test/ (the latter held out for verify), or a Fashion-MNIST IDX "
        "folder (train-* for prototypes, t10k-* held out; default in a "
        "source checkout: data/fashion-mnist)",
    )
    p.add_argument("--heldout", help="held-out ImageFolder for verification (overrides split)")
    p.add_argument("--max-per-class", type=int, help="cap on images per class")
    _add_nmf_options(p)
    _add_run_options(p)


def _add_nmf_options(p) -> None:
    """How the class features are factorised and the head rebuilt."""
    p.add_argument(
        "-p", "--prototypes", dest="p", type=int, default=3, help="prototypes per class (default 3)"
    )
    p.add_argument(
        "--solver",
        choices=["mu", "hals"],
        default="mu",
        help="NMF solver: mu = Lee-Seung (the paper), hals (faster)",
    )
    p.add_argument(
        "--init",
        choices=["random", "paper"],
        default="random",
        help="NMF init: random = |Gaussian| scaled (default), paper = clipped Gaussian",
    )
    p.add_argument("--tol", type=float, default=1e-4, help="NMF relative error-change stop")
    p.add_argument("--max-iter", type=int, default=200, help="NMF iteration cap")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nonneg", action="store_true", help="constrain coefficients a >= 0 (cvxpy)")
    p.add_argument(
        "--min-sum-ratio",
        type=float,
        default=0.5,
        help="guard: below this |sum a|/||a||_1 fold the residual by the "
        "minimum-norm split instead of Eq. 8's R/sum(a) (default 0.5)",
    )


def _add_run_options(p) -> None:
    """Where and how the conversion runs, and what it writes."""
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--exemplars",
        type=int,
        default=8,
        metavar="M",
        help="keep the M training images where each prototype is most present, "
        "with its presence maps (default 8; 0: none)",
    )
    p.add_argument(
        "--memory-budget",
        metavar="BYTES",
        help="feature grids held at once, e.g. 2G: classes are streamed in chunks "
        "that fit (default: 512M, or a quarter of the memory available if less)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="reuse the finished NMF batches a killed conversion to the same --out "
        "left (.OUT.parts/); without it a conversion starts afresh",
    )
    p.add_argument(
        "--shard",
        type=_shard,
        metavar="I/N",
        help="convert only shard I of N (every N-th NMF batch of classes) into the "
        "parts folder beside --out; then --merge writes the artifact",
    )
    p.add_argument(
        "--merge",
        action="store_true",
        help="write the artifact from the shards' parts; refuse if any is missing",
    )
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="image decoding processes (default: the cores but one, at most 8; "
        "0: decode in the main process)",
    )
    p.add_argument(
        "--rtol",
        type=float,
        default=1e-5,
        help="exit 1 if the ONNX graph's max relative logit difference from the "
        "black box on the held-out images exceeds this (default 1e-5)",
    )
    _add_head_modes(p)
    p.add_argument("--out", default=str(DEFAULT_ARTIFACT), help="artifact directory to write")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_head_modes(p) -> None:
    p.add_argument(
        "--maps",
        choices=["auto", "topk", "all", "none"],
        default="auto",
        help="similarity maps in the graph: top-k classes only, all, none; "
        "auto (default): all when classes <= 2k, else top-k",
    )
    p.add_argument(
        "--scores",
        choices=["auto", "topk", "all"],
        default="auto",
        help="per-prototype scores/contributions in the graph: for the top-k classes "
        "+ pooled features (any class stays computable) or all classes; "
        "auto (default): all when classes <= 2k, else top-k",
    )
    p.add_argument(
        "-k",
        "--topk",
        dest="k",
        type=int,
        default=5,
        help="k for the top-k maps and scores (default 5)",
    )
    p.add_argument(
        "--presence",
        action="store_true",
        help="also output Eq. 9's presence maps (least-squares presence of each "
        "prototype per position) beside the similarity maps",
    )


def _cmd_export(args) -> int:
    from protonmf.converter.reexport import reexport

    out = reexport(
        args.artifact,
        args.out,
        maps=args.maps,
        scores=args.scores,
        k=args.k,
        presence=args.presence,
    )
    print(_summary(load_manifest(out), out))
    print(f"artifact: {out}")
    return 0


def checkout_defaults(model: str | None, data: str | None) -> tuple[str, str]:
    """``--model`` and ``--data``, the source checkout's Fashion-MNIST defaults for those not
    given; ValueError (one line, exit 2) naming what to pass where the checkout's folder is
    not there (an installed wheel)."""
    given = {"model": model, "data": data}
    defaults = {"model": DEFAULT_MODEL, "data": DEFAULT_DATA}
    missing = [k for k, v in given.items() if v is None and not defaults[k].exists()]
    if missing:
        flags = " and ".join(f"--{k}" for k in missing)
        where = ", ".join(str(CHECKOUT_DEFAULTS[k]) for k in missing)
        exist = "exists" if len(missing) == 1 else "exist"
        default = "default" if len(missing) == 1 else "defaults"
        raise ValueError(
            f"no {flags} given and the embedded {default} ({where}) {exist} only "
            "in a source checkout; pass --model DIR|NAME and --data DIR"
        )
    return (model or str(DEFAULT_MODEL)), (data or str(DEFAULT_DATA))


def _cmd_convert(args) -> int:
    model, data = checkout_defaults(args.model, args.data)
    from protonmf.converter.convert import ConvertConfig, NotExactError, convert, memory_budget

    cfg = ConvertConfig(
        model=model,
        data=data,
        out=args.out,
        checkpoint=args.checkpoint,
        model_kwargs=args.model_kwargs,
        heldout=args.heldout,
        max_per_class=args.max_per_class,
        p=args.p,
        solver=args.solver,
        init=args.init,
        tol=args.tol,
        max_iter=args.max_iter,
        seed=args.seed,
        nonneg=args.nonneg,
        min_sum_ratio=args.min_sum_ratio,
        device=args.device,
        batch_size=args.batch_size,
        maps=args.maps,
        k=args.k,
        scores=args.scores,
        exemplars=args.exemplars,
        presence=args.presence,
        rtol=args.rtol,
        progress=not args.quiet,
        memory_budget=memory_budget(args.memory_budget) if args.memory_budget else None,
        workers=args.workers,
        resume=args.resume,
        shard=args.shard,
        merge=args.merge,
    )
    try:
        out = convert(cfg)
    except NotExactError as e:
        print(f"protonmf convert: error: {e}", file=sys.stderr)
        return 1
    if args.shard is not None:
        print(f"shard {args.shard[0]}/{args.shard[1]}: NMF batches saved in {out}")
        return 0
    manifest = load_manifest(out)
    print(_summary(manifest, out))
    print(f"artifact: {out}")
    return 0


def _summary(manifest: dict, path) -> str:
    m = Manifest.of(manifest)
    d, conv, graph = m.diagnostics, m.conversion, m.graph
    ex = d.torch_exactness
    grid = "x".join(map(str, m.feature_grid or ()))
    lines = [
        f"ProtoNMF artifact {path} (format v{m.format_version}, protonmf {m.protonmf_version})",
        f"  backbone     {m.backbone.get('architecture')} ({m.backbone.get('model')})",
        f"  head         {m.head.kind}, features {m.feature_dim} x {grid}",
        f"  classes      {d.classes_total} ({d.classes_explained} explained by prototypes)",
        f"  prototypes   p={m.p} per class, solver {conv.get('solver')}, "
        f"{conv.get('n_images')} images",
        f"  guarded      {len(d.guarded_classes)} classes folded by the min-norm split",
        f"  rebuild      max ||sum a b' - V|| / ||V|| = {_sci(d.max_rebuild_rel_error)}",
        *_torch_line(ex),
        *_onnx_line(d.onnx_exactness),
        f"  exemplars    {_exemplars_text(m.exemplars)}",
        f"  graph        {', '.join(graph.outputs)} (opset {graph.opset}; "
        f"scores {graph.scores}, maps {graph.maps})",
        f"  input        {graph.input.shape} {m.preprocessing.color_mode}",
    ]
    return "\n".join(lines)


def _sci(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2e}"


def _torch_line(ex) -> list[str]:
    if ex is None:
        return []
    return [
        f"  exactness    torch: max rel logit diff {ex.max_rel_logit_diff:.2e}, "
        f"top-1 agreement {ex.top1_agreement:.2%} on {ex.n_images} images"
    ]


def _onnx_line(ex) -> list[str]:
    if ex is None:
        return []  # artifacts before format 4
    return [
        f"  exactness    onnx ({ex.provider}): max rel logit diff "
        f"{ex.max_rel_logit_diff:.2e}, top-1 agreement {ex.top1_agreement:.2%}"
    ]


def _exemplars_text(info: dict | None) -> str:
    if not info:
        return "none"
    return (
        f"{info['m']} per prototype ({', '.join(info['kinds'])}; "
        f"{info.get('images', '?')} distinct images)"
    )


def check_artifact(artifact) -> dict:
    """Everything a server checks before it serves: checksums, tensors against the manifest,
    exemplars, and the graph's input/outputs against the manifest (onnxruntime loads it).
    Raises ArtifactError with the reason; returns the manifest."""
    from protonmf.artifact.exemplars import load_exemplars

    manifest = load_manifest(artifact)
    from protonmf.graph import GraphSession  # onnxruntime: the serve extra

    explainer = GraphSession.load(artifact, device="cpu", threads=1)
    load_exemplars(artifact, explainer.manifest)
    return manifest


def _cmd_inspect(args) -> int:
    manifest = check_artifact(args.artifact)
    if args.json:
        print(json.dumps(manifest, indent=2))
    else:
        print(_summary(manifest, args.artifact))
    return 0


def _cmd_verify(args) -> int:
    from protonmf.converter.verify import verify

    report = verify(
        args.artifact,
        args.data,
        device=args.device,
        batch_size=args.batch_size,
        max_images=args.max_images,
        progress=not args.json,
    )
    _print_report(report, args.json)
    ok = report["top1_agreement"] == 1.0 and report["max_rel_logit_diff"] <= args.rtol
    return 0 if ok else 1


def _cmd_evaluate(args) -> int:
    import time

    from protonmf.analysis.evaluate import FAITH_IMAGES, evaluate, format_report, parse_p_list

    ps = parse_p_list(args.sweep_p) if args.sweep_p else None  # refuse a bad list up front
    faith_images = FAITH_IMAGES if args.faith_images is None else (args.faith_images or None)
    report = evaluate(
        args.artifact,
        args.data,
        device=args.device,
        batch_size=args.batch_size,
        progress=not args.json,
        max_images=args.max_images,
        faith_steps=args.faith_steps,
        faith_images=faith_images,
        faithfulness_on=not args.no_faithfulness,
    )
    if ps:
        try:
            from protonmf.converter.sweep import sweep
        except ImportError as e:
            raise ValueError(f"--sweep-p needs the convert extra (torch, timm): {e}") from None
        start = time.perf_counter()
        report["sweep"] = sweep(
            args.artifact,
            ps,
            data=args.data,
            max_images=args.max_images,
            device=args.device,
            progress=not args.json,
        )
        report["seconds"]["sweep"] = round(time.perf_counter() - start, 2)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def _print_report(report: dict, as_json: bool):
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        for k, v in report.items():
            if not isinstance(v, dict):
                print(f"{k:>26}  {v}")


def serve_command(args, environ: dict) -> tuple[list[str], dict]:
    """The ``bentoml serve`` command line and environment for ``protonmf serve``'s flags.
    --workers / --max-batch-size override PROTONMF_WORKERS / PROTONMF_MAX_BATCH_SIZE."""
    env = dict(
        environ,
        PROTONMF_ARTIFACT=str(Path(args.artifact).resolve()),
        PROTONMF_DEVICE=args.device,
        PROTONMF_VARIANT=args.variant,
        PROTONMF_GRPC_PORT=str(args.grpc_port),
        PROTONMF_GRPC_HOST=args.host,
        BENTOML_DO_NOT_TRACK="true",
    )
    if args.workers is not None:
        env["PROTONMF_WORKERS"] = str(args.workers)
    if args.max_batch_size is not None:
        env["PROTONMF_MAX_BATCH_SIZE"] = str(args.max_batch_size)
    cmd = [
        sys.executable,
        "-m",
        "bentoml",
        "serve",
        "protonmf.service.service:ProtoNMFService",
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--working-dir",
        str(PACKAGE_ROOT),
    ]
    return cmd, env


def preflight(settings) -> None:
    """The worker's own load, without its warm-up: settings that cannot work on this machine
    (CUDA without a GPU, CUDA graphs on the CPU, nvImageCodec missing) stop ``serve`` here
    with their reason (exit 2), instead of failing in a worker that BentoML restarts
    forever. What it loads goes with this process when ``bentoml serve`` replaces it."""
    from protonmf.graph import ProviderError
    from protonmf.service.engine.pipeline import Engine

    try:
        Engine.load(settings, warm=False)
    except ProviderError as e:  # a RuntimeError: the machine, not a bug, so one line
        raise ValueError(str(e)) from e


def _cmd_serve(args) -> int:
    """Replace this process with ``bentoml serve`` so its PID is the server's."""
    from protonmf.service.ops.settings import Settings

    check_artifact(args.artifact)  # refuse a bad artifact here, with the reason, exit 2
    cmd, env = serve_command(args, os.environ)
    settings = Settings.from_env(env)  # and a bad PROTONMF_* variable (SettingsError names it)
    preflight(settings)
    grpc = f" and grpc://{args.host}:{args.grpc_port}" if args.grpc_port > 0 else ""
    print(f"serving {args.artifact} on http://{args.host}:{args.port}{grpc}", flush=True)
    os.execve(sys.executable, cmd, env)
    return 0  # not reached


def _cmd_variants(args) -> int:
    from protonmf.converter.variants import add_variants

    kinds = [k for k, on in (("int8", args.int8), ("fp16", args.fp16)) if on]
    if not kinds:
        raise ValueError("choose at least one of --int8, --fp16")
    variants = add_variants(args.artifact, kinds)
    print(json.dumps(variants, indent=2))
    return 0


def _cmd_report(args) -> int:
    from protonmf.analysis.report import write_report

    evaluation = json.loads(Path(args.evaluation).read_text()) if args.evaluation else None
    classes = args.classes.split(",") if args.classes else None
    out = write_report(
        args.artifact,
        args.out,
        data=args.data,
        max_images=args.max_images,
        evaluation=evaluation,
        classes=classes,
        progress=not args.quiet,
    )
    print(f"report: {out.resolve()} ({out.stat().st_size / 1e6:.1f} MB)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="protonmf", description=__doc__.splitlines()[0])
    ap.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = ap.add_subparsers(dest="command", required=True)
    _add_convert(sub)
    p = sub.add_parser("inspect", help="summarise an artifact")
    p.add_argument("artifact")
    p.add_argument("--json", action="store_true", help="print the full manifest as JSON")
    _add_verify_evaluate(sub)
    p = sub.add_parser(
        "export",
        help="write an artifact's graph again in other --maps/--scores "
        "modes (no NMF; int8/fp16 variants are dropped)",
    )
    p.add_argument("artifact")
    _add_head_modes(p)
    p.add_argument("--out", help="write a new artifact here (default: replace ARTIFACT's graph)")
    p = sub.add_parser("variants", help="add int8 / fp16 graphs with measured agreement")
    p.add_argument("artifact")
    p.add_argument("--int8", action="store_true", help="static QDQ int8 (CPU), calibrated")
    p.add_argument("--fp16", action="store_true", help="half precision (for GPUs)")
    _add_serve(sub)
    _add_report(sub)
    return ap


def _add_verify_evaluate(sub) -> None:
    for name, text in (
        ("verify", "ONNX graph vs the original model: exactness on images"),
        ("evaluate", "accuracy of the ONNX graph on labelled images"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("artifact")
        p.add_argument("--data", help="ImageFolder (default: the artifact's held-out images)")
        p.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu")
        p.add_argument("--batch-size", type=int, default=32)
        p.add_argument("--json", action="store_true")
        if name == "verify":
            p.add_argument("--max-images", type=int)
            p.add_argument(
                "--rtol",
                type=float,
                default=1e-5,
                help="exit 1 if max_rel_logit_diff exceeds this (default 1e-5)",
            )
        if name == "evaluate":
            p.add_argument(
                "--max-images",
                type=_positive_int,
                help="evaluate on this many images, evenly spread over the classes",
            )
            p.add_argument(
                "--faith-steps",
                type=_positive_int,
                default=10,
                help="deletion/insertion curve points: fractions 0, 1/N, ..., 1 of "
                "the feature grid's cells (default 10)",
            )
            p.add_argument(
                "--faith-images",
                type=int,
                metavar="N",
                help="images the deletion/insertion curves run on, evenly spread "
                "(default 128: ~108 graph runs each; 0: all)",
            )
            p.add_argument(
                "--no-faithfulness",
                action="store_true",
                help="skip the deletion/insertion curves (the slow part)",
            )
            p.add_argument(
                "--sweep-p",
                metavar="P,P,...",
                help="also redo NMF + head fit for each p, e.g. 1,3,5,10 (the "
                "paper's Fig. 5 / Table 3; needs torch: features extracted once)",
            )


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="serve an artifact over REST (BentoML)")
    p.add_argument("artifact", nargs="?", default=str(DEFAULT_ARTIFACT))
    p.add_argument("--port", type=int, default=3000, help="HTTP (REST) port")
    # defaults from the environment a container or pod sets (deploy/k8s/base/protonmf.env)
    env = os.environ.get
    p.add_argument(
        "--grpc-port",
        type=int,
        default=int(env("PROTONMF_GRPC_PORT", "50051")),
        help="gRPC port; 0 turns gRPC off (default: PROTONMF_GRPC_PORT or 50051)",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument(
        "--device",
        choices=["cpu", "cuda", "auto"],
        default=env("PROTONMF_DEVICE", "cpu"),
        help="default: PROTONMF_DEVICE or cpu",
    )
    p.add_argument(
        "--variant",
        default=env("PROTONMF_VARIANT", "fp32"),
        help="graph: fp32 (exact), int8, fp16 (default: PROTONMF_VARIANT or fp32)",
    )
    p.add_argument(
        "--workers",
        type=_positive_int,
        help="worker processes (default: PROTONMF_WORKERS or 1); with several, "
        "each gets CPUs/workers onnxruntime threads — one per core is the CPU "
        "throughput setting",
    )
    p.add_argument(
        "--max-batch-size",
        type=_positive_int,
        help="images per onnxruntime run, per worker (default: PROTONMF_MAX_BATCH_SIZE or 32)",
    )


def _add_report(sub) -> None:
    p = sub.add_parser(
        "report",
        help="one self-contained HTML page: evaluation, plots, "
        "reading and the prototype atlas with exemplars",
    )
    p.add_argument("artifact")
    p.add_argument(
        "--data", help="labelled images to evaluate on (default: the artifact's held-out images)"
    )
    p.add_argument("--max-images", type=_positive_int, help="evaluate on at most N images")
    p.add_argument(
        "--evaluation",
        metavar="JSON",
        help="use a saved `protonmf evaluate --json` output (e.g. with --sweep-p) "
        "instead of evaluating again",
    )
    p.add_argument(
        "--classes",
        help="comma-separated class names or indices for the atlas "
        "(default: all; a 1,000-class atlas is a large page)",
    )
    p.add_argument("--out", required=True, help="HTML file to write")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _shard(text: str) -> tuple[int, int]:
    """ "I/N" → (I, N); the Kubernetes Indexed Job passes $JOB_COMPLETION_INDEX as I."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N, e.g. 0/4, got {text!r}") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"needs 0 <= I < N, got {text!r}")
    return i, n


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # every module logs under "protonmf" (protonmf.converter.*, protonmf.service.*)
    logging.getLogger("protonmf").setLevel(logging.INFO if args.verbose else logging.WARNING)
    handlers = {
        "convert": _cmd_convert,
        "inspect": _cmd_inspect,
        "verify": _cmd_verify,
        "evaluate": _cmd_evaluate,
        "serve": _cmd_serve,
        "variants": _cmd_variants,
        "export": _cmd_export,
        "report": _cmd_report,
    }
    try:
        return handlers[args.command](args)
    except (ArtifactError, FileNotFoundError, ValueError) as e:
        print(f"protonmf {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        if (e.name or "protonmf").split(".")[0] == "protonmf":
            raise  # one of ours missing: a bug, keep the traceback
        # a dependency of an extra not installed (torch for convert, bentoml for serve, …)
        print(
            f"protonmf {args.command}: error: {e}: install the extra this command needs "
            "(pip install 'protonmf[convert]' or 'protonmf[serve]')",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
