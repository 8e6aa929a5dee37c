"""Load a timm classifier and decide whether its head decomposes into prototypes.

Models are touched only through timm's contract: ``forward_features`` (unpooled map),
``forward_head``, ``get_classifier``, ``num_prefix_tokens`` (ViT) and ``pretrained_cfg``.

Supported heads, each checked numerically on a probe input, not only by type:

- ``avg_linear``: mean over positions → Linear (ResNet, EfficientNet, VGG-like, ViT with
  ``global_pool='avg'`` and no ``fc_norm``). Exact.
- ``avg_norm_linear``: mean → LayerNorm → Linear (ConvNeXt, ViT with ``global_pool='avg'``).
  Exact through a per-image affine: logit = (Σ a_i score_i − μ s)/σ + b.

Anything else (class-token pooling, MLP heads, MobileNetV3's conv_head after pooling)
raises ``UnsupportedModelError`` saying why and what would work.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from protonmf.artifact import ArtifactError, Preprocessing, sha256_file
from protonmf.artifact.manifest import Manifest

__all__ = [
    "HeadSpec",
    "ModelSource",
    "UnsupportedModelError",
    "analyse_head",
    "features_nhwc",
    "load_model",
    "preprocessing_from_timm",
    "recorded_model",
]

log = logging.getLogger(__name__)


class UnsupportedModelError(ValueError):
    """The model's head is not 'average pool → (LayerNorm) → linear'; no exact conversion."""


@dataclass
class ModelSource:
    """Where a model came from, recorded in the manifest so ``verify`` can reload it."""

    model: str  # timm architecture name, or a local-dir folder
    checkpoint: str | None = None
    model_kwargs: dict[str, Any] | None = None
    weights_sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def recorded_model(manifest: dict) -> nn.Module:
    """The timm model an artifact was converted from, as its manifest records it; refused
    if the weights there are not the ones converted (SHA-256)."""
    b = Manifest.of(manifest).backbone
    source = ModelSource(b["model"], b.get("checkpoint"), b.get("model_kwargs"))
    model = load_model(source)
    if b.get("weights_sha256") and source.weights_sha256 != b["weights_sha256"]:
        raise ArtifactError(
            f"the weights at {b.get('checkpoint') or b['model']} are not the ones this artifact "
            "was converted from (sha256 differs)"
        )
    return model.eval()


def load_model(source: ModelSource) -> nn.Module:
    """Build the timm model from a local-dir folder or an architecture + checkpoint file.

    A checkpoint whose keys differ from timm's but align one-to-one by order and shape
    (e.g. EfficientNet-Lite0 weights from other ports) is remapped by order.
    """
    kwargs = dict(source.model_kwargs or {})
    path = Path(source.model)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json (a timm local-dir model folder)")
        weights = next(
            (path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()),
            None,
        )
        if weights is None:
            raise FileNotFoundError(f"{path} has no model.safetensors or pytorch_model.bin")
        model = _create(f"local-dir:{path.resolve()}", kwargs, pretrained=True)
        source.weights_sha256 = sha256_file(weights)
    elif source.checkpoint:
        state = _read_state_dict(source.checkpoint)
        model = _create(source.model, kwargs)
        model.load_state_dict(_align_state_dict(state, model.state_dict(), source.checkpoint))
        source.weights_sha256 = sha256_file(source.checkpoint)
    else:
        raise ValueError(
            f"no weights for {source.model!r}: give a checkpoint file or a timm local-dir folder "
            "(nothing is downloaded at run time)"
        )
    return model.eval()


