"""The typed schema of the REST API (pydantic v2): every request body and every JSON response.

One schema for the whole API (issue #17): the REST endpoints take the request models and
answer bodies that validate against the response models (tests/test_schemas.py checks the
core's real bodies), the gRPC messages carry the same fields (protomap.py converts, and the
tests check field for field that the .proto and these models name the same things) and the
client (protonmf/client.py) returns these models over either transport.

JSON keys are the models' aliases: ``class`` is ``class_name`` in Python (and in the .proto).
Response models forbid unknown fields, so a body that drifts from its model fails its test.

Only pydantic here (and the standard library): the client imports this module without
BentoML or onnxruntime.

OpenAPI: BentoML 1.4 builds /docs.json from these models: ``@bentoml.api(output_spec=
ExplainResponse)`` documents the 200 answer even where the endpoint returns a ready-encoded
starlette Response (BentoML sends a Response as it is). Its ``Schema`` object takes the
singular ``example`` (``examples`` at a model's top level breaks /docs.json and
`bentoml build`), hence ``json_schema_extra={"example": ...}`` on the models.
``with_error_responses`` adds every error status with ``ErrorBody`` to the generated spec
and ``without_io_suffix`` gives the models back their names (BentoML's
``ExplainResponseIODescriptor``); both take and return the spec as a dict.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ERROR_STATUSES",
    "ROUTE_ERRORS",
    "ArtifactInfo",
    "Box",
    "CellRect",
    "ClassExplanation",
    "ClassPrototypes",
    "ClassScore",
    "ClassSummary",
    "Classification",
    "ClassifyRequest",
    "ClassifyResponse",
    "ErrorBody",
    "Exemplar",
    "default_of",
    "ExemplarsInfo",
    "ExplainRequest",
    "ExplainResponse",
    "ExplainedShare",
    "Explanation",
    "Heatmap",
    "InterventionIn",
    "InterventionResult",
    "LimitsInfo",
    "MapKind",
    "ModelInfo",
    "OverlayRequest",
    "Peak",
    "PreprocessingInfo",
    "PrototypeExplanation",
    "PrototypeImageIn",
    "PrototypeImageRequest",
    "PrototypeInfo",
    "PrototypesRequest",
    "PrototypesResponse",
    "Rect",
    "ResidualShare",
    "SwitchedOff",
    "with_error_responses",
    "without_io_suffix",
]

MapKind = Literal["similarity", "contribution", "presence"]
Fold = Literal["sum", "min_norm", "class_vector", "no_images"]


def _config(example: Any = None, *, extra: str = "forbid") -> ConfigDict:
    config = ConfigDict(populate_by_name=True, serialize_by_alias=True, extra=extra)
    if example is not None:
        config["json_schema_extra"] = {"example": example}
    return config


_CLASS = Field(alias="class", description="class name")

# --- examples (small, but the shapes the service answers) ----------------------------

_EXEMPLAR = {"image": 17, "source": "train/bag/00017.png", "presence": 0.83}
_HEATMAP = {
    "kind": "similarity",
    "shape": [2, 2],
    "values": [[0.1, 0.7], [0.0, 0.2]],
    "peak": {"row": 0, "col": 1},
    "box": {
        "percentile": 90.0,
        "feature": {"top": 0, "left": 1, "bottom": 1, "right": 2},
        "input": {"top": 0.0, "left": 28.0, "bottom": 28.0, "right": 56.0},
    },
}
_PROTOTYPE_EXPLANATION = {
    "prototype": 0,
    "coefficient": 0.11,
    "score": 41.2,
    "contribution": 4.53,
    "nmf_contribution": 4.1,
    "residual_contribution": 0.43,
    "share_of_logit": 0.52,
    "exemplars": [_EXEMPLAR],
    "heatmap": _HEATMAP,
}
_CLASS_EXPLANATION = {
    "class": "bag",
    "index": 8,
    "description": None,
    "logit": 8.71,
    "probability": 0.97,
    "bias": 0.12,
    "exactness_gap": 1.9e-06,
    "residual_share": {"logit": 0.08, "margin": 0.05, "versus": "sandal"},
    "prototypes": [_PROTOTYPE_EXPLANATION],
}
_SCORE = {"class": "bag", "index": 8, "logit": 8.71, "probability": 0.97}
_INTERVENTION_RESULT = {
    "switched_off": [{"class": "bag", "prototype": 0}],
    "logits": {"bag": 4.18},
    "top_k": [{"class": "sandal", "index": 5, "logit": 5.02, "probability": 0.61}],
    "prediction_before": "bag",
    "prediction_after": "sandal",
    "prediction_changed": True,
}
_EXPLANATION = {"top_k": [_CLASS_EXPLANATION], "exactness": 2.2e-07, "intervention": None}
_PROTOTYPE_INFO = {
    "prototype": 0,
    "coefficient": 0.11,
    "fold_weight": 0.4,
    "exemplars": {"augmented": [_EXEMPLAR], "nmf": [_EXEMPLAR]},
}
_CLASS_PROTOTYPES = {
    "class": "bag",
    "index": 8,
    "explained": True,
    "fold": "sum",
    "explained_share": {"energy": 0.93, "norm_ratio": 0.97},
    "prototypes": [_PROTOTYPE_INFO],
}
_PREPROCESSING = {
    "height": 56,
    "width": 56,
    "resize": 56,
    "color_mode": "L",
    "interpolation": "bilinear",
    "mean": [0.286],
    "std": [0.353],
}
_LIMITS = {
    "max_bytes": 8388608,
    "max_pixels": 24000000,
    "min_side": 8,
    "max_side": 16384,
    "max_aspect": 32,
    "max_raster_bytes": 67108864,
    "max_scans": 64,
    "max_decode_ms": 3000,
    "max_images": 16,
    "max_interventions": 64,
    "jpeg_draft": False,
}
_ARTIFACT = {
    "format_version": 4,
    "protonmf_version": "0.1.0",
    "created": "2025-01-01T12:00:00+00:00",
    "model_sha256": "fe56b36f…",
    "prototypes_sha256": "88531cd0…",
}
_EXEMPLARS_INFO = {
    "file": "exemplars.safetensors",
    "m": 8,
    "kinds": ["augmented", "nmf"],
    "ranking": "peak",
    "images": 323,
}
_MODEL_INFO = {
    "classes": ["sandal", "bag"],
    "class_descriptions": None,
    "p": 1,
    "coefficients": [[0.09], [0.11]],
    "prototypes": [
        {"class": "sandal", "explained": True, "fold": "sum", "n_images": 200},
        {"class": "bag", "explained": True, "fold": "sum", "n_images": 200},
    ],
    "feature_grid": [7, 7],
    "heatmap_classes": 2,
    "map_kinds": ["similarity", "contribution"],
    "residual_split": True,
    "exemplars": _EXEMPLARS_INFO,
    "scores": "all",
    "maps": "all",
    "preprocessing": _PREPROCESSING,
    "backbone": "resnet18",
    "artifact": _ARTIFACT,
    "provider": "CPUExecutionProvider",
    "variant": "fp32",
    "limits": _LIMITS,
}


# --- requests -------------------------------------------------------------------------

_IMAGES = Field(default_factory=list, description="image files (multipart), JPEG/PNG/WebP")
_IMAGES_B64 = Field(
    default_factory=list,
    description="base64-encoded images (JSON requests)",
    examples=[["iVBORw0KGgo..."]],
)


class InterventionIn(BaseModel):
    """Switch one prototype of one class off for this request (test-time intervention)."""

    model_config = _config({"class": "bag", "prototype": 1})

    class_name: str | int = Field(alias="class", description="class name or index")
    prototype: int = Field(description="prototype index within the class, 0..p-1")

    def to_core(self):
        """The engine's ``Intervention`` (imported here: the engine needs onnxruntime)."""
        from protonmf.service.engine.options import Intervention

        return Intervention(self.class_name, self.prototype)


