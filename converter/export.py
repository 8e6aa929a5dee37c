"""Export the prototype model to one self-contained ONNX file and check it."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

from protonmf.converter.protomodel import ProtoModel

__all__ = [
    "OPSET",
    "export_module",
    "export_onnx",
    "gathernd_to_gather",
    "graph_spec",
    "pooled_as_global_pool",
]

OPSET = 18
INPUT_NAME = "image"
log = logging.getLogger(__name__)


def export_module(
    module, input_shape: tuple[int, int, int], path: str | Path, output_names: list[str]
) -> Path:
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
    graph = onnx.load(str(path))
    if gathernd_to_gather(graph) + pooled_as_global_pool(graph):
        onnx.save(graph, str(path))
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    return path


def gathernd_to_gather(model) -> int:
    """Rewrite ``GatherND(data, Unsqueeze(idx, [-1]))`` as ``Gather(data, idx, axis=0)``.

    The exporter writes ``table[indices]`` as an Unsqueeze and a GatherND; both pick whole
    rows of axis 0, and one Gather is one node instead of two (per-node overhead is what
    the explanation head costs at batch 1). Returns the number of rewrites; the model is
    changed in place."""
    from onnx import helper, numpy_helper

    graph = model.graph
    consts = {i.name: i for i in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    for out in graph.output:
        consumers[out.name] = consumers.get(out.name, 0) + 1
    dead, axes_names, rewrites = set(), set(), 0
    for i, node in enumerate(graph.node):
        unsq = producer.get(node.input[1]) if node.op_type == "GatherND" else None
        if unsq is None or unsq.op_type != "Unsqueeze" or len(unsq.input) != 2:
            continue
        batch_dims = next((a.i for a in node.attribute if a.name == "batch_dims"), 0)
        axes = consts.get(unsq.input[1])
        if batch_dims != 0 or axes is None or numpy_helper.to_array(axes).tolist() != [-1]:
            continue
        axes_names.add(unsq.input[1])
        graph.node[i].CopyFrom(
            helper.make_node(
                "Gather", [node.input[0], unsq.input[0]], list(node.output), name=node.name, axis=0
            )
        )
        consumers[unsq.output[0]] -= 1
        if consumers[unsq.output[0]] == 0:
            dead.add(unsq.output[0])
        rewrites += 1
    kept = [n for n in graph.node if not (n.op_type == "Unsqueeze" and n.output[0] in dead)]
    del graph.node[:]
    graph.node.extend(kept)
    # and the axes constants only those Unsqueezes read (onnxruntime warns about unused ones)
    unused = axes_names - {name for node in graph.node for name in node.input}
    for init in [i for i in graph.initializer if i.name in unused]:
        graph.initializer.remove(init)
    return rewrites


def pooled_as_global_pool(model) -> int:
    """Rewrite the ``pooled`` output's ``ReduceMean(grid, axes=[2, 3], keepdims=0)`` on the
    (N, D, H, W) feature grid as ``Flatten(GlobalAveragePool(grid))``. Same numbers;
    onnxruntime runs a CNN's convolutions in a blocked layout (NCHWc) and has a
    GlobalAveragePool for it, while a ReduceMean beside the maps' convolution made it
    reorder the whole grid: Fashion at batch 1 went from 1.066x the black box to 1.029x
    (benchmarks/bench_presence.py). Returns the number of rewrites (0 or 1)."""
    from onnx import helper, numpy_helper

    graph = model.graph
    if "pooled" not in {o.name for o in graph.output}:
        return 0
    consts = {i.name: numpy_helper.to_array(i).tolist() for i in graph.initializer}
    for i, node in enumerate(graph.node):
        if node.op_type != "ReduceMean" or list(node.output) != ["pooled"] or len(node.input) < 2:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("keepdims", 1) != 0 or consts.get(node.input[1]) not in ([2, 3], [-2, -1]):
            return 0
        if _rank(model, node.input[0]) != 4:
            return 0
        axes = node.input[1]
        pooled_4d = f"{node.name or 'pooled'}_global_pool"
        graph.node[i].CopyFrom(
            helper.make_node("GlobalAveragePool", [node.input[0]], [pooled_4d], name=pooled_4d)
        )
        graph.node.insert(
            i + 1,
            helper.make_node("Flatten", [pooled_4d], ["pooled"], axis=1, name="pooled_flatten"),
        )
        if not any(axes in n.input for n in graph.node):  # its axes constant, now unused
            graph.initializer.remove(next(t for t in graph.initializer if t.name == axes))
        return 1
    return 0


def _rank(model, name: str) -> int | None:
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    for info in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]:
        if info.name == name:
            return len(info.type.tensor_type.shape.dim)
    return None


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
        "presence": ["N", C, p, H, W],
        "topk_presence": ["N", k, p, H, W],
    }
    names = model.output_names
    return {
        "opset": OPSET,
        "input": {"name": INPUT_NAME, "shape": ["N", *input_shape], "dtype": "float32"},
        "outputs": {name: shapes[name] for name in names},
        "maps": model.maps,
        "scores": model.scores,
        "k": k if "topk_classes" in names else None,
        "presence": model.presence_filters is not None,
    }
