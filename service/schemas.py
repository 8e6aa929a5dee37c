"""Request fields shared by the REST endpoints (pydantic)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from .core import Intervention

__all__ = ["InterventionIn", "PrototypeImageIn"]


class InterventionIn(BaseModel):
    """Switch one prototype of one class off for this request (test-time intervention)."""

    # BentoML's OpenAPI Schema takes the singular ``example`` (``examples`` breaks
    # /docs.json and `bentoml build`).
    model_config = ConfigDict(populate_by_name=True, extra="forbid",
                              json_schema_extra={"example": {"class": "bag", "prototype": 1}})  # fmt: skip

    class_name: str | int = Field(alias="class", description="class name or index")
    prototype: int = Field(description="prototype index within the class, 0..p-1")

    def to_core(self) -> Intervention:
        return Intervention(self.class_name, self.prototype)


class PrototypeImageIn(BaseModel):
    """Body of POST /prototype_image: which prototype's exemplar strip to draw."""

    model_config = ConfigDict(
        populate_by_name=True, extra="forbid",
        json_schema_extra={"example": {"class": "bag", "prototype": 0, "kind": "augmented"}},
    )  # fmt: skip

    class_name: str | int = Field(alias="class", description="class name or index")
    prototype: int = Field(description="prototype index within the class, 0..p-1")
    kind: str = Field(default="augmented", description="exemplar kind: augmented (Eq. 9's "
                      "presence of b') or nmf (NMF presence of b)")  # fmt: skip