class ClassifyRequest(BaseModel):
    """Body of POST /classify (JSON: ``images_base64``; multipart: ``images`` files)."""

    model_config = _config({"images_base64": ["iVBORw0KGgo..."], "top_k": 5})

    images: list[Path] = _IMAGES
    images_base64: list[str] = _IMAGES_B64
    top_k: int = Field(default=5, ge=1, description="classes to return per image")


class ExplainRequest(BaseModel):
    """Body of POST /explain."""

    model_config = _config(
        {
            "images_base64": ["iVBORw0KGgo..."],
            "top_k": 3,
            "heatmaps": True,
            "box_percentile": 90.0,
            "map_kind": "similarity",
            "interventions": [{"class": "bag", "prototype": 1}],
        }
    )

    images: list[Path] = _IMAGES
    images_base64: list[str] = _IMAGES_B64
    top_k: int = Field(default=3, ge=1, description="classes to explain per image")
    heatmaps: bool = Field(default=True, description="include prototype heatmaps")
    box_percentile: float = Field(default=90.0, description="heatmap box threshold (0..100)")
    interventions: list[InterventionIn] = Field(
        default_factory=list,
        description="prototypes to switch off: counterfactual logits and top-k",
        examples=[[{"class": "bag", "prototype": 1}]],
    )
    map_kind: str = Field(
        default="similarity",
        description="heatmap kind: similarity (F·b'), contribution (a·F·b' [/σ], its mean is "
        "the contribution) or presence (Eq. 9's E'; 422 no_presence_maps unless the graph "
        "was exported with --presence)",
        examples=["contribution"],
    )


