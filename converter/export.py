"""Export the prototype model to one self-contained ONNX file and check it."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

from .protomodel import ProtoModel

__all__ = ["OPSET", "export_module", "export_onnx", "graph_spec"]

OPSET = 18
INPUT_NAME = "image"
log = logging.getLogger(__name__)


def export_module(module, input_shape: tuple[int, int, int], path: str | Path,
                  output_names: list[str]) -> Path:  # fmt: skip
    """Any image model → one ONNX file with a symbolic batch dimension, fully checked.

    input_shape : (channels, height, width) of one preprocessed image.
    """
    import inspect

    import onnx

    path = Path(path)
    module = module.eval()
    example = torch.randn(2, *input_shape)  # (2, c, h, w)
    arg = next(iter(inspect.signature(module.forward).parameters))  # "x" for timm and ours
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # exporter chatter about deprecations
        torch.onnx.export(
            module,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=output_names,
            dynamic_shapes={arg: {0: batch}},
            opset_version=OPSET,
            external_data=False,
            dynamo=True,
            verbose=False,
        )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    return path


def export_onnx(model: ProtoModel, input_shape: tuple[int, int, int], path: str | Path) -> Path:
    """The prototype model → ONNX with the outputs of its (scores, maps) mode."""
    return export_module(model, input_shape, path, model.output_names)


def graph_spec(model: ProtoModel, input_shape, grid_hw) -> dict:
    """The graph's I/O as the manifest documents it ("N" is the symbolic batch)."""
    C, p, D = model.prototypes.shape
    H, W = grid_hw
    k = model.k
    shapes = {
        "logits": ["N", C],
        "scores": ["N", C, p],
        "contributions": ["N", C, p],
        "bias": ["N", C],
        "topk_classes": ["N", k],
        "topk_scores": ["N", k, p],
        "topk_contributions": ["N", k, p],
        "topk_bias": ["N", k],
        "pooled": ["N", D],
        "topk_maps": ["N", k, p, H, W],
        "maps": ["N", C, p, H, W],
    }
    names = model.output_names
    return {
        "opset": OPSET,
        "input": {"name": INPUT_NAME, "shape": ["N", *input_shape], "dtype": "float32"},
        "outputs": {name: shapes[name] for name in names},
        "maps": model.maps,
        "scores": model.scores,
        "k": k if "topk_classes" in names else None,
    }
