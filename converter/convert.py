"""The conversion pipeline: timm model + labelled images → ProtoNMF artifact directory.

load model → analyse head → extract features per class → NMF (batched over classes)
→ head fit (Eq. 4–5) → fold residual (Eq. 8, guarded) → exemplars (Eq. 2's E, Eq. 9's E')
→ torch exactness check → ONNX export → ONNX exactness check (onnxruntime, the graph
the service runs) → artifact (written atomically)
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import protonmf
from protonmf.artifact import Preprocessing, preprocess, scratch, write_artifact
from protonmf.artifact.exemplars import EXEMPLARS_FILE, KINDS, save_exemplars
from protonmf.converter.exemplars import assemble, presence_filters, rank_class
from protonmf.converter.export import export_onnx, graph_spec
from protonmf.converter.head import Fold, fit_coefficients, fold_residual
from protonmf.converter.models import (
    HeadSpec,
    ModelSource,
    analyse_head,
    features_nhwc,
    load_model,
    preprocessing_from_timm,
)
from protonmf.converter.nmf import nmf
from protonmf.converter.protomodel import ProtoModel
from protonmf.data import Sample, find_split, load_samples

__all__ = [
    "ConvertConfig",
    "NotExactError",
    "class_names_of",
    "convert",
    "extract_features",
    "logits_of",
    "onnx_exactness",
]

log = logging.getLogger(__name__)


@dataclass
class ConvertConfig:
    """Everything ``protonmf convert`` takes (CLI flags map one to one)."""

    model: str
    data: str
    out: str
    checkpoint: str | None = None
    model_kwargs: dict = field(default_factory=dict)
    heldout: str | None = None
    max_per_class: int | None = None
    p: int = 3
    solver: str = "mu"
    init: str = "random"
    tol: float = 1e-4
    max_iter: int = 200
    seed: int = 0
    nonneg: bool = False
    min_sum_ratio: float = 0.5
    device: str = "auto"
    batch_size: int = 64
    maps: str = "auto"
    scores: str = "auto"
    k: int = 5
    exemplars: int = 8  # per prototype and kind; 0: none
    memory_budget: int | None = None  # bytes of feature grids held at once (None: a share of RAM)
    workers: int | None = None  # decoding processes (None: default_workers())
    nmf_batch_floats: float | None = None  # NMF's padded batch of classes (None: by device)
    resume: bool = False  # reuse the finished NMF batches a killed run left (Parts)
    shard: tuple[int, int] | None = None  # (i, N): only NMF batches j with j % N == i, no artifact
    merge: bool = False  # every NMF batch must come from the shards' parts: refuse to compute
    presence: bool = False  # Eq. 9 presence maps as a graph output
    rtol: float = 1e-5  # the ONNX graph's largest relative logit difference allowed
    progress: bool = True


class NotExactError(RuntimeError):
    """The exported graph's logits differ from the black box's beyond the tolerance."""


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device")
    return torch.device(name)


def class_names_of(model) -> tuple[list[str], list[str] | None]:
    """The model's class names (and descriptions), from its pretrained_cfg or ImageNet info."""
    cfg = model.pretrained_cfg
    n = model.num_classes
    names = cfg.get("label_names")
    if isinstance(names, dict):
        names = [names.get(i, names.get(str(i), str(i))) for i in range(n)]
    descriptions = None
    if not names and n in (1000, 11821, 12000, 21841, 21843, 22000):
        from timm.data import ImageNetInfo

        info = ImageNetInfo(f"imagenet-{n // 1000}k" if n != 1000 else "imagenet-1k")
        names = info.label_names()
        descriptions = [info.index_to_description(i) for i in range(n)]
    names = list(names) if names else [str(i) for i in range(n)]
    if len(names) != n:
        raise ValueError(f"model has {n} classes but {len(names)} label names")
    return names, descriptions


class _Images(torch.utils.data.Dataset):
    """Samples decoded and preprocessed (in a DataLoader worker when there are workers)."""

    def __init__(self, samples: list[Sample], prep: Preprocessing):
        self.samples, self.prep = samples, prep

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        s = self.samples[i]
        return torch.from_numpy(preprocess(s.open(), self.prep)), s.label