class OverlayRequest(BaseModel):
    """Body of POST /overlay (exactly one image)."""

    model_config = _config(
        {"images_base64": ["iVBORw0KGgo..."], "rank": 0, "map_kind": "contribution"}
    )

    images: list[Path] = _IMAGES
    images_base64: list[str] = _IMAGES_B64
    rank: int = Field(default=0, ge=0, description="which of the top-k classes (0 = top)")
    map_kind: str = Field(
        default="contribution", description="contribution (default) | similarity | presence"
    )


class PrototypesRequest(BaseModel):
    """Body of POST /prototypes."""

    model_config = _config({"classes": ["bag"]})

    classes: list[str | int] = Field(
        default_factory=list,
        description="class names or indices (default: all)",
        examples=[["bag"]],
    )


class PrototypeImageRequest(BaseModel):
    """Body of POST /prototype_image: which prototype's exemplar strip to draw."""

    model_config = _config({"class": "bag", "prototype": 0, "kind": "augmented"})

    class_name: str | int = Field(alias="class", description="class name or index")
    prototype: int = Field(description="prototype index within the class, 0..p-1")
    kind: str = Field(
        default="augmented",
        description="exemplar kind: augmented (Eq. 9's presence of b') or nmf (NMF presence of b)",
    )


PrototypeImageIn = PrototypeImageRequest  # the name service.py has used


def default_of(model: type[BaseModel], name: str) -> Any:
    """A request field's default. Request defaults are declared once, on the models above;
    the engine, the gRPC and OIP adapters and the client read them from here."""
    return model.model_fields[name].get_default(call_default_factory=True)


# --- responses: /classify -------------------------------------------------------------


class ClassScore(BaseModel):
    model_config = _config(_SCORE)

    class_name: str = _CLASS
    index: int
    logit: float
    probability: float


class Classification(BaseModel):
    """One image's top-k classes, best first."""

    model_config = _config({"top_k": [_SCORE]})

    top_k: list[ClassScore]


class ClassifyResponse(BaseModel):
    """Body of a POST /classify answer: per image, in request order."""

    model_config = _config({"predictions": [{"top_k": [_SCORE]}]})

    predictions: list[Classification]


# --- responses: /explain --------------------------------------------------------------


class Peak(BaseModel):
    model_config = _config()

    row: int
    col: int


class CellRect(BaseModel):
    """A box in feature-map cells (bottom and right exclusive)."""

    model_config = _config()

    top: int
    left: int
    bottom: int
    right: int


