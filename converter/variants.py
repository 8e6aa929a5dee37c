"""Opt-in reduced-precision graphs beside the exact fp32 one, each with measured agreement.

- ``int8``: static QDQ quantisation of the backbone's convolutions, calibrated on the
  conversion images. The prototype head (MatMul, Einsum) stays fp32, so contributions
  still add up to the graph's own logits exactly; how far those logits are from fp32 is
  measured on the held-out images and written into the manifest.
- ``fp16``: the whole graph in half precision with fp32 inputs/outputs, meant for GPUs;
  its agreement is measured where onnxruntime can run it.

fp32 (``model.onnx``) stays the default and the only graph called exact.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from protonmf.artifact import (
    MODEL_FILE,
    kept_files,
    load_manifest,
    load_tensors,
    preprocess,
    scratch,
    write_artifact,
)
from protonmf.artifact.manifest import Manifest
from protonmf.data import load_samples

__all__ = ["add_variants"]

log = logging.getLogger(__name__)
VARIANT_FILES = {"int8": "model.int8.onnx", "fp16": "model.fp16.onnx"}


def _images(manifest, folder, limit):
    info = Manifest.of(manifest)
    samples = load_samples(folder, info.classes)
    step = max(1, len(samples) // limit)
    spec = info.preprocessing
    return np.stack([preprocess(s.open(), spec) for s in samples[::step][:limit]])


def _prototype_convs(fp32: Path, n_rows: int) -> list[str]:
    """The all-class head's 1×1 convolution(s) of the C·p prototypes: left in fp32, so the
    explanation head is exact arithmetic on whatever features the int8 backbone gives."""
    import onnx

    graph = onnx.load(str(fp32)).graph
    shapes = {i.name: tuple(i.dims) for i in graph.initializer}
    return [
        n.name
        for n in graph.node
        if n.op_type == "Conv"
        and len(n.input) > 1
        and shapes.get(n.input[1], ())[:1] == (n_rows,)
        and shapes[n.input[1]][2:] == (1, 1)
    ]


def _quantize_int8(fp32: Path, out: Path, calibration: np.ndarray, keep: list[str]) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(np.array_split(calibration, max(1, len(calibration) // 16)))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"image": batch.astype(np.float32)}

    quantize_static(
        str(fp32),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["Conv"],
        nodes_to_exclude=keep,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )


def _to_fp16(fp32: Path, out: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(
        onnx.load(str(fp32)), keep_io_types=True, op_block_list=["TopK"]
    )
    onnx.save(model, str(out))


def _agreement(reference: np.ndarray, path: Path, images: np.ndarray, device: str) -> dict:
    from protonmf.graph import create_session

    session, provider = create_session(path, device)
    got = np.concatenate(
        [
            session.run(["logits"], {"image": b})[0]
            for b in np.array_split(images, max(1, len(images) // 32))
        ]
    )
    scale = np.maximum(np.abs(reference).max(1), 1e-12)
    return {
        "top1_agreement": float((got.argmax(1) == reference.argmax(1)).mean()),
        "max_rel_logit_diff": float((np.abs(got - reference).max(1) / scale).max()),
        "n_images": int(len(images)),
        "provider": provider,
    }


def add_variants(
    artifact: str | Path, kinds=("int8",), calibration_images: int = 128, eval_images: int = 500
) -> dict:
    """Write the requested variants into the artifact and record their agreement.

    Calibration uses the conversion images; agreement the held-out ones (or the conversion
    images when there are none). Returns the manifest's new ``variants`` section.
    """
    from protonmf.graph import create_session

    artifact = Path(artifact)
    manifest = load_manifest(artifact)
    tensors = load_tensors(artifact, manifest)
    conv = manifest["conversion"]
    calib = _images(manifest, conv["data"], calibration_images)
    held = _images(manifest, conv.get("heldout") or conv["data"], eval_images)
    fp32 = artifact / MODEL_FILE
    session, _ = create_session(fp32)
    reference = np.concatenate(
        [
            session.run(["logits"], {"image": b})[0]
            for b in np.array_split(held, max(1, len(held) // 32))
        ]
    )
    variants = {k: v for k, v in manifest.get("variants", {}).items() if k not in kinds}
    extra = {v["file"]: artifact / v["file"] for v in variants.values()}
    extra.update(
        {
            n: f
            for n, f in kept_files(artifact, manifest).items()
            if n not in {VARIANT_FILES[k] for k in kinds if k in VARIANT_FILES}
        }
    )
    with scratch(artifact, "export") as tmp:
        for kind in kinds:
            if kind not in VARIANT_FILES:
                raise ValueError(f"unknown variant {kind!r}; choose from {sorted(VARIANT_FILES)}")
            out = Path(tmp) / VARIANT_FILES[kind]
            if kind == "int8":
                info = Manifest.of(manifest)
                keep = _prototype_convs(fp32, len(info.classes) * info.p)
                _quantize_int8(fp32, out, calib, keep)
            else:
                _to_fp16(fp32, out)
            entry = {"file": out.name, "exact": False}
            try:
                # fp16 is meant for GPUs: measured there when one is usable (provider recorded).
                device = "auto" if kind == "fp16" else "cpu"
                entry["agreement"] = _agreement(reference, out, held, device)
            except RuntimeError as e:  # onnxruntime's Fail/NotImplemented are RuntimeErrors
                # e.g. no fp16 kernels on this CPU: keep the graph, say it was not measured.
                entry["agreement"] = None
                entry["not_measured"] = f"{type(e).__name__}: {str(e)[:300]}"
            variants[kind] = entry
            extra[out.name] = out
        manifest = dict(manifest, variants=variants)
        manifest.pop("files", None)
        write_artifact(artifact, manifest, tensors, fp32, extra_files=extra)
    return variants