def _create(name: str, kwargs: dict, pretrained: bool = False) -> nn.Module:
    """timm.create_model, with timm's refusals (unknown architecture, a keyword the model
    does not take, a head setting it cannot build) as one-line ValueErrors."""
    import timm

    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except (RuntimeError, TypeError, ValueError, KeyError, AssertionError, OSError) as e:
        what = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"timm cannot create {name!r} with {kwargs or 'no kwargs'}: {what}") from e


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A checkpoint's state dict; anything else (random bytes, a plain tensor, a pickle
    that weights_only refuses) is a one-line ValueError."""
    import pickle

    from safetensors import SafetensorError

    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (
        pickle.UnpicklingError,
        RuntimeError,
        ValueError,
        KeyError,
        EOFError,
        OSError,
        TypeError,
        AttributeError,
        IndexError,
        SafetensorError,
    ) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise ValueError(
            f"{path}: not a readable {'safetensors' if str(path).endswith('.safetensors') else 'PyTorch'} "
            f"checkpoint ({type(e).__name__}: {first})"
        ) from e
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
    return state


def _align_state_dict(state: dict, target: dict, path: str) -> dict:
    if state.keys() == target.keys():
        wrong = [
            (k, tuple(v.shape), tuple(target[k].shape))
            for k, v in state.items()
            if v.shape != target[k].shape
        ]
        if wrong:
            k, got, want = wrong[0]
            raise ValueError(
                f"{path}: {k} has shape {got} in the checkpoint but {want} in the model "
                f"({len(wrong)} such tensors): another num_classes or variant? Set it with "
                "--model-kwargs, e.g. '{\"num_classes\": N}'"
            )
        return state
    pairs = list(zip(state.items(), target.items(), strict=False))
    if len(state) != len(target) or any(v.shape != t.shape for (_, v), (_, t) in pairs):
        missing = sorted(set(target) - set(state))[:3]
        raise ValueError(
            f"{path}: keys differ from the model's (e.g. missing {missing}) and do not align "
            "by order and shape either; is it the right architecture?"
        )
    log.warning(
        "%s: keys differ from timm's; loading by order (all %d shapes match)", path, len(state)
    )
    return {tk: v for (_, v), (tk, _) in pairs}


def preprocessing_from_timm(model: nn.Module) -> Preprocessing:
    """The eval transform timm would use for this model, as the artifact records it.

    That is ``timm.data.create_transform(**resolve_data_config({}, model=model))``;
    ``resize_crop`` then gives its pixels exactly. A transform it cannot reproduce (an
    unknown crop mode or interpolation, 2 or 4+ channels, crop_pct > 1 on a non-square
    input) raises ``ValueError``. Two cases where the pretrained_cfg describes another model
    than the one built (timm's transform would feed it the wrong input): a model with a
    fixed-size patch embedding (ViT, Mixer, …) built for another ``img_size`` gets that
    size; a model built with ``in_chans=1`` whose cfg says 3 channels gets greyscale input,
    normalised by the mean of the cfg's per-channel mean and std (logged).
    """
    import math

    from timm.data import resolve_data_config

    from protonmf.artifact import INTERPOLATIONS

    cfg = resolve_data_config({}, model=model)
    c, h, w = cfg["input_size"]
    mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
    embed = _fixed_size_embedding(model)
    if embed is not None:
        h, w = embed.img_size  # built for another size than its pretrained_cfg says
    in_chans = _input_channels(model)
    if c == 3 and in_chans == 1:
        mean, std = (sum(mean) / 3,), (sum(std) / 3,)
        log.warning(
            "the model takes 1 channel, its pretrained_cfg describes 3: greyscale "
            "input normalised with mean %.4f, std %.4f",
            mean[0],
            std[0],
        )
        c = 1
    crop_pct = cfg.get("crop_pct") or 0.875  # timm.data.transforms_factory's default
    crop_mode = cfg.get("crop_mode") or "center"
    interpolation = cfg.get("interpolation") or "bilinear"
    if crop_mode not in ("center", "squash", "border"):
        raise ValueError(f"timm crop_mode {crop_mode!r} is not supported (center, squash, border)")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(
            f"timm interpolation {interpolation!r} is not supported ({', '.join(INTERPOLATIONS)})"
        )
    if c not in (1, 3):
        raise ValueError(f"{c}-channel input is not supported (1 or 3 channels)")
    scale = (math.floor(h / crop_pct), math.floor(w / crop_pct))  # as timm: floor, not round
    if crop_mode == "center" and h != w and scale[0] == scale[1]:  # timm pads, old specs clamp
        raise ValueError(
            f"crop_pct {crop_pct} > 1 with the non-square input {h}x{w} is not supported"
        )
    return Preprocessing(
        height=h,
        width=w,
        resize=max(scale),
        color_mode="L" if c == 1 else "RGB",
        interpolation=interpolation,
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        crop_mode=crop_mode,
        # timm resizes the shorter side for a square target, else scales to fit
        resize_hw=None if scale[0] == scale[1] else scale,
    )


def _fixed_size_embedding(model: nn.Module):
    """The first patch embedding that only accepts its own img_size (timm's PatchEmbed with
    strict_img_size), wherever the model keeps it (``patch_embed``, Mixer's ``stem``)."""
    for module in model.modules():
        if getattr(module, "strict_img_size", False) and getattr(module, "img_size", None):
            return module
    return None


def _patch_embedding(model: nn.Module):
    """The module that cut the image into patch tokens (has ``grid_size``), or None."""
    embed = getattr(model, "patch_embed", None)
    if getattr(embed, "grid_size", None) is not None:
        return embed
    return next((m for m in model.modules() if getattr(m, "grid_size", None) is not None), None)


def _token_grid(model: nn.Module, length: int) -> tuple[int, int]:
    """(H, W) of ``length`` patch tokens: the embedding's grid, or, for a model that takes
    other image sizes (dynamic_img_size), that grid scaled evenly to ``length`` tokens."""
    gh, gw = _patch_embedding(model).grid_size
    if gh * gw != length:
        scale = (length / (gh * gw)) ** 0.5
        if round(gh * scale) * round(gw * scale) == length:
            return round(gh * scale), round(gw * scale)
    return gh, gw


def _input_channels(model: nn.Module) -> int | None:
    """Channels of the model's first convolution (the stem or patch projection)."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return None if conv is None else conv.in_channels


def features_nhwc(model: nn.Module, feats: torch.Tensor, layout: str) -> torch.Tensor:
    """``forward_features`` output → (N, H, W, D) grid of feature vectors."""
    if layout == "nchw":
        return feats.permute(0, 2, 3, 1)
    if layout == "nhwc":
        return feats
    # tokens: drop class/prefix tokens, reshape patch tokens to their grid
    tokens = feats[:, getattr(model, "num_prefix_tokens", 0) :]
    n, length, d = tokens.shape
    gh, gw = _token_grid(model, length)
    if gh * gw != length:
        raise UnsupportedModelError(f"{length} patch tokens do not form the {gh}×{gw} grid")
    return tokens.reshape(n, gh, gw, d)


@dataclass
class HeadSpec:
    """What the converter needs of the head: layout, class vectors, bias, optional norm."""

    kind: str  # "avg_linear" | "avg_norm_linear"
    layout: str  # forward_features layout: "nchw" | "nhwc" | "tokens"
    weight: torch.Tensor  # (C, D)
    bias: torch.Tensor  # (C,)
    norm_weight: torch.Tensor | None = None  # (D,)
    norm_bias: torch.Tensor | None = None  # (D,)
    norm_eps: float = 0.0
    probe_max_abs_diff: float = 0.0

    @property
    def class_vectors(self) -> torch.Tensor:
        """V: the vectors the prototypes rebuild (LayerNorm's scale folded in)."""
        if self.norm_weight is None:
            return self.weight
        return self.weight * self.norm_weight

    @property
    def effective_bias(self) -> torch.Tensor:
        if self.norm_bias is None:
            return self.bias
        return self.bias + self.weight @ self.norm_bias


def _probe(model: nn.Module, probe: torch.Tensor, name: str):
    """forward_features and forward_head on the probe batch; a model that fails on the
    input its own config describes is refused in one line, with what it said."""
    try:
        feats = model.forward_features(probe)
        if not isinstance(feats, torch.Tensor):
            raise UnsupportedModelError(
                f"{name}.forward_features returned a {type(feats).__name__}, not one feature "
                "map (auxiliary outputs such as inception_v3's aux_logits are not supported)"
            )
        logits = model.forward_head(feats)
    except UnsupportedModelError:  # a ValueError: ours, already one line
        raise
    # what a model raises on an input it was not built for (shape asserts, size and channel
    # mismatches in its layers, missing attributes of an exotic forward): not convertible
    except (
        RuntimeError,
        AssertionError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
        NotImplementedError,
    ) as e:
        first = str(e).strip().splitlines()[0][:200].rstrip(".") if str(e).strip() else ""
        raise UnsupportedModelError(
            f"{name} fails on a {tuple(probe.shape[1:])} input (its pretrained_cfg's size and "
            f"channels): {type(e).__name__}: {first}. If the model was built for another "
            "size, pass pretrained_cfg_overlay={'input_size': [C, H, W]} in --model-kwargs"
        ) from e
    if not isinstance(logits, torch.Tensor):
        raise UnsupportedModelError(
            f"{name}.forward_head returned a {type(logits).__name__}, not one logits tensor"
        )
    return feats, logits


def _layout(model: nn.Module, feats: torch.Tensor, num_features: int) -> str:
    name = type(model).__name__
    if feats.ndim == 3 and feats.shape[-1] == num_features:
        if _patch_embedding(model) is None:
            raise UnsupportedModelError(
                f"{name} returns tokens {tuple(feats.shape)} without a patch grid "
                "(no patch embedding with a grid_size): no maps can be drawn from them"
            )
        return "tokens"
    if feats.ndim == 4 and feats.shape[1] == num_features:
        return "nchw"
    if feats.ndim == 4 and feats.shape[-1] == num_features:
        return "nhwc"
    raise UnsupportedModelError(
        f"{name}'s classifier reads {num_features} features but forward_features returns "
        f"{tuple(feats.shape)}: something non-linear (a pre-logits MLP or conv) sits between "
        "them, so the head is not average pool → (LayerNorm) → linear"
    )


def _find_post_pool_norm(model: nn.Module) -> nn.Module | None:
    for owner, name in ((getattr(model, "head", None), "norm"), (model, "fc_norm")):
        norm = getattr(owner, name, None) if owner is not None else None
        if isinstance(norm, nn.LayerNorm) or type(norm).__name__ in ("LayerNorm2d", "LayerNorm"):
            return norm
    return None


@torch.no_grad()
def analyse_head(model: nn.Module, probe: torch.Tensor, rtol: float = 1e-4) -> HeadSpec:
    """Classify the head and prove the decomposition on ``probe`` (a small input batch)."""
    model.eval()
    name = type(model).__name__
    pool = getattr(model, "global_pool", None)
    pool_type = pool if isinstance(pool, str) else getattr(pool, "pool_type", None)
    if pool_type == "token":
        raise UnsupportedModelError(
            f"{name} pools the class token (global_pool='token'): its logit is not a sum over "
            "patches, so no prototype model equals it. Create the model with global_pool='avg' "
            "(a different model: fine-tune it first), then convert that."
        )
    if getattr(model, "conv_head", None) is not None and not hasattr(model, "bn2"):
        raise UnsupportedModelError(
            f"{name} applies conv_head + activation after pooling (MobileNetV3-style): the "
            "head is non-linear in the pooled features. Supported: average pool → "
            "(LayerNorm) → linear heads (ResNet, EfficientNet, ConvNeXt, ViT with avg pooling)."
        )
    fc = model.get_classifier()
    if not isinstance(fc, nn.Linear):
        raise UnsupportedModelError(
            f"{name}'s classifier is {type(fc).__name__}, not a single nn.Linear (an MLP or "
            "convolutional head is not decomposable into prototypes)."
        )
    feats, want = _probe(model, probe, name)
    layout = _layout(model, feats, fc.in_features)
    grid = features_nhwc(model, feats, layout)  # (N, H, W, D)
    pooled = grid.mean((1, 2))
    bias = fc.bias if fc.bias is not None else torch.zeros(fc.out_features)
    candidates = [("avg_linear", None)]
    norm = _find_post_pool_norm(model)
    if norm is not None:
        candidates.insert(0, ("avg_norm_linear", norm))
    for kind, nrm in candidates:
        x = (
            pooled
            if nrm is None
            else torch.nn.functional.layer_norm(
                pooled, (pooled.shape[-1],), nrm.weight, nrm.bias, nrm.eps
            )
        )
        got = fc(x)
        diff = (got - want).abs().max().item()
        if diff <= rtol * max(want.abs().max().item(), 1e-6):
            return HeadSpec(
                kind=kind,
                layout=layout,
                weight=fc.weight.detach().double(),
                bias=bias.detach().double(),
                norm_weight=None if nrm is None else nrm.weight.detach().double(),
                norm_bias=None if nrm is None else nrm.bias.detach().double(),
                norm_eps=0.0 if nrm is None else float(nrm.eps),
                probe_max_abs_diff=diff,
            )
    raise UnsupportedModelError(
        f"{name}'s forward_head is not average pool → (LayerNorm) → linear on a probe input "
        f"(max |Δ| {diff:.3g}); a head with non-linear steps after pooling cannot be rebuilt "
        "exactly from prototypes."
    )
