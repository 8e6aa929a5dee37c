"""The prototype model in torch: the black box's backbone + the augmented prototypes.

This module is what ``export`` turns into ``model.onnx``, and what the exactness tests
run against the original timm model. For raw features F (N, D, H, W), f = mean_hw(F):

    score_ci        = f · b'_ci                   (= mean_hw of the similarity map)
    contribution_ci = a_ci · score_ci  [/ σ for a LayerNorm head]
    logit_c         = Σ_i contribution_ci + bias_c
    map_ci(h, w)    = F(h, w) · b'_ci             (Eq. 9's similarity maps)

Two ``scores`` modes, same numbers where both have them (``"auto"``, the default, picks
``"all"`` with all maps for C ≤ 2k classes, else ``"topk"`` with top-k maps:
``resolve_modes``):

- ``"topk"``: logit_c = (Σ_i a_ci b'_ci) · f [/ σ] + bias_c — the same sum
  regrouped, so all C logits cost one (D, C) matmul, the black box's own head size — and
  scores/contributions for the k predicted classes only (k·p prototype rows gathered).
  The pooled features f are an output: the service computes any other class's
  contribution from them (an intervention on a class outside the top-k).
- ``"all"``: scores and contributions of every class, a (D, C·p) matmul (p× the head's
  weights read per image: ~8% over the black box at batch 1 for a 1,000-class model).
  With all maps too, the scores are the maps' means: Eq. 8's prototypes as one 1×1
  convolution of C·p filters, then mean pooling, coefficients and bias.

Maps: ``"topk"`` (the k predicted classes), ``"all"`` (every class) or ``"none"``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from protonmf.converter.models import HeadSpec, features_nhwc

__all__ = ["MAPS", "SCORES", "ProtoModel", "output_names", "resolve_modes"]

MAPS = ("auto", "topk", "all", "none")
SCORES = ("auto", "topk", "all")


def resolve_modes(scores: str, maps: str, n_classes: int, k: int) -> tuple[str, str]:
    """``"auto"`` → every class's scores and maps when C ≤ 2k, else the top-k classes'.

    With few classes the all-class head (one 1×1 conv, means, a, bias) is cheaper than the
    top-k machinery (TopK, Gathers, Reshapes), and all maps are small: measured on one
    onnxruntime thread (benchmarks/bench_head_modes.py), all-class is faster at C = 10
    (k = 5), even or slower at C = 20 and slower from C = 50, at D = 128…1280, batch 1
    and 32."""
    every = n_classes <= 2 * k
    if scores == "auto":
        scores = "all" if every else "topk"
    if maps == "auto":
        maps = "all" if every else "topk"
    return scores, maps


def output_names(
    scores: str = "topk", maps: str = "topk", image_bias: bool = False, presence: bool = False
) -> list[str]:
    """The graph's outputs, in order, for a (scores, maps) mode (the manifest documents shapes).

    image_bias: the head's bias depends on the image (LayerNorm); only then does
    ``scores="all"`` emit ``bias`` (N, C). Every mode emits ``pooled`` (format 4): with it
    the service splits any class's contributions into NMF and residual parts.
    presence: Eq. 9's presence maps beside the similarity maps (needs maps)."""
    if scores == "all":
        names = ["logits", "scores", "contributions"] + (["bias"] if image_bias else [])
        names.append("pooled")
    else:
        names = [
            "logits",
            "topk_classes",
            "topk_scores",
            "topk_contributions",
            "topk_bias",
            "pooled",
        ]
    if maps == "all":
        names.append("maps")
    elif maps == "topk":
        names += [n for n in ("topk_classes", "topk_maps") if n not in names]
    if presence:
        if maps == "none":
            raise ValueError("presence maps need a graph with maps (--maps all or topk)")
        names.append("presence" if maps == "all" else "topk_presence")
    return names