class Rect(BaseModel):
    """A box in pixels of the model's input crop (preprocessing height × width)."""

    model_config = _config()

    top: float
    left: float
    bottom: float
    right: float


class Box(BaseModel):
    """The box around the cells at or above the map's ``percentile``."""

    model_config = _config(_HEATMAP["box"])

    percentile: float
    feature: CellRect
    input: Rect


class Heatmap(BaseModel):
    """One prototype's map over the feature grid (values rounded to 5 decimals)."""

    model_config = _config(_HEATMAP)

    kind: MapKind
    shape: list[int] = Field(description="[H, W], the feature grid")
    values: list[list[float]] = Field(description="H rows of W values")
    peak: Peak
    box: Box


class Exemplar(BaseModel):
    """A training image where a prototype is most present."""

    model_config = _config(_EXEMPLAR)

    image: int = Field(description="index into the artifact's exemplar thumbnails")
    source: str = Field(description="its file, relative to the conversion's data root")
    presence: float = Field(description="peak presence of the prototype on that image")


class PrototypeExplanation(BaseModel):
    model_config = _config(_PROTOTYPE_EXPLANATION)

    prototype: int
    coefficient: float
    score: float
    contribution: float
    nmf_contribution: float | None = Field(
        description="a (b·f) [/σ]; null for a graph without pooled features"
    )
    residual_contribution: float | None = Field(
        description="a (Δ·f) [/σ], Δ = b' − b; null for a graph without pooled features"
    )
    share_of_logit: float | None = Field(description="contribution / logit; null for logit 0")
    exemplars: list[Exemplar] = Field(description="augmented-kind exemplars, best first")
    heatmap: Heatmap | None = Field(default=None, description="absent with heatmaps=false")


class ResidualShare(BaseModel):
    """The residual's part of a class's logit and of its margin over its best rival."""

    model_config = _config(_CLASS_EXPLANATION["residual_share"])

    logit: float | None = Field(description="r_c / (logit_c − bias_c); null when that is 0")
    margin: float | None = Field(description="(r_c − r_o) / (logit_c − logit_o); null on a tie")
    versus: str | None = Field(
        description="o: the runner-up for the top class, the top class for the others"
    )


class ClassExplanation(BaseModel):
    model_config = _config(_CLASS_EXPLANATION)

    class_name: str = _CLASS
    index: int
    description: str | None
    logit: float
    probability: float
    bias: float
    exactness_gap: float = Field(description="logit − (Σ contributions + bias)")
    residual_share: ResidualShare | None = Field(
        description="null for a graph without pooled features"
    )
    prototypes: list[PrototypeExplanation]


class SwitchedOff(BaseModel):
    model_config = _config({"class": "bag", "prototype": 0})

    class_name: str = _CLASS
    prototype: int


class InterventionResult(BaseModel):
    """Counterfactual logits and top-k with the asked prototypes switched off."""

    model_config = _config(_INTERVENTION_RESULT)

    switched_off: list[SwitchedOff]
    logits: dict[str, float] = Field(
        description="counterfactual logits of the classes touched, by class name"
    )
    top_k: list[ClassScore]
    prediction_before: str
    prediction_after: str
    prediction_changed: bool


class Explanation(BaseModel):
    """One image's explanation."""

    model_config = _config(_EXPLANATION)

    top_k: list[ClassExplanation]
    exactness: float = Field(description="max |exactness_gap| / max |logit|")
    intervention: InterventionResult | None


class ExplainResponse(BaseModel):
    """Body of a POST /explain answer: per image, in request order."""

    model_config = _config({"explanations": [_EXPLANATION], "provider": "CPUExecutionProvider"})

    explanations: list[Explanation]
    provider: str = Field(description="onnxruntime execution provider that ran the graph")


# --- responses: /prototypes -----------------------------------------------------------


class ExplainedShare(BaseModel):
    model_config = _config(_CLASS_PROTOTYPES["explained_share"])

    energy: float | None = Field(description="1 − ‖R‖²/‖V‖²; null when V = 0")
    norm_ratio: float | None = Field(description="‖a·B‖/‖V‖; null when V = 0")