def default_workers() -> int:
    """Decoding processes beside the model: the cores but one, at most 8 (0: in-process)."""
    return max(0, min(8, len(os.sched_getaffinity(0)) - 1))


def _batches(
    samples: list[Sample], prep: Preprocessing, batch_size: int, workers: int = 0, pin: bool = False
):
    """(images (n, c, h, w), labels) in sample order; decoding in ``workers`` processes
    (torch's DataLoader), so the model rather than PIL sets the pace."""
    loader = torch.utils.data.DataLoader(
        _Images(samples, prep), batch_size=batch_size, num_workers=workers, pin_memory=pin
    )
    for x, labels in loader:
        yield x, labels.tolist()


@torch.no_grad()
def extract_features(
    model, head: HeadSpec, samples, prep, batch_size, device, progress=True, workers: int = 0
):
    """Raw feature grids per class: {class: tensor (n_images, H, W, D)} (float32, CPU).
    Each class's tensor is allocated once and filled in place (a list of grids stacked at
    the end held them twice)."""
    counts: dict[int, int] = {}
    for s in samples:
        counts[s.label] = counts.get(s.label, 0) + 1
    per_class: dict[int, torch.Tensor] = {}
    filled = dict.fromkeys(counts, 0)
    bar = tqdm(total=len(samples), desc="features", unit="img", disable=not progress)
    pin = torch.device(device).type == "cuda"
    for x, labels in _batches(samples, prep, batch_size, workers, pin):
        grid = features_nhwc(model, model.forward_features(x.to(device)), head.layout).float()
        for g, y in zip(grid.cpu(), labels, strict=True):
            if y not in per_class:
                per_class[y] = torch.empty(counts[y], *g.shape)
            per_class[y][filled[y]] = g
            filled[y] += 1
        bar.update(len(labels))
    bar.close()
    return per_class


@torch.no_grad()
def logits_of(module, samples, prep, batch_size=64, device="cpu", progress=False, workers=0):
    """Outputs of ``module`` on samples: the first output if it returns a tuple."""
    outs = []
    for x, _ in tqdm(_batches(samples, prep, batch_size, workers), disable=not progress):
        y = module(x.to(device))
        outs.append((y[0] if isinstance(y, tuple) else y).float().cpu())
    return torch.cat(outs)


def _run_nmf(features, classes, p, cfg, device, progress, keep_E=False):
    """NMF for every class with images, in chunks that fit memory. Returns dict per class
    (with keep_E, its factor E as (n, H, W, p) float32: the NMF presence maps)."""
    D = next(iter(features.values())).shape[-1]
    rows = {c: f.shape[0] * f.shape[1] * f.shape[2] for c, f in features.items()}
    results = {}
    iters = tqdm(total=None, desc=f"NMF ({cfg.solver}, p={p})", unit="it", disable=not progress)
    for chunk in nmf_groups(rows, D, device, cfg.nmf_batch_floats):
        n_max = max(rows[c] for c in chunk)
        A = torch.zeros(len(chunk), n_max, D, device=device)
        for j, c in enumerate(chunk):
            A[j, : rows[c]] = features[c].reshape(-1, D)
            A[j, : rows[c]].clamp_(min=0)  # clip before NMF only; in place: no copy of A
        n_rows = torch.tensor([rows[c] for c in chunk], device=device)
        # one seed per class (seed + class index): a class factorises alike whichever
        # classes share its batch, so streamed (chunked) conversions match in-memory ones
        res = nmf(
            A,
            p,
            n_rows=n_rows,
            solver=cfg.solver,
            init=cfg.init,
            tol=cfg.tol,
            max_iter=cfg.max_iter,
            seeds=[cfg.seed + c for c in chunk],
            progress=iters,
        )
        for j, c in enumerate(chunk):
            results[c] = dict(
                B=res.B[j].double().cpu().numpy(),
                iterations=int(res.n_iter[j]),
                feature_rel_error=float(res.rel_error[j]),
            )
            if keep_E:
                shape = (*features[c].shape[:3], p)
                results[c]["E"] = res.E[j, : rows[c]].float().cpu().numpy().reshape(shape)
    iters.close()
    return results


