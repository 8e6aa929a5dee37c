"""The transport-free core: decode → preprocess → ONNX run → explanation → JSON-able dict.

The data plane (dataplane.py) calls these pieces: ``prepare`` per image in its decode
threads, ``infer`` once per merged batch (batching.py), ``per_image`` back into images, then the
explanation building per image. Nothing here knows a transport.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from protonmf.artifact import normalize
from protonmf.artifact.exemplars import Exemplars, load_exemplars

from protonmf.service.decode.pool import decode_crop
from protonmf.service.ops.errors import Unprocessable
from protonmf.service.decode.images import Limits, render_exemplar_strip, render_overlay
from protonmf.service.ops.metrics import METRICS, class_label, stage
from protonmf.graph import GraphSession

__all__ = ["MAP_KINDS", "Core", "ExplainOptions", "Intervention"]

# similarity: F·b' (the graph's maps); contribution: a·F·b' [/σ], whose spatial mean is the
# prototype's contribution; presence: Eq. 9's E' (graph output, only with --presence)
MAP_KINDS = ("similarity", "contribution", "presence")
# the graph's per-prototype maps: by far its largest outputs, fetched only when drawn
MAP_OUTPUTS = frozenset({"maps", "topk_maps", "presence", "topk_presence"})
# folds where prototype 0 is V itself: the whole logit is residual, nothing is NMF's
ALL_RESIDUAL_FOLDS = ("class_vector", "no_images")


@dataclass(frozen=True)
class Intervention:
    """Switch prototype ``prototype`` of class ``class_name`` (name or index) off."""

    class_name: str | int
    prototype: int


@dataclass(frozen=True)
class ExplainOptions:
    top_k: int = 3
    heatmaps: bool = True
    box_percentile: float = 90.0
    interventions: tuple[Intervention, ...] = field(default_factory=tuple)
    map_kind: str = "similarity"  # one of MAP_KINDS


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


class Core:
    """An artifact ready to serve: limits, preprocessing, graph, explanation building."""

    def __init__(self, explainer: GraphSession, limits: Limits | None = None,
                 exemplars: Exemplars | None = None):  # fmt: skip
        self.explainer = explainer
        self.exemplars = exemplars
        # PROTONMF_JPEG_DECODER=nvimgcodec: JPEG pixels from the GPU (gpu_decode.py)
        self.jpeg_decoder = None
        self.limits = limits or Limits()
        m = explainer.manifest
        self.manifest = m
        self.classes: list[str] = m["classes"]
        self.descriptions: list[str] | None = m.get("class_descriptions")
        self.spec = explainer.preprocessing
        self.p: int = m["p"]
        self.grid = tuple(m["feature_grid"])
        self.graph_k: int = m["graph"].get("k") or 0
        self.scores_mode: str = m["graph"].get("scores", "all")
        self.maps_mode: str = m["graph"].get("maps", "topk")
        # how many of the top classes have similarity maps in the graph's outputs
        self.map_classes = {"all": len(self.classes), "topk": self.graph_k}.get(self.maps_mode, 0)
        self.coefficients = explainer.tensors["coefficients"]
        self.tensors = explainer.tensors
        self.has_pooled = "pooled" in explainer.output_shapes
        self.has_presence = bool(m["graph"].get("presence")) and bool(
            {"presence", "topk_presence"} & set(explainer.output_shapes))
        self.folds: list[str] = [d.get("fold", "sum") for d in m["diagnostics"]["per_class"]]
        self._all_residual = [f in ALL_RESIDUAL_FOLDS for f in self.folds]
        head = m.get("head", {})
        self._norm_eps = head.get("norm_eps", 0.0) if head.get("kind") == "avg_norm_linear" else None
        self._index = {name: i for i, name in enumerate(self.classes)}
        self._gap_max = 0.0
        self._shapes = {name: shape[1:] for name, shape in explainer.output_shapes.items()}
        self.crop_shape = (self.spec.height, self.spec.width) + (
            () if self.spec.color_mode == "L" else (3,)
        )

    @classmethod
    def load(cls, artifact: str | os.PathLike, device: str = "cpu", threads: int | None = None,
             limits: Limits | None = None, variant: str = "fp32", spinning: bool = True,
             cuda: dict | None = None, io_binding: str = "off", cuda_graphs: bool = False,
             buckets=None) -> Core:  # fmt: skip
        """``io_binding``, ``cuda_graphs``, ``buckets``: see ``GraphSession.load``."""
        explainer = GraphSession.load(Path(artifact), device, threads, variant, spinning, cuda,
                                   io_binding=io_binding, cuda_graphs=cuda_graphs,
                                   buckets=buckets)  # fmt: skip
        # exemplars are read once here (thumbnails and maps: ~1 MB for Fashion's 10 classes)
        return cls(explainer, limits, load_exemplars(artifact, explainer.manifest))

    # --- per image, before batching ---------------------------------------------------

    def prepare(self, data: bytes) -> np.ndarray:
        """Untrusted bytes → uint8 crop the model reads. Raises InvalidInput and subclasses.
        The decode processes (decode_pool.py) run the same ``decode_crop``."""
        with stage("decode"):
            return decode_crop(data, self.limits, self.spec, self.jpeg_decoder)

    def warm_up(self, max_batch: int, sizes: list[int] | None = None) -> list[int]:
        """Run the graph on blank crops before the service says ready; returns the sizes run.

        ``sizes``: the batch buckets when batches are padded to them (every size a batch
        can have). Else on CPU the largest batch and a single image (allocation, planning);
        on CUDA every size from max_batch down to 1: the CUDA provider prepares cuDNN
        convolutions per input shape (~5 ms per conv layer even with the heuristic search)
        — measured on an H100, a batch of a size not seen before took 140–380 ms against
        ~6 ms once seen. With CUDA graphs (``sizes`` are then the buckets) each size runs
        ``explainer.warm_up_runs`` times, so its graph is captured before ready.
        """
        cuda = self.explainer.provider == "CUDAExecutionProvider"
        sizes = sizes or (self.explainer.graphs.sizes if self.explainer.graphs else None)
        if sizes:
            sizes = sorted(set(sizes), reverse=True)
        else:
            sizes = list(range(max_batch, 0, -1)) if cuda else sorted({max_batch, 1}, reverse=True)
        for n in sizes:
            for _ in range(self.explainer.warm_up_runs):
                self.explainer.run(normalize(np.zeros((n, *self.crop_shape), np.uint8), self.spec))
        return sizes

    # --- one merged batch ---------------------------------------------------------------

    def infer(self, crops: np.ndarray, outputs=None) -> dict[str, np.ndarray]:
        """uint8 crops (N, ...) → graph outputs by name (``outputs``: those only), one
        onnxruntime run."""
        with stage("infer"):
            METRICS.batch_size.observe(len(crops))
            return self.explainer.run(normalize(crops, self.spec), outputs)

    def outputs_for(self, maps: str | None = None) -> frozenset[str]:
        """The graph outputs an answer needs: every output but the maps, plus the maps of
        ``maps`` (a map kind) when the answer draws or lists them."""
        names = set(self._shapes)
        wanted = names - MAP_OUTPUTS
        if maps == "presence":
            wanted |= names & {"presence", "topk_presence"}
        elif maps is not None:
            wanted |= names & {"maps", "topk_maps"}
        return frozenset(wanted)

    @staticmethod
    def per_image(outputs: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        """One merged batch's outputs → each image's (views, no copies)."""
        n = len(outputs["logits"])
        return [{name: value[i] for name, value in outputs.items()} for i in range(n)]

    # --- explanation building, per image ------------------------------------------------

    def check_request(self, n_images: int, options: ExplainOptions | None = None) -> None:
        if n_images < 1:
            raise Unprocessable("the request has no images", "no_images")
        if n_images > self.limits.max_images:
            from protonmf.service.ops.errors import PayloadTooLarge

            raise PayloadTooLarge(
                f"{n_images} images in one request; the limit is {self.limits.max_images}",
                "too_many_images",
            )
        if options is None:
            return
        if not 1 <= options.top_k <= len(self.classes):
            raise Unprocessable(f"top_k must be in 1..{len(self.classes)}, got {options.top_k}",
                                "top_k_out_of_range")  # fmt: skip
        if options.map_kind not in MAP_KINDS:
            raise Unprocessable(f"map_kind must be one of {list(MAP_KINDS)}, got "
                                f"{options.map_kind!r}", "unknown_map_kind")  # fmt: skip
        if options.heatmaps:
            self.check_maps(options.top_k, options.map_kind)
        if not 0 <= options.box_percentile <= 100:
            raise Unprocessable(f"box_percentile must be in 0..100, got {options.box_percentile}")
        if len(options.interventions) > self.limits.max_interventions:
            raise Unprocessable(
                f"{len(options.interventions)} interventions; the limit is "
                f"{self.limits.max_interventions}", "too_many_interventions"
            )  # fmt: skip
        self.resolve(options.interventions)

    def check_maps(self, top_k: int, kind: str = "similarity") -> None:
        """Unprocessable unless the graph has maps (of ``kind``) for the ``top_k`` best classes."""
        if self.map_classes == 0:
            raise Unprocessable("this artifact's graph has no similarity maps (converted with "
                                "--maps none); ask with heatmaps=false", "no_maps")  # fmt: skip
        if top_k > self.map_classes:
            raise Unprocessable(
                f"heatmaps are computed for the top {self.map_classes} classes; ask for "
                f"top_k <= {self.map_classes} or heatmaps=false", "top_k_exceeds_graph"
            )  # fmt: skip
        if kind == "presence" and not self.has_presence:
            raise Unprocessable("this artifact's graph has no presence maps (export it with "
                                "--presence)", "no_presence_maps")  # fmt: skip

    def class_maps(self, out: dict, c: int, rank: int, kind: str = "similarity") -> np.ndarray:
        """Class ``c``'s p maps (p, H, W) of ``kind``; ``rank`` is its place in the top-k."""
        if kind == "presence":
            return out["presence"][c] if self.maps_mode == "all" else out["topk_presence"][rank]
        maps = out["maps"][c] if self.maps_mode == "all" else out["topk_maps"][rank]
        if kind == "contribution":  # a_ci F·b'_ci [/σ]: its spatial mean is contribution_ci
            scale = self.coefficients[c].astype(np.float64) * self._map_inv_sigma(out)
            return maps * scale[:, None, None]
        return maps

    def class_index(self, name: str | int, context: str = "") -> int:
        """A class name, index or decimal index string → index; Unprocessable if unknown."""
        c = name
        if isinstance(c, str) and c in self._index:
            c = self._index[c]
        elif isinstance(c, str) and c.isascii() and c.isdigit() and len(c) <= 9:
            # ASCII digits only: str.isdigit alone takes "²" and "①" (int() refuses them)
            # and "٣" (int() reads 3); nine digits keep int() far from its 4,300-digit limit
            c = int(c)
        if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < len(self.classes):
            shown = repr(name) if len(repr(name)) <= 80 else repr(name)[:80] + "…"
            raise Unprocessable(f"unknown class {shown}{context}", "unknown_class")
        return c

    def check_prototype(self, c: int, prototype: int) -> None:
        if not 0 <= prototype < self.p:
            raise Unprocessable(f"class {self.classes[c]!r} has prototypes 0..{self.p - 1}, "
                                f"got {prototype}", "unknown_prototype")  # fmt: skip

    def resolve(self, interventions) -> list[tuple[int, int]]:
        """(class name or index, prototype) pairs → index pairs; Unprocessable if unknown."""
        pairs = []
        for iv in interventions:
            c = self.class_index(iv.class_name, " in intervention")
            self.check_prototype(c, iv.prototype)
            pairs.append((c, iv.prototype))
        return pairs

    def terms(self, out: dict, c: int) -> tuple[np.ndarray, np.ndarray, float]:
        """Class ``c``'s per-prototype scores and contributions (p,) and its bias, one image.

        From the graph's outputs; with ``scores="topk"`` a class outside the graph's top-k
        (an intervention elsewhere, a tie broken the other way) is computed here from the
        pooled features, with the graph's formula (protomodel.py) in float64."""
        if self.scores_mode == "all":
            return out["scores"][c], out["contributions"][c], float(out["bias"][c])
        ranks = np.flatnonzero(out["topk_classes"] == c)
        if ranks.size:
            r = ranks[0]
            return out["topk_scores"][r], out["topk_contributions"][r], float(out["topk_bias"][r])
        tensors = self.explainer.tensors
        pooled = out["pooled"].astype(np.float64)  # (D,)
        scores = tensors["prototypes"][c].astype(np.float64) @ pooled  # (p,)
        contributions = scores * self.coefficients[c]
        bias = float(tensors["bias"][c])
        if self._norm_eps is not None:  # LayerNorm head: contributions / σ, bias − μ/σ · Σ_d V_cd
            inv_sigma = self._inv_sigma(pooled)
            contributions = contributions * inv_sigma
            bias -= pooled.mean() * inv_sigma * float(tensors["class_vectors"][c].sum(dtype=np.float64))
        return scores, contributions, bias

    def _inv_sigma(self, pooled: np.ndarray) -> float:
        """1/σ(f) of a LayerNorm head (1 for a plain one), from the pooled features f."""
        if self._norm_eps is None:
            return 1.0
        return float(1.0 / np.sqrt(((pooled - pooled.mean()) ** 2).mean() + self._norm_eps))

    def _map_inv_sigma(self, out: dict) -> float:
        """1/σ for the contribution maps; an old LayerNorm graph without ``pooled`` (format
        ≤ 3, all scores) still tells it: contribution / (a · score) of its largest term."""
        if self._norm_eps is None:
            return 1.0
        if "pooled" in out:
            return self._inv_sigma(out["pooled"].astype(np.float64))
        raw = self.coefficients.astype(np.float64) * out["scores"]
        j = np.unravel_index(int(np.abs(raw).argmax()), raw.shape)
        return float(out["contributions"][j] / raw[j])

    def residuals(self, out: dict, classes) -> dict[int, np.ndarray] | None:
        """residual_ci = a_ci (Δ_ci · f) [/σ] (p,) in float64 for each of ``classes``, from
        the pooled features f; None where the graph has no ``pooled``. Δ_ci = b'_ci − b_ci
        (= w_ci R_c), or all of b'_ci where prototype 0 is V (fold class_vector / no_images).
        Only the classes asked for, in one gather: a 1,000-class model pays for a few (p, D)."""
        if "pooled" not in out:
            return None
        cs = sorted({int(c) for c in classes})
        f = out["pooled"].astype(np.float64)
        delta = self.tensors["prototypes"][cs].astype(np.float64)  # (n, p, D)
        folded = [k for k, c in enumerate(cs) if not self._all_residual[c]]
        delta[folded] -= self.tensors["nmf_prototypes"][[cs[k] for k in folded]]
        values = self.coefficients[cs] * (delta @ f) * self._inv_sigma(f)
        return dict(zip(cs, values, strict=True))

    def split(self, out: dict, c: int, contributions: np.ndarray, residuals: dict | None = None):
        """Class ``c``'s contributions (p,) split exactly into (NMF part, residual part),
        float64, Σ of the two = the contributions; None where the graph has no ``pooled``.
        nmf_ci = contribution_ci − residual_ci (= a_ci (b_ci · f) [/σ]); all residual, the
        NMF part 0, where prototype 0 is V. ``residuals``: from ``residuals`` if at hand."""
        if residuals is None or c not in residuals:
            residuals = self.residuals(out, [c])
            if residuals is None:
                return None
        contributions = np.asarray(contributions, np.float64)
        if self._all_residual[c]:
            return np.zeros_like(contributions), contributions
        return contributions - residuals[c], residuals[c]

    def rival(self, logits: np.ndarray, c: int) -> int | None:
        """The best other class: the runner-up for the top class, the top class for the rest."""
        if len(logits) < 2:
            return None
        others = np.array(logits, np.float64)
        others[c] = -np.inf
        return int(np.argmax(others))

    def residual_share(self, out: dict, c: int, residual: float, bias: float,
                       residuals: dict | None = None) -> dict:  # fmt: skip
        """How much of class ``c``'s logit (without bias) and of its margin over its rival
        o (``rival``) the residual r carries: r_c / (logit_c − bias_c) and
        (r_c − r_o) / (logit_c − logit_o); null where the denominator is 0."""
        logits = out["logits"].astype(np.float64)
        logit = logits[c] - bias
        share = {"logit": float(residual / logit) if abs(logit) > 1e-12 else None,
                 "margin": None, "versus": None}  # fmt: skip
        o = self.rival(logits, c)
        if o is None:
            return share
        share["versus"] = self.classes[o]
        r_o = self.split(out, o, self.terms(out, o)[1], residuals)[1].sum()
        margin = logits[c] - logits[o]
        if abs(margin) > 1e-12:
            share["margin"] = float((residual - r_o) / margin)
        return share

    def _exemplar_entries(self, c: int, i: int, kind: str = "augmented") -> list[dict]:
        """``Exemplars.entries(c, i, kind)``, built from plain lists: iterating numpy
        scalars cost ~25 µs per prototype, a third of /explain's time at top-3."""
        ex = self.exemplars
        if ex is None or kind not in ex.index:
            return []
        index, score = ex.index[kind][c, i].tolist(), ex.score[kind][c, i].tolist()
        return [{"image": u, "source": ex.sources[u], "presence": s}
                for u, s in zip(index, score, strict=True) if u >= 0]  # fmt: skip

    def _class_entry(self, out, c, probs, rank, options, residuals=None):
        logit = float(out["logits"][c])
        scores, contributions, bias = self.terms(out, c)
        entry = {
            "class": self.classes[c],
            "index": int(c),
            "description": self.descriptions[c] if self.descriptions else None,
            "logit": logit,
            "probability": float(probs[c]),
            "bias": bias,
            "exactness_gap": float(logit - contributions.sum() - bias),
            "residual_share": None,
            "prototypes": [],
        }
        parts = self.split(out, c, contributions, residuals)
        if parts is not None:
            entry["residual_share"] = self.residual_share(out, c, parts[1].sum(), bias, residuals)
        nmf, residual = parts if parts is not None else ([None] * self.p,) * 2
        maps = None
        if options.heatmaps:
            kind = options.map_kind
            maps = self._heatmaps(self.class_maps(out, c, rank, kind), options.box_percentile, kind)
        for i in range(self.p):
            proto = {
                "prototype": i,
                "coefficient": float(self.coefficients[c, i]),
                "score": float(scores[i]),
                "contribution": float(contributions[i]),
                "nmf_contribution": None if nmf[i] is None else float(nmf[i]),
                "residual_contribution": None if residual[i] is None else float(residual[i]),
                "share_of_logit": float(contributions[i] / logit) if abs(logit) > 1e-12 else None,
                "exemplars": self._exemplar_entries(c, i),
            }
            if maps is not None:
                proto["heatmap"] = maps[i]
            entry["prototypes"].append(proto)
        return entry

    def _heatmaps(self, maps: np.ndarray, percentile: float, kind: str = "similarity"
                  ) -> list[dict]:  # fmt: skip
        """One class's p maps (p, H, W) → per map: values, peak, and the box around the cells
        at or above the map's ``percentile``. All maps at once: per-map numpy calls were
        most of /explain's CPU time (9 maps per image at top-3)."""
        n, H, W = maps.shape
        flat = maps.reshape(n, -1)
        hot = maps >= np.percentile(flat, percentile, axis=1)[:, None, None]  # (n, H, W)
        rows, cols = hot.any(2), hot.any(1)  # (n, H), (n, W); each has a True: the max is hot
        top, left = rows.argmax(1), cols.argmax(1)
        bottom, right = H - rows[:, ::-1].argmax(1), W - cols[:, ::-1].argmax(1)
        peak_row, peak_col = np.divmod(flat.argmax(1), W)
        values = np.round(maps, 5).tolist()
        sy, sx = self.spec.height / H, self.spec.width / W
        return [
            {
                "kind": kind,
                "shape": [H, W],
                "values": values[i],
                "peak": {"row": int(peak_row[i]), "col": int(peak_col[i])},
                "box": {
                    "percentile": percentile,
                    "feature": {"top": int(top[i]), "left": int(left[i]),
                                "bottom": int(bottom[i]), "right": int(right[i])},  # fmt: skip
                    # in the model's input crop (preprocessing.height × width pixels)
                    "input": {"top": int(top[i]) * sy, "left": int(left[i]) * sx,
                              "bottom": int(bottom[i]) * sy, "right": int(right[i]) * sx},  # fmt: skip
                },
            }
            for i in range(n)
        ]

    def top_classes(self, logits: np.ndarray, k: int) -> list[int]:
        return [int(c) for c in np.argsort(-logits, kind="stable")[:k]]

    def classification(self, out: dict, top_k: int) -> dict:
        probs = _softmax(out["logits"].astype(np.float64))
        top = self.top_classes(out["logits"], top_k)
        self._record(out, top[0])
        return {"top_k": [{"class": self.classes[c], "index": c, "logit": float(out["logits"][c]),
                           "probability": float(probs[c])} for c in top]}  # fmt: skip

    def explanation(self, out: dict, options: ExplainOptions) -> dict:
        with stage("explain"):
            logits = out["logits"].astype(np.float64)
            probs = _softmax(logits)
            top = self.top_classes(out["logits"], options.top_k)
            if options.heatmaps and self.maps_mode == "topk":
                # The graph's top-k order must be ours, or maps would go to the wrong class.
                top = [int(c) for c in out["topk_classes"][: options.top_k]]
            # the explained classes and their rivals, in one go (residual_share needs both)
            rivals = [self.rival(logits, c) for c in top]
            residuals = self.residuals(out, top + [o for o in rivals if o is not None])
            entries = [self._class_entry(out, c, probs, r, options, residuals)
                       for r, c in enumerate(top)]  # fmt: skip
            gap = max(abs(e["exactness_gap"]) for e in entries) / max(np.abs(logits).max(), 1e-12)
            # the largest so far: a breach must survive later good requests until scraped
            self._gap_max = max(self._gap_max, gap)
            METRICS.exactness_gap.set(self._gap_max)
            result = {"top_k": entries, "exactness": gap, "intervention": None}
            if options.interventions:
                result["intervention"] = self._intervene(out, options)
            self._record(out, top[0])
            return result

    def _intervene(self, out: dict, options: ExplainOptions) -> dict:
        pairs = self.resolve(options.interventions)
        logits = out["logits"].astype(np.float64).copy()
        for c, i in set(pairs):
            logits[c] -= self.terms(out, c)[1][i]
        METRICS.interventions.inc(len(set(pairs)))
        probs = _softmax(logits)
        top = self.top_classes(logits, options.top_k)
        before = int(np.argmax(out["logits"]))
        return {
            "switched_off": [{"class": self.classes[c], "prototype": i} for c, i in sorted(set(pairs))],
            "logits": {self.classes[c]: float(logits[c]) for c in sorted({c for c, _ in pairs})},
            "top_k": [{"class": self.classes[c], "index": c, "logit": float(logits[c]),
                       "probability": float(probs[c])} for c in top],  # fmt: skip
            "prediction_before": self.classes[before],
            "prediction_after": self.classes[top[0]],
            "prediction_changed": top[0] != before,
        }

    def _record(self, out: dict, top1: int) -> None:
        METRICS.predictions.labels(class_name=class_label(top1, self.classes)).inc()
        best = int(np.argmax(self.terms(out, top1)[1]))
        METRICS.prototype_usage.labels(prototype=str(best)).inc()

    def overlay(self, crop: np.ndarray, out: dict, rank: int = 0,
                map_kind: str = "contribution") -> bytes:  # fmt: skip
        """PNG: how the top-``rank`` class's prototypes vote, over the model's input crop.

        One panel for the class's whole prototype evidence and one per prototype, each its
        contribution map a_ci F·b'_ci [/σ] (mean = contribution): red where it speaks for
        the class, blue against, opacity by |value| on one scale for every panel.
        ``map_kind`` similarity or presence draws those maps instead (the first panel is then
        the prototypes' maps summed)."""
        with stage("overlay"):
            if map_kind not in MAP_KINDS:
                raise Unprocessable(f"map_kind must be one of {list(MAP_KINDS)}, got "
                                    f"{map_kind!r}", "unknown_map_kind")  # fmt: skip
            self.check_maps(rank + 1, map_kind)
            c = (int(out["topk_classes"][rank]) if self.maps_mode == "topk"
                 else self.top_classes(out["logits"], rank + 1)[rank])  # fmt: skip
            _, contributions, bias = self.terms(out, c)
            rival = self.rival(out["logits"], c)
            residuals = self.residuals(out, [c] if rival is None else [c, rival])
            parts = self.split(out, c, contributions, residuals)
            maps = self.class_maps(out, c, rank, map_kind)
            panels = np.concatenate([maps.sum(0, keepdims=True), maps])
            captions = [["all prototypes", f"sum {contributions.sum():+.3f}"]]
            for i in range(self.p):
                captions.append([f"prototype {i}  a={self.coefficients[c, i]:+.3f}",
                                 f"contribution {contributions[i]:+.3f}"])  # fmt: skip
            if parts is not None:
                nmf, residual = parts
                captions[0].append(f"NMF {nmf.sum():+.3f} | residual {residual.sum():+.3f}")
                for i in range(self.p):
                    captions[i + 1].append(f"NMF {nmf[i]:+.3f} | residual {residual[i]:+.3f}")
            title = [f"{self.classes[c]}: logit {out['logits'][c]:+.3f} = prototypes "
                     f"{contributions.sum():+.3f} + bias {bias:+.3f}",
                     self._residual_text(out, c, parts, bias, residuals)]  # fmt: skip
            return render_overlay(crop, panels, captions, title, for_label=self.classes[c],
                                  kind=map_kind)  # fmt: skip

    def _residual_text(self, out: dict, c: int, parts, bias: float, residuals) -> str:
        if parts is None:
            return "NMF/residual split: not available (graph without pooled features)"
        share = self.residual_share(out, c, parts[1].sum(), bias, residuals)
        text = "residual share: " + (f"{share['logit']:.0%} of the logit without bias"
                                     if share["logit"] is not None else "n/a")  # fmt: skip
        if share["margin"] is not None:
            text += f", {share['margin']:.0%} of the margin over {share['versus']}"
        return text

    # --- prototypes and their exemplars ---------------------------------------------------

    @cached_property
    def explained_shares(self) -> np.ndarray:
        """(C, 2): per class 1 − ‖R‖²/‖V‖² and ‖a·B‖/‖V‖, how much of the class vector the
        NMF prototypes carry (NaN for V = 0; 0 where prototype 0 is V itself)."""
        t = self.tensors
        out = np.full((len(self.classes), 2), np.nan)
        for c in range(len(self.classes)):
            v2 = float(np.sum(t["class_vectors"][c].astype(np.float64) ** 2))
            if self._all_residual[c]:
                out[c] = 0.0
            elif v2 > 0:
                nmf = self.coefficients[c].astype(np.float64) @ t["nmf_prototypes"][c]
                r2 = float(np.sum(t["residuals"][c].astype(np.float64) ** 2))
                out[c] = 1.0 - r2 / v2, np.sqrt(np.sum(nmf**2) / v2)
        return out

    def prototypes(self, classes=None) -> dict:
        """Every prototype (of ``classes``: names or indices; all by default) with its
        coefficient, fold weight and exemplars by kind; per class the explained share."""
        indices = range(len(self.classes)) if not classes else [self.class_index(x) for x in classes]
        kinds = list(self.exemplars.kinds) if self.exemplars else []
        weights = self.tensors.get("fold_weights")
        per_class = self.manifest["diagnostics"]["per_class"]
        result = []
        for c in indices:
            energy, ratio = (None if np.isnan(x) else float(x) for x in self.explained_shares[c])
            protos = [{"prototype": i, "coefficient": float(self.coefficients[c, i]),
                       "fold_weight": None if weights is None else float(weights[c, i]),
                       "exemplars": {k: self._exemplar_entries(c, i, k) for k in kinds}}
                      for i in range(self.p)]  # fmt: skip
            result.append({"class": self.classes[c], "index": c,
                           "explained": per_class[c]["explained"], "fold": self.folds[c],
                           "explained_share": {"energy": energy, "norm_ratio": ratio},
                           "prototypes": protos})  # fmt: skip
        return {"p": self.p, "exemplar_kinds": kinds, "classes": result}

    def prototype_image(self, class_name: str | int, prototype: int, kind: str = "augmented"
                        ) -> bytes:  # fmt: skip
        """PNG strip of one prototype's exemplars, each with its presence map and score."""
        if self.exemplars is None:
            raise Unprocessable("this artifact has no exemplars (converted with --exemplars 0 "
                                "or before format 4)", "no_exemplars")  # fmt: skip
        c = self.class_index(class_name)
        self.check_prototype(c, prototype)
        if kind not in self.exemplars.kinds:
            raise Unprocessable(f"exemplar kind must be one of {list(self.exemplars.kinds)}, "
                                f"got {kind!r}", "unknown_exemplar_kind")  # fmt: skip
        entries = self.exemplars.entries(c, prototype, kind)
        if not entries:
            raise Unprocessable(f"class {self.classes[c]!r} prototype {prototype} has no "
                                f"exemplars", "no_exemplars")  # fmt: skip
        with stage("prototype_image"):
            thumbnails, maps = self.exemplars.strip(c, prototype, kind)
            captions = [[f"#{j + 1} presence {e['presence']:.3g}", e["source"]]
                        for j, e in enumerate(entries)]  # fmt: skip
            what = {"augmented": "presence E' of b' (Eq. 9)", "nmf": "NMF presence E of b"}
            title = [f"{self.classes[c]}: prototype {prototype}  a={self.coefficients[c, prototype]:+.3f}",
                     f"{kind} exemplars, best first; map = {what.get(kind, kind)}"]  # fmt: skip
            return render_exemplar_strip(thumbnails, maps, captions, title)

    def model_info(self) -> dict:
        m = self.manifest
        return {
            "classes": self.classes,
            "class_descriptions": self.descriptions,
            "p": self.p,
            "coefficients": self.coefficients.round(6).tolist(),
            "prototypes": [
                {"class": self.classes[c], "explained": d["explained"], "fold": d["fold"],
                 "n_images": d["n_images"]}
                for c, d in enumerate(m["diagnostics"]["per_class"])
            ],  # fmt: skip
            "feature_grid": list(self.grid),
            "heatmap_classes": self.map_classes,
            "map_kinds": [k for k in MAP_KINDS if k != "presence" or self.has_presence],
            "residual_split": self.has_pooled,
            "exemplars": self.manifest.get("exemplars"),
            "scores": self.scores_mode,
            "maps": self.maps_mode,
            "preprocessing": m["preprocessing"],
            "backbone": m["backbone"].get("architecture"),
            "artifact": {
                "format_version": m["format_version"],
                "protonmf_version": m["protonmf_version"],
                "created": m["created"],
                "model_sha256": m["files"].get("model.onnx"),
                "prototypes_sha256": m["files"].get("prototypes.safetensors"),
            },
            "provider": self.explainer.provider,
            "variant": self.explainer.variant,
            "limits": self.limits.__dict__,
        }
