"""Export the prototype model to one self-contained ONNX file and check it."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

from .protomodel import OUTPUTS, ProtoModel

__all__ = ["OPSET", "export_onnx", "graph_spec"]

OPSET = 18
INPUT_NAME = "image"
log = logging.getLogger(__name__)


def export_onnx(model: ProtoModel, input_shape: tuple[int, int, int], path: str | Path) -> Path:
    """Write ``model`` as ONNX with a symbolic batch dimension, then run the full checker.

    input_shape : (channels, height, width) of one preprocessed image.
    """
    import onnx

    path = Path(path)
    model = model.eval()
    example = torch.randn(2, *input_shape)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # exporter chatter about deprecations
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=OUTPUTS[model.maps],
            dynamic_shapes={"x": {0: batch}},
            opset_version=OPSET,
            external_data=False,
            dynamo=True,
            verbose=False,
        )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    return path


def graph_spec(model: ProtoModel, input_shape, grid_hw) -> dict:
    """The graph's I/O as the manifest documents it ("N" is the symbolic batch)."""
    C, p, _ = model.prototypes.shape
    H, W = grid_hw
    shapes = {
        "logits": ["N", C],
        "scores": ["N", C, p],
        "contributions": ["N", C, p],
        "bias": ["N", C],
        "topk_classes": ["N", model.k],
        "topk_maps": ["N", model.k, p, H, W],
        "maps": ["N", C, p, H, W],
    }
    return {
        "opset": OPSET,
        "input": {"name": INPUT_NAME, "shape": ["N", *input_shape], "dtype": "float32"},
        "outputs": {name: shapes[name] for name in OUTPUTS[model.maps]},
        "maps": model.maps,
        "k": model.k if model.maps == "topk" else None,
    }