def nmf_groups(
    rows: dict[int, int], D: int, device, budget: float | None = None
) -> list[list[int]]:
    """Classes (index order) in the batches NMF factorises together: consecutive classes
    while the zero-padded batch stays under a float budget. Decided by the row counts
    alone, so a streamed conversion, whose chunks are whole groups, runs the same batches
    as an in-memory one (same numbers to the bit)."""
    if budget is None:  # floats per padded batch
        budget = 2e8 if torch.device(device).type == "cuda" else 5e7
    groups: list[list[int]] = []
    for c in sorted(rows):
        group = groups[-1] if groups else None
        if group and (len(group) + 1) * max(rows[x] for x in [*group, c]) * D <= budget:
            group.append(c)
        else:
            groups.append([c])
    return groups


def memory_budget(text: str | None = None) -> int:
    """Bytes of feature grids a conversion holds at once: ``text`` such as "2G", "512M" or
    a byte count; default 512 MiB, or a quarter of the memory available now if less (at
    least 256 MiB). Classes are streamed in chunks of NMF batches that fit it."""
    if text:
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
        t = str(text).strip().upper().removesuffix("B").removesuffix("I")
        try:
            value = float(t[:-1]) * units[t[-1]] if t[-1:] in units else float(t)
        except ValueError:
            raise ValueError(f"--memory-budget {text!r}: give bytes or e.g. 512M, 2G") from None
        if value <= 0:
            raise ValueError(f"--memory-budget must be > 0, got {text!r}")
        return int(value)
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return max(256 << 20, min(512 << 20, available // 4))


def class_chunks(
    groups: list[list[int]], counts: dict[int, int], bytes_per_image: int, budget: int
) -> list[list[int]]:
    """Whole NMF groups (``nmf_groups``) packed in order into chunks whose feature grids
    fit ``budget`` (a group larger than the budget is a chunk of its own)."""
    chunks, current, used = [], [], 0
    for group in groups:
        need = sum(counts[c] for c in group) * bytes_per_image
        if current and used + need > budget:
            chunks.append(current)
            current, used = [], 0
        current += group
        used += need
    return chunks + ([current] if current else [])


class Parts:
    """Finished NMF batches of a conversion, one safetensors file each, beside ``--out``
    (``.NAME.parts/``): what ``--resume`` picks up after a kill. A part's name hashes
    everything its numbers depend on (weights, settings, device kind, its classes and their
    images), so a changed input is recomputed, never reused. Removed once the artifact is
    written; a run without ``--resume`` starts from none."""

    def __init__(self, out: str, fingerprint: dict, resume: bool):
        out = Path(out).resolve()
        self.dir = out.with_name(f".{out.name}.parts")
        self.fingerprint = fingerprint
        if not resume:
            shutil.rmtree(self.dir, ignore_errors=True)
        self.reused = 0

    def _path(self, group: list[int], by_class: dict) -> Path:
        names = {c: [_sample_name(x) for x in by_class[c]] for c in group}
        text = json.dumps({**self.fingerprint, "classes": names}, sort_keys=True, default=str)
        return (
            self.dir
            / f"{group[0]}-{group[-1]}-{hashlib.sha256(text.encode()).hexdigest()[:16]}.safetensors"
        )

    def load(self, group, by_class) -> tuple[dict, dict] | None:
        path = self._path(group, by_class)
        if not path.is_file():
            return None
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as f:
            meta = json.loads(f.metadata()["classes"])
            t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open API)
        nmf_out = {int(c): {**meta[c], "B": t[f"{c}.B"]} for c in meta}
        ranked = {
            int(c): {
                kind: (t[f"{c}.{kind}.index"], t[f"{c}.{kind}.score"], t[f"{c}.{kind}.maps"])
                for kind in ("augmented", "nmf")
            }
            for c in meta
            if f"{c}.nmf.index" in t
        }
        self.reused += 1
        return nmf_out, ranked

    def save(self, group, by_class, nmf_out: dict, ranked: dict) -> None:
        from safetensors.numpy import save_file

        tensors, meta = {}, {}
        for c in group:
            tensors[f"{c}.B"] = nmf_out[c]["B"]
            meta[str(c)] = {k: v for k, v in nmf_out[c].items() if k != "B"}
            for kind, (idx, score, maps) in ranked.get(c, {}).items():
                tensors.update(
                    {f"{c}.{kind}.index": idx, f"{c}.{kind}.score": score, f"{c}.{kind}.maps": maps}
                )
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self._path(group, by_class)
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"classes": json.dumps(meta)})
        tmp.rename(path)  # a part is there whole or not at all

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _sample_name(sample: Sample) -> str:
    return sample.name or str(sample.source)