class ProtoModel(nn.Module):
    """Backbone + prototype head. Outputs are ``self.output_names``.

    prototypes (C, p, D), coefficients (C, p), bias (C,): float32 buffers, stored once;
    the (C·p, D) view is derived in ``forward`` so ONNX export keeps a single copy.
    """

    def __init__(
        self,
        backbone,
        head: HeadSpec,
        prototypes,
        coefficients,
        maps="auto",
        k=5,
        scores="auto",
        presence_filters=None,
    ):
        super().__init__()
        if maps not in MAPS:
            raise ValueError(f"maps must be one of {list(MAPS)}, got {maps!r}")
        if scores not in SCORES:
            raise ValueError(f"scores must be one of {list(SCORES)}, got {scores!r}")
        C, p, D = prototypes.shape
        scores, maps = resolve_modes(scores, maps, C, k)
        self.backbone = backbone
        self.layout = head.layout
        self.maps = maps
        self.scores = scores
        self.k = min(k, C)
        self.register_buffer("prototypes", torch.as_tensor(prototypes, dtype=torch.float32))
        self.register_buffer("coefficients", torch.as_tensor(coefficients, dtype=torch.float32))
        self.register_buffer("head_bias", head.effective_bias.float())
        # Eq. 9's presence E' = A · pinv(B')ᵀ-rows per position (presence_filters (C, p, D)):
        # linear in the clipped features, so it is one more 1×1 convolution.
        if presence_filters is not None:
            if maps == "none":
                raise ValueError("presence maps need a graph with maps (--maps all or topk)")
            self.register_buffer(
                "presence_filters", torch.as_tensor(presence_filters, dtype=torch.float32)
            )
        else:
            self.presence_filters = None
        self.norm_eps = head.norm_eps
        if head.kind == "avg_norm_linear":
            # Σ_d V_cd: the class's response to the per-image mean μ that LayerNorm removes.
            self.register_buffer("center", head.class_vectors.sum(1).float())
        else:
            self.center = None

    @property
    def output_names(self) -> list[str]:
        return output_names(
            self.scores,
            self.maps,
            image_bias=self.center is not None,
            presence=self.presence_filters is not None,
        )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C_in, H_in, W_in) → raw features (N, D, H, W), before any pooling.

        Channels first: a CNN's own layout, so pooling and maps read the backbone's output
        without a transpose (the pooling is then the black box's own ReduceMean)."""
        feats = self.backbone.forward_features(x)
        if self.layout == "nchw":
            return feats
        return features_nhwc(self.backbone, feats, self.layout).permute(0, 3, 1, 2)

    def _norm(self, pooled: torch.Tensor):
        """LayerNorm heads: (1/σ (N, 1), bias (N, C)); plain heads: (None, bias (C,))."""
        if self.center is None:
            return None, self.head_bias
        mu = pooled.mean(1, keepdim=True)  # (N, 1)
        inv_sigma = torch.rsqrt(((pooled - mu) ** 2).mean(1, keepdim=True) + self.norm_eps)
        return inv_sigma, self.head_bias - mu * inv_sigma * self.center

    def forward(self, x: torch.Tensor):
        grid = self.features(x)  # (N, D, H, W)
        pooled = grid.mean((2, 3))  # (N, D); exported as GlobalAveragePool (export.py)
        if self.scores == "topk":
            out = self._topk(grid, pooled)
        elif self.maps == "all":
            # Eq. 8's prototypes as one 1×1 conv of C·p filters; scores = the maps' means
            # (Eq. 9). No TopK, no Gather: for a few classes the cheapest head.
            maps = self._all_maps(grid, self.prototypes)
            out = self._all_terms(maps.mean((3, 4)), pooled) + [maps]
        else:
            C, p, D = self.prototypes.shape
            scores = (pooled @ self.prototypes.reshape(C * p, D).t()).reshape(-1, C, p)
            out = self._all_terms(scores, pooled)
            out += self._all_or_topk_maps(grid, out[0])
        if self.presence_filters is not None:
            out.append(self._presence(grid, out))
        return tuple(out)

    def _presence(self, grid, out: list):
        """Eq. 9's E' on the clipped features (the matrix A that NMF factorised), for the
        classes the similarity maps cover: every class, or the graph's top-k."""
        clipped = grid.clamp_min(0)
        if self.maps == "all":
            return self._all_maps(clipped, self.presence_filters)
        top = out[self.output_names.index("topk_classes")]  # (N, k)
        return self._gathered_maps(clipped, self.presence_filters[top])

    def _all_terms(self, scores, pooled) -> list:
        """scores="all": every class's scores (N, C, p) → logits, scores, contributions[, bias]."""
        contributions = scores * self.coefficients  # (N, C, p)
        inv_sigma, bias = self._norm(pooled)
        if inv_sigma is not None:
            contributions = contributions * inv_sigma.unsqueeze(-1)
        # Σ contributions + bias, not the regrouped (Σ_i a_ci b'_ci) · f + bias: as one Gemm
        # on the pooled features that measured 1.06x the black box on Fashion at batch 1,
        # against 1.026x (benchmarks/bench_presence.py, format 4 development).
        logits = contributions.sum(-1) + bias  # (N, C)
        return [logits, scores, contributions, *self._image_bias(bias, scores.shape[0]), pooled]

    def _image_bias(self, bias, n: int) -> list:
        """The ``bias`` output (N, C) where it depends on the image (LayerNorm heads), else
        none: a constant bias is the artifact's ``bias`` tensor, and expanding it to (N, C)
        in-graph cost ~2% at batch 1 on the Fashion model (Shape + Concat + Expand)."""
        return [] if self.center is None else [bias.expand(n, bias.shape[-1])]

    def _all_maps(self, grid, filters):
        """grid (N, D, H, W), filters (C, p, D) → every class's maps (N, C, p, H, W): one
        1×1 conv of C·p filters."""
        n, _, H, W = grid.shape
        C, p, D = filters.shape
        maps = F.conv2d(grid, filters.reshape(C * p, D)[:, :, None, None])
        return maps.reshape(n, C, p, H, W)

    def _topk(self, grid, pooled) -> list:
        """scores="topk": all C logits, then the k predicted classes' terms and maps.

        Few nodes on purpose: at batch 1 on a small model every extra ONNX node costs
        more than its arithmetic. The k·p prototypes are gathered once (N, k, p, D); with
        top-k maps, scores are the maps' spatial means (Eq. 9 mean-pooled, = f · b'),
        so one MatMul serves both."""
        # Σ_i a_ci b'_ci: (C, D), the prototype model's logits regrouped (constant-folded)
        weights = (self.coefficients.unsqueeze(-1) * self.prototypes).sum(1)
        inv_sigma, bias = self._norm(pooled)
        raw = pooled @ weights.t()  # (N, C)
        logits = (raw if inv_sigma is None else raw * inv_sigma) + bias
        top = logits.topk(self.k, dim=1).indices  # (N, k)
        protos = self.prototypes[top]  # (N, k, p, D); export turns this into one Gather
        if self.maps == "topk":
            maps = [self._gathered_maps(grid, protos)]  # (N, k, p, H, W)
            scores = maps[0].mean((3, 4))  # (N, k, p)
        else:
            scores = (protos @ pooled[:, None, :, None]).squeeze(-1)  # (N, k, p)
            maps = self._all_or_topk_maps(grid, logits)  # "all" or "none"
        contributions = scores * self.coefficients[top]  # (N, k, p)
        if inv_sigma is None:
            top_bias = bias[top]  # (N, k)
        else:
            contributions = contributions * inv_sigma.unsqueeze(-1)
            top_bias = bias.gather(1, top)
        return [logits, top, scores, contributions, top_bias, pooled, *maps]

    def _all_or_topk_maps(self, grid, logits) -> list:
        """The maps outputs of every mode but (topk, topk), which ``_topk`` builds."""
        if self.maps == "all":
            return [self._all_maps(grid, self.prototypes)]
        if self.maps == "none":
            return []
        top = logits.topk(self.k, dim=1).indices  # (N, k)
        return [top, self._gathered_maps(grid, self.prototypes[top])]

    def _gathered_maps(self, grid, protos):
        """grid (N, D, H, W), the k classes' prototypes (N, k, p, D) → maps (N, k, p, H, W).

        One batched MatMul (N, k·p, D) @ (N, D, H·W): k·p rows per GEMM. A broadcast
        (N, k, p, D) @ (N, 1, D, H·W) runs N·k GEMMs of p rows (Fashion's head at batch 32
        took ~1.4–1.7× as long) and an Einsum costs transposes in onnxruntime."""
        n, _, H, W = grid.shape
        _, k, p, D = protos.shape
        return (protos.reshape(n, k * p, D) @ grid.flatten(2)).reshape(n, k, p, H, W)
