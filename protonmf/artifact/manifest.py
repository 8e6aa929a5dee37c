"""The manifest, typed: what an artifact says about itself, validated when it is read.

``load_manifest`` (store.py) checks every manifest against ``Manifest`` before anything uses
it, so a hand-edited or truncated one is refused with the field and the reason instead of
failing later in a worker. Formats 1–4 validate (fields added later have defaults); fields
this version does not know are kept (``extra="allow"``), so a manifest round-trips.
Readers that want attributes rather than string keys take ``Manifest.of(manifest)``.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from protonmf.artifact.preprocessing import Preprocessing

__all__ = ["ClassDiagnostics", "GraphSpec", "Manifest", "ValidationError", "problem"]

_OPEN = ConfigDict(extra="allow", populate_by_name=True, frozen=True)


class ClassDiagnostics(BaseModel):
    model_config = _OPEN

    class_name: str | None = Field(default=None, alias="class")
    n_images: int = Field(default=0, ge=0)
    explained: bool = True
    fold: str = "sum"  # Eq. 8's even split; "class_vector" / "no_images": prototype 0 is V


class Exactness(BaseModel):
    """The graph (or the rebuilt torch model) against the black box on held-out images."""

    model_config = _OPEN

    max_rel_logit_diff: float
    top1_agreement: float = Field(ge=0, le=1)
    n_images: int = Field(ge=0)
    provider: str | None = None


class Diagnostics(BaseModel):
    model_config = _OPEN

    per_class: list[ClassDiagnostics] = Field(default_factory=list)
    classes_total: int | None = None
    classes_explained: int | None = None
    guarded_classes: list[str] = Field(default_factory=list)
    max_rebuild_rel_error: float | None = None
    torch_exactness: Exactness | None = None
    onnx_exactness: Exactness | None = None


class GraphInput(BaseModel):
    model_config = _OPEN

    name: str
    shape: list[int | str]


class GraphSpec(BaseModel):
    model_config = _OPEN

    input: GraphInput | None = None  # set by every conversion; checked against the graph
    outputs: dict[str, list[int | str]] = Field(default_factory=dict)
    maps: str = "topk"  # "all" | "topk" | "none"
    scores: str = "all"  # "all" | "topk" (format 1 graphs: all)
    k: int | None = Field(default=None, ge=1)
    presence: bool = False
    opset: int | None = None


class HeadInfo(BaseModel):
    model_config = _OPEN

    kind: str = "avg_linear"
    norm_eps: float = Field(default=0.0, ge=0)


class Variant(BaseModel):
    model_config = _OPEN

    file: str


class Manifest(BaseModel):
    """manifest.json. Only what readers rely on is typed; the rest is kept as it is."""

    model_config = _OPEN

    format_version: int
    protonmf_version: str = "unknown"
    created: str = ""
    classes: list[str] = Field(min_length=1)
    class_descriptions: list[str] | None = None
    p: int = Field(ge=1)
    feature_dim: int | None = Field(default=None, ge=1)
    feature_grid: tuple[int, int] | None = None  # the service needs it, the store does not
    head: HeadInfo = Field(default_factory=HeadInfo)
    backbone: dict[str, Any] = Field(default_factory=dict)
    preprocessing: Preprocessing | None = None
    conversion: dict[str, Any] = Field(default_factory=dict)
    diagnostics: Diagnostics = Field(default_factory=Diagnostics)
    exemplars: dict[str, Any] | None = None
    graph: GraphSpec | None = None
    variants: dict[str, Variant] = Field(default_factory=dict)
    files: dict[str, str]

    @model_validator(mode="after")
    def _per_class_lists_match(self) -> Manifest:
        n = len(self.classes)
        if self.class_descriptions is not None and len(self.class_descriptions) != n:
            raise ValueError(
                f"class_descriptions has {len(self.class_descriptions)} entries for {n} classes"
            )
        if self.diagnostics.per_class and len(self.diagnostics.per_class) != n:
            raise ValueError(
                f"diagnostics.per_class has {len(self.diagnostics.per_class)} "
                f"entries for {n} classes"
            )
        return self

    @classmethod
    def of(cls, manifest: dict | Manifest) -> Manifest:
        return manifest if isinstance(manifest, Manifest) else cls.model_validate(manifest)

    @property
    def folds(self) -> list[str]:
        """Each class's fold ("sum" where a manifest says nothing)."""
        return [d.fold for d in self.diagnostics.per_class] or ["sum"] * len(self.classes)

    @property
    def layer_norm_eps(self) -> float | None:
        """The LayerNorm head's epsilon, or None for a plain linear head."""
        return self.head.norm_eps if self.head.kind == "avg_norm_linear" else None


def problem(error: ValidationError) -> str:
    """A pydantic error as one line: the first failing field and why (and how many more)."""
    first = error.errors()[0]
    where = ".".join(str(x) for x in first["loc"]) or "the manifest"
    more = len(error.errors()) - 1
    why = first["msg"].removeprefix("Value error, ")
    return f"{where}: {why}" + (f" (and {more} more)" if more else "")
