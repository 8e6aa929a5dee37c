"""What the engine says about the model rather than an image (the prototypes, their exemplar
strips, the model's description) and the overlay PNG of one image's explanation."""

from __future__ import annotations

from functools import cached_property

import numpy as np

from protonmf import explain
from protonmf.service.engine.explanations import Explanations
from protonmf.service.engine.model import Model
from protonmf.service.engine.options import MAP_KINDS, OVERLAY_MAP_KIND
from protonmf.service.engine.render import render_exemplar_strip, render_overlay
from protonmf.service.ops.errors import Unprocessable
from protonmf.service.ops.metrics import stage

__all__ = ["Listings"]


class Listings:
    """Listings and pictures of one model."""

    def __init__(self, model: Model, explanations: Explanations | None = None):
        self.model = model
        self.explanations = explanations or Explanations(model)
        self.classes, self.p, self.manifest = model.classes, model.p, model.manifest
        self.info = model.info  # the typed manifest
        self.tensors, self.coefficients = model.tensors, model.coefficients
        self.folds, self.exemplars = model.folds, model.exemplars
        self.descriptions, self.limits = model.descriptions, model.limits
        self.grid, self.map_classes, self.maps_mode = model.grid, model.map_classes, model.maps_mode
        self.scores_mode = model.scores_mode
        self.has_pooled, self.has_presence = model.has_pooled, model.has_presence

    def overlay(
        self, crop: np.ndarray, out: dict, rank: int = 0, map_kind: str = OVERLAY_MAP_KIND
    ) -> bytes:
        """PNG: how the top-``rank`` class's prototypes vote, over the model's input crop.

        One panel for the class's whole prototype evidence and one per prototype, each its
        contribution map a_ci F·b'_ci [/σ] (mean = contribution): red where it speaks for
        the class, blue against, opacity by |value| on one scale for every panel.
        ``map_kind`` similarity or presence draws those maps instead (the first panel is then
        the prototypes' maps summed)."""
        with stage("overlay"):
            if map_kind not in MAP_KINDS:
                raise Unprocessable(
                    f"map_kind must be one of {list(MAP_KINDS)}, got {map_kind!r}",
                    "unknown_map_kind",
                )
            self.model.check_maps(rank + 1, map_kind)
            c = (
                int(out["topk_classes"][rank])
                if self.maps_mode == "topk"
                else self.explanations.top_classes(out["logits"], rank + 1)[rank]
            )
            _, contributions, bias = self.explanations.terms(out, c)
            rival = explain.rival(out["logits"], c)
            residuals = self.explanations.residuals(out, [c] if rival is None else [c, rival])
            parts = self.explanations.split(out, c, contributions, residuals)
            maps = self.explanations.class_maps(out, c, rank, map_kind)
            panels = np.concatenate([maps.sum(0, keepdims=True), maps])
            captions = [["all prototypes", f"sum {contributions.sum():+.3f}"]]
            for i in range(self.p):
                captions.append(
                    [
                        f"prototype {i}  a={self.coefficients[c, i]:+.3f}",
                        f"contribution {contributions[i]:+.3f}",
                    ]
                )
            if parts is not None:
                nmf, residual = parts
                captions[0].append(f"NMF {nmf.sum():+.3f} | residual {residual.sum():+.3f}")
                for i in range(self.p):
                    captions[i + 1].append(f"NMF {nmf[i]:+.3f} | residual {residual[i]:+.3f}")
            title = [
                f"{self.classes[c]}: logit {out['logits'][c]:+.3f} = prototypes "
                f"{contributions.sum():+.3f} + bias {bias:+.3f}",
                self._residual_text(out, c, parts, bias, residuals),
            ]
            return render_overlay(
                crop, panels, captions, title, for_label=self.classes[c], kind=map_kind
            )

    def _residual_text(self, out: dict, c: int, parts, bias: float, residuals) -> str:
        if parts is None:
            return "NMF/residual split: not available (graph without pooled features)"
        share = self.explanations.residual_share(out, c, parts[1].sum(), bias, residuals)
        text = "residual share: " + (
            f"{share['logit']:.0%} of the logit without bias"
            if share["logit"] is not None
            else "n/a"
        )
        if share["margin"] is not None:
            text += f", {share['margin']:.0%} of the margin over {share['versus']}"
        return text

    @cached_property
    def explained_shares(self) -> np.ndarray:
        """(C, 2): per class energy and norm ratio (``protonmf.explain.explained_share``)."""
        return np.stack(explain.explained_share(self.tensors, self.folds), axis=1)

    def prototypes(self, classes=None) -> dict:
        """Every prototype (of ``classes``: names or indices; all by default) with its
        coefficient, fold weight and exemplars by kind; per class the explained share."""
        indices = (
            range(len(self.classes))
            if not classes
            else [self.model.class_index(x) for x in classes]
        )
        kinds = list(self.exemplars.kinds) if self.exemplars else []
        weights = self.tensors.get("fold_weights")
        per_class = self.info.diagnostics.per_class
        result = []
        for c in indices:
            energy, ratio = (None if np.isnan(x) else float(x) for x in self.explained_shares[c])
            protos = [
                {
                    "prototype": i,
                    "coefficient": float(self.coefficients[c, i]),
                    "fold_weight": None if weights is None else float(weights[c, i]),
                    "exemplars": {k: self.explanations._exemplar_entries(c, i, k) for k in kinds},
                }
                for i in range(self.p)
            ]
            result.append(
                {
                    "class": self.classes[c],
                    "index": c,
                    "explained": per_class[c].explained,
                    "fold": self.folds[c],
                    "explained_share": {"energy": energy, "norm_ratio": ratio},
                    "prototypes": protos,
                }
            )
        return {"p": self.p, "exemplar_kinds": kinds, "classes": result}

    def prototype_image(
        self, class_name: str | int, prototype: int, kind: str = "augmented"
    ) -> bytes:
        """PNG strip of one prototype's exemplars, each with its presence map and score."""
        if self.exemplars is None:
            raise Unprocessable(
                "this artifact has no exemplars (converted with --exemplars 0 or before format 4)",
                "no_exemplars",
            )
        c = self.model.class_index(class_name)
        self.model.check_prototype(c, prototype)
        if kind not in self.exemplars.kinds:
            raise Unprocessable(
                f"exemplar kind must be one of {list(self.exemplars.kinds)}, got {kind!r}",
                "unknown_exemplar_kind",
            )
        entries = self.exemplars.entries(c, prototype, kind)
        if not entries:
            raise Unprocessable(
                f"class {self.classes[c]!r} prototype {prototype} has no exemplars", "no_exemplars"
            )
        with stage("prototype_image"):
            thumbnails, maps = self.exemplars.strip(c, prototype, kind)
            captions = [
                [f"#{j + 1} presence {e['presence']:.3g}", e["source"]]
                for j, e in enumerate(entries)
            ]
            what = {"augmented": "presence E' of b' (Eq. 9)", "nmf": "NMF presence E of b"}
            title = [
                f"{self.classes[c]}: prototype {prototype}  a={self.coefficients[c, prototype]:+.3f}",
                f"{kind} exemplars, best first; map = {what.get(kind, kind)}",
            ]
            return render_exemplar_strip(thumbnails, maps, captions, title)

    def model_info(self) -> dict:
        m = self.info
        return {
            "classes": self.classes,
            "class_descriptions": self.descriptions,
            "p": self.p,
            "coefficients": self.coefficients.round(6).tolist(),
            "prototypes": [
                {
                    "class": self.classes[c],
                    "explained": d.explained,
                    "fold": d.fold,
                    "n_images": d.n_images,
                }
                for c, d in enumerate(m.diagnostics.per_class)
            ],
            "feature_grid": list(self.grid),
            "heatmap_classes": self.map_classes,
            "map_kinds": [k for k in MAP_KINDS if k != "presence" or self.has_presence],
            "residual_split": self.has_pooled,
            "exemplars": m.exemplars,
            "scores": self.scores_mode,
            "maps": self.maps_mode,
            "preprocessing": self.manifest["preprocessing"],  # as written (defaults left out)
            "backbone": m.backbone.get("architecture"),
            "artifact": {
                "format_version": m.format_version,
                "protonmf_version": m.protonmf_version,
                "created": m.created,
                "model_sha256": m.files.get("model.onnx"),
                "prototypes_sha256": m.files.get("prototypes.safetensors"),
            },
            "provider": self.model.graph.provider,
            "variant": self.model.graph.variant,
            "limits": self.limits.__dict__,
        }
