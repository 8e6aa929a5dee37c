"""The transport-free core: decode → preprocess → ONNX run → explanation → JSON-able dict.

REST (BentoML) and gRPC adapters call these pieces; neither re-implements any of them.
The batching boundary sits between ``prepare`` (per image, in parallel threads) and
``infer`` (one onnxruntime run per merged batch): what crosses it is a compact uint8 crop
going in and the graph's packed float32 outputs coming out, both as base64 strings.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from protonmf.artifact import normalize, resize_crop

from .errors import Unprocessable
from .imaging import Limits, decode_image, render_overlay
from .metrics import METRICS, class_label, stage
from .runtime import Explainer

__all__ = ["Core", "ExplainOptions", "Intervention"]


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


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


class Core:
    """An artifact ready to serve: limits, preprocessing, graph, explanation building."""

    def __init__(self, explainer: Explainer, limits: Limits | None = None):
        self.explainer = explainer
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
             limits: Limits | None = None, variant: str = "fp32", spinning: bool = True) -> Core:  # fmt: skip
        return cls(Explainer.load(Path(artifact), device, threads, variant, spinning), limits)

    # --- per image, before batching ---------------------------------------------------

    def prepare(self, data: bytes) -> np.ndarray:
        """Untrusted bytes → uint8 crop the model reads. Raises InvalidInput and subclasses."""
        with stage("decode"):
            image = decode_image(data, self.limits, self.spec)
            return resize_crop(image, self.spec)

    def encode_crop(self, crop: np.ndarray) -> str:
        return base64.b64encode(np.ascontiguousarray(crop, np.uint8).tobytes()).decode()

    def decode_crop(self, text: str) -> np.ndarray:
        raw = base64.b64decode(text, validate=True)
        if len(raw) != int(np.prod(self.crop_shape)):
            raise Unprocessable(f"crop has {len(raw)} bytes, expected shape {self.crop_shape}")
        return np.frombuffer(raw, np.uint8).reshape(self.crop_shape)

    def warm_up(self, max_batch: int) -> list[int]:
        """Run the graph on blank crops before the service says ready; returns the sizes run.

        On CPU the largest batch and a single image (allocation, planning). On CUDA every
        size from max_batch down to 1: the CUDA provider prepares cuDNN convolutions per
        input shape (~5 ms per conv layer even with the heuristic search), and the adaptive
        batcher forms any size up to max_batch — measured on an H100, a batch of a size not
        seen before took 140–380 ms against ~6 ms once seen.
        """
        cuda = self.explainer.provider == "CUDAExecutionProvider"
        sizes = list(range(max_batch, 0, -1)) if cuda else sorted({max_batch, 1}, reverse=True)
        for n in sizes:
            self.explainer.run(normalize(np.zeros((n, *self.crop_shape), np.uint8), self.spec))
        return sizes

    # --- one merged batch ---------------------------------------------------------------

    def infer(self, crops: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 crops (N, ...) → graph outputs by name, one onnxruntime run."""
        with stage("infer"):
            METRICS.batch_size.observe(len(crops))
            return self.explainer.run(normalize(crops, self.spec))

    def pack(self, outputs: dict[str, np.ndarray]) -> list[str]:
        """Batch outputs → one base64 string per image (float32, graph output order)."""
        n = len(next(iter(outputs.values())))
        flat = np.concatenate(
            [outputs[k].reshape(n, -1).astype(np.float32) for k in self._shapes], axis=1
        )
        return [base64.b64encode(row.tobytes()).decode() for row in flat]

    def unpack(self, text: str) -> dict[str, np.ndarray]:
        flat = np.frombuffer(base64.b64decode(text), np.float32)
        out, at = {}, 0
        for name, shape in self._shapes.items():
            size = int(np.prod(shape))
            out[name] = flat[at : at + size].reshape(shape)
            at += size
        out["topk_classes"] = out.get("topk_classes", np.zeros(0)).astype(np.int64)
        return out

    def run_images(self, blobs: list[bytes]) -> list[dict[str, np.ndarray]]:
        """No batcher in between: decode, infer, split. For tests and the CLI."""
        crops = np.stack([self.prepare(b) for b in blobs])
        return [self.unpack(t) for t in self.pack(self.infer(crops))]

    # --- explanation building, per image ------------------------------------------------

    def check_request(self, n_images: int, options: ExplainOptions | None = None) -> None:
        if n_images < 1:
            raise Unprocessable("the request has no images", "no_images")
        if n_images > self.limits.max_images:
            from .errors import PayloadTooLarge

            raise PayloadTooLarge(
                f"{n_images} images in one request; the limit is {self.limits.max_images}",
                "too_many_images",
            )
        if options is None:
            return
        if not 1 <= options.top_k <= len(self.classes):
            raise Unprocessable(f"top_k must be in 1..{len(self.classes)}, got {options.top_k}",
                                "top_k_out_of_range")  # fmt: skip
        if options.heatmaps:
            self.check_maps(options.top_k)
        if not 0 <= options.box_percentile <= 100:
            raise Unprocessable(f"box_percentile must be in 0..100, got {options.box_percentile}")
        if len(options.interventions) > self.limits.max_interventions:
            raise Unprocessable(
                f"{len(options.interventions)} interventions; the limit is "
                f"{self.limits.max_interventions}", "too_many_interventions"
            )  # fmt: skip
        self.resolve(options.interventions)

    def check_maps(self, top_k: int) -> None:
        """Unprocessable unless the graph has maps for the ``top_k`` best classes."""
        if self.map_classes == 0:
            raise Unprocessable("this artifact's graph has no similarity maps (converted with "
                                "--maps none); ask with heatmaps=false", "no_maps")  # fmt: skip
        if top_k > self.map_classes:
            raise Unprocessable(
                f"heatmaps are computed for the top {self.map_classes} classes; ask for "
                f"top_k <= {self.map_classes} or heatmaps=false", "top_k_exceeds_graph"
            )  # fmt: skip

    def class_maps(self, out: dict, c: int, rank: int) -> np.ndarray:
        """Class ``c``'s p similarity maps (p, H, W); ``rank`` is its place in the top-k."""
        return out["maps"][c] if self.maps_mode == "all" else out["topk_maps"][rank]

    def resolve(self, interventions) -> list[tuple[int, int]]:
        """(class name or index, prototype) pairs → index pairs; Unprocessable if unknown."""
        pairs = []
        for iv in interventions:
            c = iv.class_name
            if isinstance(c, str) and c in self._index:
                c = self._index[c]
            elif isinstance(c, str) and c.isdigit():
                c = int(c)
            if not isinstance(c, int) or not 0 <= c < len(self.classes):
                raise Unprocessable(f"unknown class {iv.class_name!r} in intervention",
                                    "unknown_class")  # fmt: skip
            if not 0 <= iv.prototype < self.p:
                raise Unprocessable(
                    f"class {self.classes[c]!r} has prototypes 0..{self.p - 1}, "
                    f"got {iv.prototype}", "unknown_prototype"
                )  # fmt: skip
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
            mu = pooled.mean()
            inv_sigma = 1.0 / np.sqrt(((pooled - mu) ** 2).mean() + self._norm_eps)
            contributions = contributions * inv_sigma
            bias -= mu * inv_sigma * float(tensors["class_vectors"][c].sum(dtype=np.float64))
        return scores, contributions, bias

    def _class_entry(self, out, c, probs, rank, options):
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
            "prototypes": [],
        }
        maps = None
        if options.heatmaps:
            maps = self._heatmaps(self.class_maps(out, c, rank), options.box_percentile)
        for i in range(self.p):
            proto = {
                "prototype": i,
                "coefficient": float(self.coefficients[c, i]),
                "score": float(scores[i]),
                "contribution": float(contributions[i]),
                "share_of_logit": float(contributions[i] / logit) if abs(logit) > 1e-12 else None,
            }
            if maps is not None:
                proto["heatmap"] = maps[i]
            entry["prototypes"].append(proto)
        return entry

    def _heatmaps(self, maps: np.ndarray, percentile: float) -> list[dict]:
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
            entries = [self._class_entry(out, c, probs, r, options) for r, c in enumerate(top)]
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

    def overlay(self, crop: np.ndarray, out: dict, rank: int = 0) -> bytes:
        """PNG: the top-``rank`` class's prototype maps over the model's input crop."""
        with stage("overlay"):
            self.check_maps(rank + 1)
            c = (int(out["topk_classes"][rank]) if self.maps_mode == "topk"
                 else self.top_classes(out["logits"], rank + 1)[rank])  # fmt: skip
            contributions = self.terms(out, c)[1]
            labels = [f"prototype {i}: contribution {contributions[i]:+.3f} "
                      f"(a={self.coefficients[c, i]:+.3f})" for i in range(self.p)]  # fmt: skip
            title = f"{self.classes[c]}  logit {out['logits'][c]:.3f}"
            return render_overlay(crop, self.class_maps(out, c, rank), labels, title)

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