def _stream_classes(model, head, by_class, prep, V, grid_hw, cfg, device, workers, parts):
    """Features → NMF → exemplar candidates, one chunk of classes at a time, so that peak
    memory follows the largest chunk (``--memory-budget``), not the data set. Keeps per
    class only B, the diagnostics and the exemplar candidates; each finished NMF batch is
    saved to ``parts`` (``--resume`` skips those, features and all)."""
    H, W = grid_hw
    # a chunk's grids, NMF's clipped copy and its products: ~3× the grids' float32 bytes
    per_image = 3 * H * W * V.shape[1] * 4
    budget = cfg.memory_budget or memory_budget()
    counts = {c: len(v) for c, v in by_class.items()}
    groups = nmf_groups(
        {c: n * H * W for c, n in counts.items()}, V.shape[1], device, cfg.nmf_batch_floats
    )
    chunks = class_chunks(groups, counts, per_image, budget)
    log.info(
        "%d images in %d chunk(s) of classes (budget %.0f MB)",
        sum(counts.values()),
        len(chunks),
        budget / 2**20,
    )
    mine = set(range(len(groups)))
    if cfg.shard is not None:  # a shard's batches: every N-th, so each shard gets big and small
        i, n = cfg.shard
        mine = {j for j in mine if j % n == i}
    nmf_out, ranked = {}, {}
    for chunk in chunks:
        todo = _reuse_parts(chunk, groups, mine, parts, by_class, cfg.merge, nmf_out, ranked)
        if not todo:
            continue
        nmf_out.update(
            _factorise(model, head, todo, by_class, prep, V, cfg, device, workers, ranked)
        )
        for group in (g for g in groups if g[0] in todo):
            parts.save(group, by_class, nmf_out, ranked)
    if parts.reused:
        log.info("resumed %d finished NMF batch(es) of %d", parts.reused, len(groups))
    return nmf_out, ranked


def _reuse_parts(chunk, groups, mine, parts, by_class, merge, nmf_out, ranked) -> list[int]:
    """The classes of ``chunk`` still to compute: this run's NMF batches (``mine``) in the
    chunk that have no finished part; the finished ones go into ``nmf_out`` and
    ``ranked``. With ``merge`` a missing part is refused."""
    todo = []
    for j, group in enumerate(groups):
        if group[0] not in chunk or j not in mine:
            continue
        done = parts.load(group, by_class)
        if done is None and merge:
            raise ValueError(
                f"--merge: NMF batch {j} (classes {group[0]}–{group[-1]}) has "
                f"no finished part in {parts.dir}; run its shard first"
            )
        if done is None:
            todo += group
        else:
            nmf_out.update(done[0])
            ranked.update(done[1])
    return todo


def _factorise(model, head, chunk, by_class, prep, V, cfg, device, workers, ranked) -> dict:
    """Features and NMF for the classes of ``chunk`` (their grids are freed on return):
    the NMF results per class; with exemplars, each class's ranked candidates into
    ``ranked``."""
    features = extract_features(
        model,
        head,
        [s for c in chunk for s in by_class[c]],
        prep,
        cfg.batch_size,
        device,
        cfg.progress,
        workers,
    )
    out = _run_nmf(features, None, cfg.p, cfg, device, cfg.progress, keep_E=cfg.exemplars > 0)
    if cfg.exemplars > 0:
        # the served prototypes b' of these classes: the fit and fold are per class, so
        # the same as the whole-model fit in _fit_head
        B = np.stack([out[c]["B"] for c in chunk])
        a, R = fit_coefficients(V[chunk], B, nonneg=cfg.nonneg)
        folded = fold_residual(a, B, R, min_sum_ratio=cfg.min_sum_ratio).prototypes
        filters = presence_filters(folded)
        for j, c in enumerate(chunk):
            ranked[c] = rank_class(features[c], out[c].pop("E"), filters[j], cfg.exemplars)
    return out


