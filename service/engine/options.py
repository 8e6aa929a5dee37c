"""What a request asks of the engine, transport-free; the defaults are the schema's
(``protonmf.api.schemas``: declared once, read by every adapter and the client)."""

from __future__ import annotations

from dataclasses import dataclass, field

from protonmf.api.schemas import ClassifyRequest, ExplainRequest, OverlayRequest, default_of

__all__ = ["CLASSIFY_TOP_K", "MAP_KINDS", "OVERLAY_MAP_KIND", "ExplainOptions", "Intervention"]

# similarity: F·b' (the graph's maps); contribution: a·F·b' [/σ], whose spatial mean is the
# prototype's contribution; presence: Eq. 9's E' (graph output, only with --presence)
MAP_KINDS = ("similarity", "contribution", "presence")
CLASSIFY_TOP_K: int = default_of(ClassifyRequest, "top_k")
OVERLAY_MAP_KIND: str = default_of(OverlayRequest, "map_kind")


@dataclass(frozen=True)
class Intervention:
    """Switch prototype ``prototype`` of class ``class_name`` (name or index) off."""

    class_name: str | int
    prototype: int


@dataclass(frozen=True)
class ExplainOptions:
    top_k: int = default_of(ExplainRequest, "top_k")
    heatmaps: bool = default_of(ExplainRequest, "heatmaps")
    box_percentile: float = default_of(ExplainRequest, "box_percentile")
    interventions: tuple[Intervention, ...] = field(default_factory=tuple)
    map_kind: str = default_of(ExplainRequest, "map_kind")  # one of MAP_KINDS
