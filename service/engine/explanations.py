"""Explanations built from one image's graph outputs: per-class prototype terms, their
NMF/residual split, heatmaps, the classification, test-time intervention. The maths is
``protonmf.explain``'s (the same functions ``protonmf evaluate`` and ``report`` call); here
it is applied to the few classes an answer shows, in float64.
"""

from __future__ import annotations

import math

import numpy as np

from protonmf import explain
from protonmf.service.engine.model import Model
from protonmf.service.engine.options import ExplainOptions
from protonmf.service.ops.metrics import METRICS, class_label, stage

__all__ = ["Explanations", "heatmap_entries"]


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def _finite(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def heatmap_entries(
    maps: np.ndarray, percentile: float, crop_hw: tuple[int, int], kind: str = "similarity"
) -> list[dict]:
    """One class's p maps (p, H, W) → per map: values, peak, and the box around the cells
    at or above the map's ``percentile``, in feature cells and in the input crop's pixels
    (``crop_hw``). All maps at once: per-map numpy calls were most of /explain's CPU time
    (9 maps per image at top-3)."""
    n, H, W = maps.shape
    flat = maps.reshape(n, -1)
    hot = maps >= np.percentile(flat, percentile, axis=1)[:, None, None]  # (n, H, W)
    rows, cols = hot.any(2), hot.any(1)  # (n, H), (n, W); each has a True: the max is hot
    top, left = rows.argmax(1), cols.argmax(1)
    bottom, right = H - rows[:, ::-1].argmax(1), W - cols[:, ::-1].argmax(1)
    peak_row, peak_col = np.divmod(flat.argmax(1), W)
    values = np.round(maps, 5).tolist()
    sy, sx = crop_hw[0] / H, crop_hw[1] / W
    return [
        {
            "kind": kind,
            "shape": [H, W],
            "values": values[i],
            "peak": {"row": int(peak_row[i]), "col": int(peak_col[i])},
            "box": {
                "percentile": percentile,
                "feature": {
                    "top": int(top[i]),
                    "left": int(left[i]),
                    "bottom": int(bottom[i]),
                    "right": int(right[i]),
                },
                # in the model's input crop (preprocessing.height × width pixels)
                "input": {
                    "top": int(top[i]) * sy,
                    "left": int(left[i]) * sx,
                    "bottom": int(bottom[i]) * sy,
                    "right": int(right[i]) * sx,
                },
            },
        }
        for i in range(n)
    ]


class Explanations:
    """The answers of /classify and /explain for one model, image by image."""

    def __init__(self, model: Model):
        self.model = model
        self.classes, self.p, self.spec = model.classes, model.p, model.spec
        self.tensors, self.coefficients = model.tensors, model.coefficients
        self.folds, self.norm_eps = model.folds, model.norm_eps
        self.descriptions, self.exemplars = model.descriptions, model.exemplars
        self.scores_mode, self.maps_mode = model.scores_mode, model.maps_mode
        self._gap_max = 0.0

    # --- the terms of one class, one image ---------------------------------------------------

    def class_maps(self, out: dict, c: int, rank: int, kind: str = "similarity") -> np.ndarray:
        """Class ``c``'s p maps (p, H, W) of ``kind``; ``rank`` is its place in the top-k."""
        if kind == "presence":
            return out["presence"][c] if self.maps_mode == "all" else out["topk_presence"][rank]
        maps = out["maps"][c] if self.maps_mode == "all" else out["topk_maps"][rank]
        if kind == "contribution":  # a_ci F·b'_ci [/σ]: its spatial mean is contribution_ci
            scale = self.coefficients[c].astype(np.float64) * self._map_inv_sigma(out)
            return maps * scale[:, None, None]
        return maps

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
        tensors = self.tensors
        pooled = out["pooled"].astype(np.float64)  # (D,)
        scores = tensors["prototypes"][c].astype(np.float64) @ pooled  # (p,)
        contributions = scores * self.coefficients[c]
        bias = float(tensors["bias"][c])
        if self.norm_eps is not None:  # LayerNorm head: contributions / σ, bias − μ/σ · Σ_d V_cd
            inv_sigma = float(explain.inv_sigma(pooled, self.norm_eps))
            contributions = contributions * inv_sigma
            bias -= (
                pooled.mean() * inv_sigma * float(tensors["class_vectors"][c].sum(dtype=np.float64))
            )
        return scores, contributions, bias

    def _map_inv_sigma(self, out: dict) -> float:
        """1/σ for the contribution maps; an old LayerNorm graph without ``pooled`` (format
        ≤ 3, all scores) still tells it: contribution / (a · score) of its largest term."""
        if self.norm_eps is None:
            return 1.0
        if "pooled" in out:
            return float(explain.inv_sigma(out["pooled"], self.norm_eps))
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
        values = explain.residual_terms(self.tensors, self.folds, out["pooled"], cs, self.norm_eps)
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
        if self.folds[c] in explain.ALL_RESIDUAL_FOLDS:
            return np.zeros_like(contributions), contributions
        return contributions - residuals[c], residuals[c]

    def residual_share(
        self, out: dict, c: int, residual: float, bias: float, residuals: dict | None = None
    ) -> dict:
        """How much of class ``c``'s logit (without bias) and of its margin over its rival
        o the residual r carries (``protonmf.explain.residual_shares``); null where a
        denominator is 0."""
        logits = out["logits"].astype(np.float64)
        o = explain.rival(logits, c)
        if o is None:
            logit_share = explain.ratio(residual, logits[c] - bias)
            return {"logit": _finite(logit_share), "margin": None, "versus": None}
        r_o = self.split(out, o, self.terms(out, o)[1], residuals)[1].sum()
        logit_share, margin_share = explain.residual_shares(
            logits[c], bias, residual, logits[o], r_o
        )
        return {
            "logit": _finite(logit_share),
            "margin": _finite(margin_share),
            "versus": self.classes[o],
        }

    def _exemplar_entries(self, c: int, i: int, kind: str = "augmented") -> list[dict]:
        """``Exemplars.entries(c, i, kind)``, built from plain lists: iterating numpy
        scalars cost ~25 µs per prototype, a third of /explain's time at top-3."""
        ex = self.exemplars
        if ex is None or kind not in ex.index:
            return []
        index, score = ex.index[kind][c, i].tolist(), ex.score[kind][c, i].tolist()
        return [
            {"image": u, "source": ex.sources[u], "presence": s}
            for u, s in zip(index, score, strict=True)
            if u >= 0
        ]

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
            maps = heatmap_entries(
                self.class_maps(out, c, rank, kind),
                options.box_percentile,
                (self.spec.height, self.spec.width),
                kind,
            )
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

    def top_classes(self, logits: np.ndarray, k: int) -> list[int]:
        return [int(c) for c in np.argsort(-logits, kind="stable")[:k]]

    def classification(self, out: dict, top_k: int) -> dict:
        probs = _softmax(out["logits"].astype(np.float64))
        top = self.top_classes(out["logits"], top_k)
        self._record(out, top[0])
        return {
            "top_k": [
                {
                    "class": self.classes[c],
                    "index": c,
                    "logit": float(out["logits"][c]),
                    "probability": float(probs[c]),
                }
                for c in top
            ]
        }

    def explanation(self, out: dict, options: ExplainOptions) -> dict:
        with stage("explain"):
            logits = out["logits"].astype(np.float64)
            probs = _softmax(logits)
            top = self.top_classes(out["logits"], options.top_k)
            if options.heatmaps and self.maps_mode == "topk":
                # The graph's top-k order must be ours, or maps would go to the wrong class.
                top = [int(c) for c in out["topk_classes"][: options.top_k]]
            # the explained classes and their rivals, in one go (residual_share needs both)
            rivals = [explain.rival(logits, c) for c in top]
            residuals = self.residuals(out, top + [o for o in rivals if o is not None])
            entries = [
                self._class_entry(out, c, probs, r, options, residuals) for r, c in enumerate(top)
            ]
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
        pairs = self.model.resolve(options.interventions)
        logits = out["logits"].astype(np.float64).copy()
        for c, i in set(pairs):
            logits[c] -= self.terms(out, c)[1][i]
        METRICS.interventions.inc(len(set(pairs)))
        probs = _softmax(logits)
        top = self.top_classes(logits, options.top_k)
        before = int(np.argmax(out["logits"]))
        return {
            "switched_off": [
                {"class": self.classes[c], "prototype": i} for c, i in sorted(set(pairs))
            ],
            "logits": {self.classes[c]: float(logits[c]) for c in sorted({c for c, _ in pairs})},
            "top_k": [
                {
                    "class": self.classes[c],
                    "index": c,
                    "logit": float(logits[c]),
                    "probability": float(probs[c]),
                }
                for c in top
            ],
            "prediction_before": self.classes[before],
            "prediction_after": self.classes[top[0]],
            "prediction_changed": top[0] != before,
        }

    def _record(self, out: dict, top1: int) -> None:
        METRICS.predictions.labels(class_name=class_label(top1, self.classes)).inc()
        best = int(np.argmax(self.terms(out, top1)[1]))
        METRICS.prototype_usage.labels(prototype=str(best)).inc()