class PrototypeInfo(BaseModel):
    model_config = _config(_PROTOTYPE_INFO)

    prototype: int
    coefficient: float
    fold_weight: float | None = Field(
        description="w with b' = b + w R; null for artifacts without fold weights"
    )
    exemplars: dict[str, list[Exemplar]] = Field(description="by kind (augmented, nmf), best first")


class ClassPrototypes(BaseModel):
    model_config = _config(_CLASS_PROTOTYPES)

    class_name: str = _CLASS
    index: int
    explained: bool
    fold: Fold
    explained_share: ExplainedShare
    prototypes: list[PrototypeInfo]


class PrototypesResponse(BaseModel):
    """Body of a POST /prototypes answer."""

    model_config = _config(
        {"p": 1, "exemplar_kinds": ["augmented", "nmf"], "classes": [_CLASS_PROTOTYPES]}
    )

    p: int
    exemplar_kinds: list[str]
    classes: list[ClassPrototypes]


# --- responses: /model ----------------------------------------------------------------


class ClassSummary(BaseModel):
    model_config = _config(_MODEL_INFO["prototypes"][0])

    class_name: str = _CLASS
    explained: bool
    fold: Fold
    n_images: int


class ExemplarsInfo(BaseModel):
    """The manifest's exemplars block."""

    model_config = _config(_EXEMPLARS_INFO)

    file: str
    m: int = Field(description="exemplars per prototype and kind")
    kinds: list[str]
    ranking: str
    images: int = Field(description="distinct thumbnails stored")


class PreprocessingInfo(BaseModel):
    """How an image becomes the graph's input (protonmf.artifact.Preprocessing)."""

    model_config = _config(_PREPROCESSING)

    height: int
    width: int
    resize: int
    color_mode: Literal["RGB", "L"]
    interpolation: str
    mean: list[float]
    std: list[float]
    crop_mode: Literal["center", "squash", "border"] = "center"
    resize_hw: list[int] | None = None


class LimitsInfo(BaseModel):
    """Request limits (imaging.Limits)."""

    model_config = _config(_LIMITS)

    max_bytes: int
    max_pixels: int
    min_side: int
    max_side: int
    max_aspect: int
    max_raster_bytes: int
    max_scans: int
    max_decode_ms: int
    max_images: int
    max_interventions: int
    jpeg_draft: bool


class ArtifactInfo(BaseModel):
    model_config = _config(_ARTIFACT)

    format_version: int
    protonmf_version: str
    created: str
    model_sha256: str | None
    prototypes_sha256: str | None


class ModelInfo(BaseModel):
    """Body of a POST /model answer (gRPC: ModelInfoResponse.json, with a few fields of it
    as fields of their own)."""

    model_config = _config(_MODEL_INFO)

    classes: list[str]
    class_descriptions: list[str] | None
    p: int
    coefficients: list[list[float]] = Field(description="(classes, p), rounded to 6 decimals")
    prototypes: list[ClassSummary]
    feature_grid: list[int]
    heatmap_classes: int = Field(description="how many top classes have maps (0: none)")
    map_kinds: list[MapKind]
    residual_split: bool
    exemplars: ExemplarsInfo | None
    scores: Literal["all", "topk"]
    maps: Literal["all", "topk", "none"]
    preprocessing: PreprocessingInfo
    backbone: str | None
    artifact: ArtifactInfo
    provider: str
    variant: str
    limits: LimitsInfo


# --- errors ---------------------------------------------------------------------------

# status → (OpenAPI description, example reason) for every error the REST API answers
ERROR_STATUSES: dict[int, tuple[str, str]] = {
    400: (
        "Invalid input: not base64, a malformed form or body, a field out of bounds",
        "bad_base64",
    ),
    408: ("The request body did not arrive in time (slow client)", "body_timeout"),
    413: (
        "Payload too large: an image's bytes, pixels or decoding time, or too many images",
        "too_large",
    ),
    415: ("Unsupported media type: not JPEG, PNG or WebP, or animated", "unsupported_media_type"),
    422: (
        "Unprocessable: a valid image but an unusable request (unknown class, top_k out "
        "of range, no maps of that kind, …)",
        "unknown_class",
    ),
    429: ("Too many requests in flight on this worker; retry later", "too_many_requests"),
    500: ("Internal error", "internal"),
    503: ("Overloaded (queue full; see Retry-After) or not ready yet", "queue_full"),
    504: ("Not answered within the request timeout", "timeout"),
}


