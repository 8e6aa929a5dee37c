"""The prototype model in torch: the black box's backbone + the augmented prototypes.

This module is what ``export`` turns into ``model.onnx``, and what the exactness tests
run against the original timm model. For raw features F (N, D, H, W):

    score_ci        = mean_hw(F) · b'_ci          (= mean_hw of the similarity map)
    contribution_ci = a_ci · score_ci  [/ σ for a LayerNorm head]
    logit_c         = Σ_i contribution_ci + bias_c
    map_ci(h, w)    = F(h, w) · b'_ci             (Eq. 9's similarity maps)

Scores come from the pooled features (a (N, D)×(D, C·p) matmul) rather than from the
maps: same numbers, and with ``maps="topk"`` only the k predicted classes' maps are
computed at all, so explanations cost almost nothing over the plain model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .models import HeadSpec, features_nhwc

__all__ = ["OUTPUTS", "ProtoModel"]

# Output names, in order, for each maps mode (the manifest documents their shapes).
OUTPUTS = {
    "topk": ["logits", "scores", "contributions", "bias", "topk_classes", "topk_maps"],
    "all": ["logits", "scores", "contributions", "bias", "maps"],
    "none": ["logits", "scores", "contributions", "bias"],
}


class ProtoModel(nn.Module):
    """Backbone + prototype head. Outputs are listed in ``OUTPUTS[maps]``.

    prototypes (C, p, D), coefficients (C, p), bias (C,): float32 buffers, stored once;
    the (C·p, D) view is derived in ``forward`` so ONNX export keeps a single copy.
    """

    def __init__(self, backbone, head: HeadSpec, prototypes, coefficients, maps="topk", k=5):
        super().__init__()
        if maps not in OUTPUTS:
            raise ValueError(f"maps must be one of {sorted(OUTPUTS)}, got {maps!r}")
        C, p, D = prototypes.shape
        self.backbone = backbone
        self.layout = head.layout
        self.maps = maps
        self.k = min(k, C)
        self.register_buffer("prototypes", torch.as_tensor(prototypes, dtype=torch.float32))
        self.register_buffer("coefficients", torch.as_tensor(coefficients, dtype=torch.float32))
        self.register_buffer("head_bias", head.effective_bias.float())
        self.norm_eps = head.norm_eps
        if head.kind == "avg_norm_linear":
            # Σ_d V_cd: the class's response to the per-image mean μ that LayerNorm removes.
            self.register_buffer("center", head.class_vectors.sum(1).float())
        else:
            self.center = None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C_in, H_in, W_in) → raw features (N, D, H, W), before any pooling.

        Channels first: a CNN's own layout, so pooling and maps read the backbone's output
        without a transpose (the pooling is then the black box's own ReduceMean)."""
        feats = self.backbone.forward_features(x)
        if self.layout == "nchw":
            return feats
        return features_nhwc(self.backbone, feats, self.layout).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor):
        grid = self.features(x)  # (N, D, H, W)
        n, _, H, W = grid.shape
        C, p, D = self.prototypes.shape
        flat = self.prototypes.reshape(C * p, D)  # (C·p, D)
        pooled = grid.mean((2, 3))  # (N, D)
        scores = (pooled @ flat.t()).reshape(n, C, p)  # (N, C, p)
        contributions = scores * self.coefficients  # (N, C, p)
        if self.center is None:
            bias = self.head_bias.expand(n, C)
        else:
            mu = pooled.mean(1, keepdim=True)  # (N, 1)
            inv_sigma = torch.rsqrt(((pooled - mu) ** 2).mean(1, keepdim=True) + self.norm_eps)
            contributions = contributions * inv_sigma.unsqueeze(-1)
            bias = self.head_bias - mu * inv_sigma * self.center  # (N, C)
        logits = contributions.sum(-1) + bias  # (N, C)
        out = [logits, scores, contributions, bias]
        if self.maps == "all":
            sim = F.conv2d(grid, flat[:, :, None, None])  # (N, C·p, H, W)
            out.append(sim.reshape(n, C, p, *sim.shape[2:]))
        elif self.maps == "topk":
            top = logits.topk(self.k, dim=1).indices  # (N, k)
            protos = self.prototypes[top].reshape(n, self.k * p, D)  # (N, k·p, D)
            # one batched MatMul on the flattened grid (an Einsum costs transposes in ORT)
            maps = (protos @ grid.flatten(2)).reshape(n, self.k, p, H, W)  # (N, k, p, H, W)
            out += [top, maps]
        return tuple(out)