def _fingerprint(cfg: ConvertConfig, source: ModelSource, device) -> dict:
    """What a finished NMF batch's numbers depend on besides its classes' images."""
    keep = (
        "p",
        "solver",
        "init",
        "tol",
        "max_iter",
        "seed",
        "nonneg",
        "min_sum_ratio",
        "exemplars",
        "nmf_batch_floats",
        "model_kwargs",
    )
    return {
        **{k: getattr(cfg, k) for k in keep},
        "model": source.to_dict(),
        "device": torch.device(device).type,
        "torch": torch.__version__,
        "protonmf": protonmf.__version__,
    }


@dataclass
class _Loaded:
    """Phase 1's result: the black box, its preprocessing, classes and analysed head."""

    source: ModelSource
    model: torch.nn.Module
    prep: Preprocessing
    head: HeadSpec
    classes: list[str]
    descriptions: list[str] | None
    V: np.ndarray  # (C, D) float64 class vectors the prototypes rebuild
    grid_hw: tuple[int, int]  # the feature grid H × W


@dataclass
class _Split:
    """Phase 2's result: the conversion images (per class) and where held-out ones are."""

    train_dir: Path
    heldout_dir: Path | None
    samples: list[Sample]
    by_class: dict[int, list[Sample]]


@dataclass
class _HeadFit:
    """Phase 4's result: Eq. 4's coefficients, Eq. 5's residual and Eq. 8's fold."""

    B: np.ndarray  # (C, p, D) NMF prototypes (0 for classes without images)
    R: np.ndarray  # (C, D) residuals
    fold: Fold
    rebuild_err: np.ndarray  # (C,) ||Σ a b' − V|| / ||V||, before the no-image fallback
    per_class: list[dict]  # the manifest's per-class diagnostics
    filters: np.ndarray  # (C·p, D) Eq. 9's presence filters of the served prototypes


def convert(cfg: ConvertConfig) -> Path:
    """Run the whole conversion; returns the artifact directory. With ``shard=(i, N)`` only
    that shard's NMF batches (saved as parts; returns their folder); with ``merge`` the
    artifact from the shards' parts, computing none.

    Phases: validate → load the model and analyse its head → load the images → features,
    NMF and exemplar candidates, chunk by chunk (resumable parts; a shard stops here) →
    fit the coefficients and fold the residual → torch exactness check → manifest → ONNX
    export, ONNX exactness check and the artifact → refuse an inexact graph."""
    _validate(cfg)
    device = _device(cfg.device)
    torch.manual_seed(cfg.seed)
    loaded = _load_and_analyse(cfg, device)
    images = _load_images(cfg, loaded.classes)
    workers = default_workers() if cfg.workers is None else cfg.workers
    keep = cfg.resume or cfg.merge or cfg.shard is not None  # shards share one parts folder
    parts = Parts(cfg.out, _fingerprint(cfg, loaded.source, device), keep)
    nmf_out, ranked = _stream_classes(
        loaded.model,
        loaded.head,
        images.by_class,
        loaded.prep,
        loaded.V,
        loaded.grid_hw,
        cfg,
        device,
        workers,
        parts,
    )
    if cfg.shard is not None:
        log.info("shard %d/%d: its NMF batches are saved in %s", *cfg.shard, parts.dir)
        return parts.dir
    fit = _fit_head(cfg, loaded, images, nmf_out)
    exemplars = None
    if cfg.exemplars > 0:
        exemplars = assemble(
            ranked,
            images.by_class,
            loaded.prep,
            (len(loaded.classes), cfg.p, cfg.exemplars, *loaded.grid_hw),
            Path(images.train_dir),
        )
    proto, check_samples, want, exact = _check_torch(cfg, loaded, images, fit, device, workers)
    manifest = _build_manifest(cfg, loaded, images, fit, exact, device, exemplars)
    out, onnx_exact = _export_artifact(
        cfg, loaded, fit, proto.cpu(), manifest, exemplars, want, check_samples
    )
    parts.remove()
    _refuse_inexact(out, onnx_exact, cfg.rtol)
    return out


