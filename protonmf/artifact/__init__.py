"""The artifact contract shared by the converter (offline) and the service (online).

An artifact is a directory::

    manifest.json            what everything is: classes, p, preprocessing, graph I/O,
                             backbone identity, diagnostics, checksums of the files below
    model.onnx               the fused explainer graph (logits, scores, contributions, maps)
    prototypes.safetensors   augmented prototypes, NMF prototypes, coefficients, bias, residuals

This package needs numpy, safetensors and Pillow only: never torch. Both halves import it,
so a change of layout is a change of ``FORMAT_VERSION``. Version 2 added the graph's
``scores`` mode (``"topk"``: scores for the predicted classes + pooled features); version 1
artifacts (all-class scores, no ``graph.scores``) are still read, as ``scores="all"``.
Version 3: an all-scores graph emits ``bias`` only where it depends on the image (LayerNorm
heads); otherwise it is the ``bias`` tensor below (``protonmf.graph.GraphSession.run`` adds
it back). Versions 1 and 2 read unchanged.
Version 4: every graph emits ``pooled`` (the residual split of any class needs it), an
optional ``presence`` graph output (Eq. 9's E', ``graph.presence``) with its
``presence_filters`` tensor, and an optional ``exemplars.safetensors``
(``protonmf/artifact/exemplars.py``). Older versions read as artifacts without these.

Modules: ``store`` (directory, manifest, checksums, tensors), ``preprocessing`` (timm's eval
transform, without torch), ``exemplars`` (each prototype's best training images).
"""

from protonmf.artifact.preprocessing import (
    INTERPOLATIONS,
    Preprocessing,
    normalize,
    preprocess,
    resize_crop,
)
from protonmf.artifact.store import (
    FORMAT_VERSION,
    MANIFEST_FILE,
    MODEL_FILE,
    READABLE_VERSIONS,
    TENSORS_FILE,
    ArtifactError,
    kept_files,
    load_manifest,
    load_tensors,
    remove_stale,
    scratch,
    scratch_dir,
    sha256_file,
    write_artifact,
)

__all__ = [
    "FORMAT_VERSION",
    "INTERPOLATIONS",
    "MANIFEST_FILE",
    "MODEL_FILE",
    "READABLE_VERSIONS",
    "TENSORS_FILE",
    "ArtifactError",
    "Preprocessing",
    "kept_files",
    "load_manifest",
    "load_tensors",
    "normalize",
    "preprocess",
    "remove_stale",
    "resize_crop",
    "scratch",
    "scratch_dir",
    "sha256_file",
    "write_artifact",
]