class ErrorBody(BaseModel):
    """Body of every REST error answer (ServiceError.to_dict())."""

    model_config = _config(
        {"error": "unknown class 'hat' [unknown_class]", "reason": "unknown_class", "status": 422}
    )

    error: str = Field(description="what went wrong, for people, ending with [reason]")
    reason: str = Field(
        description="a stable machine-readable reason (too_large, "
        "unsupported_media_type, unknown_class, …)"
    )
    status: int = Field(description="the HTTP status, repeated")


# route → the error statuses it can answer; routes not here (those taking images) get all
ROUTE_ERRORS: dict[str, tuple[int, ...]] = {
    "/model": (400, 408, 429, 500, 503, 504),
    "/prototypes": (400, 408, 422, 429, 500, 503, 504),
    "/prototype_image": (400, 408, 422, 429, 500, 503, 504),
}


def with_error_responses(
    spec: dict,
    statuses: Mapping[str, Iterable[int]] | None = None,
    ref_template: str = "#/components/schemas/{model}",
) -> dict:
    """A generated OpenAPI spec (dict) with ``ErrorBody`` as a component and an error
    response of that schema, with an example, for each status of each operation.

    ``statuses``: route → statuses (default ROUTE_ERRORS); routes not in it get every
    status in ERROR_STATUSES. Only operations BentoML tags "Service APIs" are touched (not
    /healthz, /metrics, ...). A status already documented (BentoML's own 400 and 500) is
    replaced, others (its 404) are left. Returns a new dict; ``spec`` is left as it was.
    """
    spec = copy.deepcopy(spec)
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    schemas["ErrorBody"] = ErrorBody.model_json_schema(ref_template=ref_template)
    ref = {"$ref": ref_template.format(model="ErrorBody")}
    statuses = ROUTE_ERRORS if statuses is None else statuses
    for route, item in spec.get("paths", {}).items():
        for operation in item.values():
            if not isinstance(operation, dict) or "Service APIs" not in operation.get("tags", ()):
                continue
            responses = operation.setdefault("responses", {})
            for status in statuses.get(route, ERROR_STATUSES):
                description, reason = ERROR_STATUSES[status]
                responses.pop(status, None)  # BentoML's keys: ints before JSON encoding
                responses.pop(str(status), None)
                responses[str(status)] = {
                    "description": description,
                    "content": {
                        "application/json": {
                            "schema": ref,
                            "example": {
                                "error": f"{description} [{reason}]",
                                "reason": reason,
                                "status": status,
                            },
                        }
                    },
                }
    return spec


def without_io_suffix(spec: dict, suffix: str = "IODescriptor") -> dict:
    """A generated OpenAPI spec (dict) with BentoML's names for models given as
    ``input_spec``/``output_spec`` (``ExplainResponseIODescriptor``) back to the models' own
    (``ExplainResponse``), where that name is free: component keys, titles and $refs.
    Returns a new dict."""
    spec = copy.deepcopy(spec)
    schemas = spec.get("components", {}).get("schemas", {})
    renames = {
        name: name[: -len(suffix)]
        for name in schemas
        if name.endswith(suffix) and name[: -len(suffix)] not in schemas
    }
    if not renames:
        return spec
    spec["components"]["schemas"] = {renames.get(k, k): v for k, v in schemas.items()}
    refs = {f"/{old}": f"/{new}" for old, new in renames.items()}

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("title") in renames:
                node["title"] = renames[node["title"]]
            ref = node.get("$ref")
            if isinstance(ref, str) and ref[ref.rfind("/") :] in refs:
                node["$ref"] = ref[: ref.rfind("/")] + refs[ref[ref.rfind("/") :]]
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(spec)
    return spec