def _validate(cfg: ConvertConfig) -> None:
    """Refuse settings that cannot work, before anything is loaded."""
    if cfg.p < 1:
        raise ValueError(f"p must be >= 1, got {cfg.p}")
    if cfg.exemplars < 0:
        raise ValueError(f"--exemplars must be >= 0, got {cfg.exemplars}")
    if cfg.shard is not None and not (cfg.shard[1] >= 1 and 0 <= cfg.shard[0] < cfg.shard[1]):
        raise ValueError(f"--shard i/N needs 0 <= i < N, got {cfg.shard[0]}/{cfg.shard[1]}")
    if cfg.shard is not None and cfg.merge:
        raise ValueError("--shard and --merge exclude each other: run the shards, then merge")


def _load_and_analyse(cfg: ConvertConfig, device: torch.device) -> _Loaded:
    """The black box on ``device``, its preprocessing and class names, and its head
    analysed on a random probe batch (refused unless exactly convertible); -p checked
    against the feature dimension."""
    source = ModelSource(cfg.model, cfg.checkpoint, cfg.model_kwargs or None)
    model = load_model(source).to(device)
    prep = preprocessing_from_timm(model)
    classes, descriptions = class_names_of(model)
    probe = torch.randn(2, prep.channels, prep.height, prep.width, device=device)
    head = analyse_head(model, probe)
    log.info("head: %s (layout %s)", head.kind, head.layout)
    if cfg.p > head.weight.shape[1]:
        raise ValueError(
            f"-p {cfg.p} exceeds the feature dimension D = {head.weight.shape[1]}: at most D "
            "prototypes per class can be linearly independent (and C·p·D floats are stored)"
        )
    with torch.no_grad():
        grid_hw = tuple(features_nhwc(model, model.forward_features(probe), head.layout).shape[1:3])
    return _Loaded(
        source=source,
        model=model,
        prep=prep,
        head=head,
        classes=classes,
        descriptions=descriptions,
        V=head.class_vectors.cpu().numpy(),
        grid_hw=grid_hw,
    )


def _load_images(cfg: ConvertConfig, classes: list[str]) -> _Split:
    """The conversion images (``--data``'s train part, at most ``--max-per-class`` each),
    grouped by class, and the held-out folder (``--heldout`` or the data's split)."""
    train_dir, split_heldout = find_split(cfg.data)
    heldout_dir = Path(cfg.heldout) if cfg.heldout else split_heldout
    samples = load_samples(train_dir, classes, cfg.max_per_class)
    by_class: dict[int, list[Sample]] = {}
    for s in samples:
        by_class.setdefault(s.label, []).append(s)
    return _Split(train_dir=train_dir, heldout_dir=heldout_dir, samples=samples, by_class=by_class)


def _fit_head(cfg: ConvertConfig, loaded: _Loaded, images: _Split, nmf_out: dict) -> _HeadFit:
    """Eq. 4–5 (coefficients a, residual R) and Eq. 8 (fold, guarded) for every class,
    the per-class diagnostics, then the fallback: classes without images (or whose
    prototypes explain nothing of V) keep V whole as prototype 0 with a = (1, 0, …), so
    logits stay exact and the class is flagged unexplained."""
    V = loaded.V
    C, D = V.shape
    B = np.zeros((C, cfg.p, D))
    for c, r in nmf_out.items():
        B[c] = r["B"]
    a, R = fit_coefficients(V, B, nonneg=cfg.nonneg)
    fold = fold_residual(a, B, R, min_sum_ratio=cfg.min_sum_ratio)
    rebuilt = np.einsum("cp,cpd->cd", fold.coefficients, fold.prototypes)
    rebuild_err = np.linalg.norm(rebuilt - V, axis=1) / np.maximum(
        np.linalg.norm(V, axis=1), 1e-300
    )
    per_class = [
        _class_diagnostics(c, loaded, images, nmf_out.get(c), R, fold, rebuild_err)
        for c in range(C)
    ]
    for c in range(C):
        if c not in nmf_out:
            fold.prototypes[c] = 0.0
            fold.prototypes[c, 0] = V[c]
            fold.coefficients[c] = 0.0
            fold.coefficients[c, 0] = 1.0
    return _HeadFit(
        B=B,
        R=R,
        fold=fold,
        rebuild_err=rebuild_err,
        per_class=per_class,
        filters=presence_filters(fold.prototypes),
    )


def _class_diagnostics(
    c: int,
    loaded: _Loaded,
    images: _Split,
    r: dict | None,
    R: np.ndarray,
    fold: Fold,
    rebuild_err: np.ndarray,
) -> dict:
    """One entry of the manifest's diagnostics.per_class (``r``: the class's NMF result,
    None when it had no images)."""
    V = loaded.V
    return {
        "class": loaded.classes[c],
        "n_images": len(images.by_class.get(c, [])),
        "explained": r is not None,
        "nmf_iterations": r["iterations"] if r else 0,
        "feature_rel_error": r["feature_rel_error"] if r else None,
        "head_rel_error": float(np.linalg.norm(R[c]) / max(np.linalg.norm(V[c]), 1e-300)),
        "sum_a_ratio": float(fold.sum_ratio[c]),
        "fold": "no_images" if r is None else fold.method[c],
        "rebuild_rel_error": float(rebuild_err[c]),
    }


def _check_torch(
    cfg: ConvertConfig, loaded: _Loaded, images: _Split, fit: _HeadFit, device, workers: int
) -> tuple[ProtoModel, list[Sample], np.ndarray, dict]:
    """The prototype model (torch) vs the black box on the held-out images (else the first
    256 conversion images): (the model, those images, the black box's logits, exactness)."""
    proto = ProtoModel(
        loaded.model,
        loaded.head,
        fit.fold.prototypes,
        fit.fold.coefficients,
        maps=cfg.maps,
        k=cfg.k,
        scores=cfg.scores,
        presence_filters=fit.filters if cfg.presence else None,
    )
    proto = proto.eval().to(device)
    check_samples = (
        load_samples(images.heldout_dir, loaded.classes, cfg.max_per_class)
        if images.heldout_dir
        else images.samples[:256]
    )
    prep, model = loaded.prep, loaded.model
    want = logits_of(model, check_samples, prep, cfg.batch_size, device, workers=workers)
    got = logits_of(proto, check_samples, prep, cfg.batch_size, device, workers=workers)
    want, got = want.double().numpy(), got.double().numpy()
    exact = exactness(want, got)
    log.info("torch exactness: %s", exact)
    return proto, check_samples, want, exact


def _build_manifest(
    cfg: ConvertConfig,
    loaded: _Loaded,
    images: _Split,
    fit: _HeadFit,
    exact: dict,
    device,
    exemplars,
) -> dict:
    """The manifest, less what the export adds (graph, diagnostics.onnx_exactness)."""
    head, per_class = loaded.head, fit.per_class
    manifest = {
        "protonmf_version": protonmf.__version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "classes": loaded.classes,
        "class_descriptions": loaded.descriptions,
        "p": cfg.p,
        "feature_dim": loaded.V.shape[1],
        "feature_grid": list(loaded.grid_hw),
        "head": {"kind": head.kind, "layout": head.layout, "norm_eps": head.norm_eps},
        "backbone": {
            "architecture": loaded.model.pretrained_cfg.get("architecture"),
            **loaded.source.to_dict(),
        },
        "preprocessing": loaded.prep.to_dict(),
        "conversion": _conversion_record(cfg, images, device),
        "diagnostics": {
            "classes_explained": sum(1 for d in per_class if d["explained"]),
            "classes_total": len(loaded.classes),
            "max_rebuild_rel_error": float(fit.rebuild_err.max()),
            "guarded_classes": [d["class"] for d in per_class if d["fold"] == "min_norm"],
            "torch_exactness": exact,
            "per_class": per_class,
        },
    }
    if exemplars is not None:
        manifest["exemplars"] = {
            "file": EXEMPLARS_FILE,
            "m": cfg.exemplars,
            "kinds": list(KINDS),
            "ranking": "peak",
            "images": len(exemplars.thumbnails),
        }
    return manifest


def _conversion_record(cfg: ConvertConfig, images: _Split, device) -> dict:
    """The manifest's "conversion": the settings (not memory_budget/workers/resume/shard/
    merge: how the work was done, not what it computed) and the data used."""
    return {
        **{
            k: v
            for k, v in asdict(cfg).items()
            if k not in ("out", "progress", "memory_budget", "workers", "resume", "shard", "merge")
        },
        "data": str(Path(images.train_dir).resolve()),
        "heldout": str(images.heldout_dir.resolve()) if images.heldout_dir else None,
        "device": device.type,
        "n_images": len(images.samples),
    }


def _export_artifact(
    cfg: ConvertConfig,
    loaded: _Loaded,
    fit: _HeadFit,
    proto: ProtoModel,
    manifest: dict,
    exemplars,
    want: np.ndarray,
    check_samples,
) -> tuple[Path, dict]:
    """ONNX export, the graph's exactness on ``check_samples`` (onnxruntime) and the
    artifact written atomically: (its directory, the ONNX exactness). ``manifest`` gets
    the graph spec and diagnostics.onnx_exactness."""
    prep = loaded.prep
    input_shape = (prep.channels, prep.height, prep.width)
    with scratch(cfg.out, "export") as tmp:
        onnx_path = export_onnx(proto, input_shape, Path(tmp) / "model.onnx")
        manifest["graph"] = graph_spec(proto, input_shape, loaded.grid_hw)
        onnx_exact = onnx_exactness(onnx_path, want, check_samples, prep, cfg.batch_size)
        manifest["diagnostics"]["onnx_exactness"] = {**onnx_exact, "rtol": cfg.rtol}
        log.info("onnx exactness: %s", onnx_exact)
        extra = {}
        if exemplars is not None:
            save_exemplars(Path(tmp) / EXEMPLARS_FILE, exemplars)
            extra[EXEMPLARS_FILE] = Path(tmp) / EXEMPLARS_FILE
        out = write_artifact(cfg.out, manifest, _tensors(loaded, fit), onnx_path, extra_files=extra)
    return out, onnx_exact


def _tensors(loaded: _Loaded, fit: _HeadFit) -> dict[str, np.ndarray]:
    """prototypes.safetensors' tensors (float32)."""
    fold = fit.fold
    return {
        "prototypes": fold.prototypes.astype(np.float32),
        "nmf_prototypes": fit.B.astype(np.float32),
        "coefficients": fold.coefficients.astype(np.float32),
        "residuals": fit.R.astype(np.float32),
        "class_vectors": loaded.V.astype(np.float32),
        "bias": loaded.head.effective_bias.cpu().numpy().astype(np.float32),
        "fold_weights": fold.weights.astype(np.float32),
        "presence_filters": fit.filters.astype(np.float32),
    }


def _refuse_inexact(out: Path, onnx_exact: dict, rtol: float) -> None:
    """NotExactError when the written graph's logits are not the black box's (top-1
    disagreement, or a relative logit difference above ``rtol``)."""
    if onnx_exact["top1_agreement"] < 1.0 or onnx_exact["max_rel_logit_diff"] > rtol:
        raise NotExactError(
            f"{out}: the ONNX graph is not exact on {onnx_exact['n_images']} images "
            f"(max rel logit diff {onnx_exact['max_rel_logit_diff']:.3g} > rtol {rtol:g} "
            f"or top-1 agreement {onnx_exact['top1_agreement']:.2%}); the artifact is written "
            "for inspection, do not serve it as exact (see `protonmf verify`)"
        )


def onnx_exactness(onnx_path, want: np.ndarray, samples, prep, batch_size) -> dict:
    """The exported graph, run by onnxruntime on the CPU as the service runs it, vs the
    black box's logits ``want`` on the same images: what ``protonmf verify`` reports."""
    from protonmf.graph import create_session

    session, provider = create_session(onnx_path, "cpu")
    got = np.concatenate(
        [
            session.run(["logits"], {"image": x.numpy()})[0]
            for x, _ in _batches(samples, prep, batch_size)
        ]
    )
    return {**exactness(want, got.astype(np.float64)), "provider": provider}


def exactness(want: np.ndarray, got: np.ndarray) -> dict:
    """max_rel_logit_diff = max over images of max_c |Δ| / max_c |logit| (per image)."""
    scale = np.maximum(np.abs(want).max(1), 1e-12)
    rel = np.abs(got - want).max(1) / scale
    return {
        "max_rel_logit_diff": float(rel.max()),
        "max_abs_logit_diff": float(np.abs(got - want).max()),
        "top1_agreement": float((got.argmax(1) == want.argmax(1)).mean()),
        "n_images": int(len(want)),
    }
