from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ClassifyRequest(_message.Message):
    __slots__ = ("images", "top_k")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedScalarFieldContainer[bytes]
    top_k: int
    def __init__(self, images: _Optional[_Iterable[bytes]] = ..., top_k: _Optional[int] = ...) -> None: ...

class ClassScore(_message.Message):
    __slots__ = ("class_name", "index", "logit", "probability")
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LOGIT_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    class_name: str
    index: int
    logit: float
    probability: float
    def __init__(self, class_name: _Optional[str] = ..., index: _Optional[int] = ..., logit: _Optional[float] = ..., probability: _Optional[float] = ...) -> None: ...

class Classification(_message.Message):
    __slots__ = ("top_k",)
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    top_k: _containers.RepeatedCompositeFieldContainer[ClassScore]
    def __init__(self, top_k: _Optional[_Iterable[_Union[ClassScore, _Mapping]]] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("predictions",)
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    predictions: _containers.RepeatedCompositeFieldContainer[Classification]
    def __init__(self, predictions: _Optional[_Iterable[_Union[Classification, _Mapping]]] = ...) -> None: ...

class Intervention(_message.Message):
    __slots__ = ("class_name", "prototype")
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    PROTOTYPE_FIELD_NUMBER: _ClassVar[int]
    class_name: str
    prototype: int
    def __init__(self, class_name: _Optional[str] = ..., prototype: _Optional[int] = ...) -> None: ...

class ExplainRequest(_message.Message):
    __slots__ = ("images", "top_k", "heatmaps", "box_percentile", "interventions", "map_kind")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    HEATMAPS_FIELD_NUMBER: _ClassVar[int]
    BOX_PERCENTILE_FIELD_NUMBER: _ClassVar[int]
    INTERVENTIONS_FIELD_NUMBER: _ClassVar[int]
    MAP_KIND_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedScalarFieldContainer[bytes]
    top_k: int
    heatmaps: bool
    box_percentile: float
    interventions: _containers.RepeatedCompositeFieldContainer[Intervention]
    map_kind: str
    def __init__(self, images: _Optional[_Iterable[bytes]] = ..., top_k: _Optional[int] = ..., heatmaps: _Optional[bool] = ..., box_percentile: _Optional[float] = ..., interventions: _Optional[_Iterable[_Union[Intervention, _Mapping]]] = ..., map_kind: _Optional[str] = ...) -> None: ...

class Peak(_message.Message):
    __slots__ = ("row", "col")
    ROW_FIELD_NUMBER: _ClassVar[int]
    COL_FIELD_NUMBER: _ClassVar[int]
    row: int
    col: int
    def __init__(self, row: _Optional[int] = ..., col: _Optional[int] = ...) -> None: ...

class Rect(_message.Message):
    __slots__ = ("top", "left", "bottom", "right")
    TOP_FIELD_NUMBER: _ClassVar[int]
    LEFT_FIELD_NUMBER: _ClassVar[int]
    BOTTOM_FIELD_NUMBER: _ClassVar[int]
    RIGHT_FIELD_NUMBER: _ClassVar[int]
    top: float
    left: float
    bottom: float
    right: float
    def __init__(self, top: _Optional[float] = ..., left: _Optional[float] = ..., bottom: _Optional[float] = ..., right: _Optional[float] = ...) -> None: ...

class Box(_message.Message):
    __slots__ = ("percentile", "feature", "input")
    PERCENTILE_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    percentile: float
    feature: Rect
    input: Rect
    def __init__(self, percentile: _Optional[float] = ..., feature: _Optional[_Union[Rect, _Mapping]] = ..., input: _Optional[_Union[Rect, _Mapping]] = ...) -> None: ...

class Heatmap(_message.Message):
    __slots__ = ("shape", "values", "peak", "box", "kind")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    PEAK_FIELD_NUMBER: _ClassVar[int]
    BOX_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    peak: Peak
    box: Box
    kind: str
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., values: _Optional[_Iterable[float]] = ..., peak: _Optional[_Union[Peak, _Mapping]] = ..., box: _Optional[_Union[Box, _Mapping]] = ..., kind: _Optional[str] = ...) -> None: ...

class Exemplar(_message.Message):
    __slots__ = ("image", "source", "presence")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_FIELD_NUMBER: _ClassVar[int]
    image: int
    source: str
    presence: float
    def __init__(self, image: _Optional[int] = ..., source: _Optional[str] = ..., presence: _Optional[float] = ...) -> None: ...

class PrototypeExplanation(_message.Message):
    __slots__ = ("prototype", "coefficient", "score", "contribution", "share_of_logit", "heatmap", "nmf_contribution", "residual_contribution", "exemplars")
    PROTOTYPE_FIELD_NUMBER: _ClassVar[int]
    COEFFICIENT_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    SHARE_OF_LOGIT_FIELD_NUMBER: _ClassVar[int]
    HEATMAP_FIELD_NUMBER: _ClassVar[int]
    NMF_CONTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    RESIDUAL_CONTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    EXEMPLARS_FIELD_NUMBER: _ClassVar[int]
    prototype: int
    coefficient: float
    score: float
    contribution: float
    share_of_logit: float
    heatmap: Heatmap
    nmf_contribution: float
    residual_contribution: float
    exemplars: _containers.RepeatedCompositeFieldContainer[Exemplar]
    def __init__(self, prototype: _Optional[int] = ..., coefficient: _Optional[float] = ..., score: _Optional[float] = ..., contribution: _Optional[float] = ..., share_of_logit: _Optional[float] = ..., heatmap: _Optional[_Union[Heatmap, _Mapping]] = ..., nmf_contribution: _Optional[float] = ..., residual_contribution: _Optional[float] = ..., exemplars: _Optional[_Iterable[_Union[Exemplar, _Mapping]]] = ...) -> None: ...

class ResidualShare(_message.Message):
    __slots__ = ("logit", "margin", "versus")
    LOGIT_FIELD_NUMBER: _ClassVar[int]
    MARGIN_FIELD_NUMBER: _ClassVar[int]
    VERSUS_FIELD_NUMBER: _ClassVar[int]
    logit: float
    margin: float
    versus: str
    def __init__(self, logit: _Optional[float] = ..., margin: _Optional[float] = ..., versus: _Optional[str] = ...) -> None: ...

class ClassExplanation(_message.Message):
    __slots__ = ("class_name", "index", "description", "logit", "probability", "bias", "exactness_gap", "prototypes", "residual_share")
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    LOGIT_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    BIAS_FIELD_NUMBER: _ClassVar[int]
    EXACTNESS_GAP_FIELD_NUMBER: _ClassVar[int]
    PROTOTYPES_FIELD_NUMBER: _ClassVar[int]
    RESIDUAL_SHARE_FIELD_NUMBER: _ClassVar[int]
    class_name: str
    index: int
    description: str
    logit: float
    probability: float
    bias: float
    exactness_gap: float
    prototypes: _containers.RepeatedCompositeFieldContainer[PrototypeExplanation]
    residual_share: ResidualShare
    def __init__(self, class_name: _Optional[str] = ..., index: _Optional[int] = ..., description: _Optional[str] = ..., logit: _Optional[float] = ..., probability: _Optional[float] = ..., bias: _Optional[float] = ..., exactness_gap: _Optional[float] = ..., prototypes: _Optional[_Iterable[_Union[PrototypeExplanation, _Mapping]]] = ..., residual_share: _Optional[_Union[ResidualShare, _Mapping]] = ...) -> None: ...

class SwitchedOff(_message.Message):
    __slots__ = ("class_name", "prototype")
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    PROTOTYPE_FIELD_NUMBER: _ClassVar[int]
    class_name: str
    prototype: int
    def __init__(self, class_name: _Optional[str] = ..., prototype: _Optional[int] = ...) -> None: ...

class InterventionResult(_message.Message):
    __slots__ = ("switched_off", "logits", "top_k", "prediction_before", "prediction_after", "prediction_changed")
    class LogitsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    SWITCHED_OFF_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_BEFORE_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_AFTER_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_CHANGED_FIELD_NUMBER: _ClassVar[int]
    switched_off: _containers.RepeatedCompositeFieldContainer[SwitchedOff]
    logits: _containers.ScalarMap[str, float]
    top_k: _containers.RepeatedCompositeFieldContainer[ClassScore]
    prediction_before: str
    prediction_after: str
    prediction_changed: bool
    def __init__(self, switched_off: _Optional[_Iterable[_Union[SwitchedOff, _Mapping]]] = ..., logits: _Optional[_Mapping[str, float]] = ..., top_k: _Optional[_Iterable[_Union[ClassScore, _Mapping]]] = ..., prediction_before: _Optional[str] = ..., prediction_after: _Optional[str] = ..., prediction_changed: _Optional[bool] = ...) -> None: ...

class Explanation(_message.Message):
    __slots__ = ("top_k", "exactness", "intervention")
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    EXACTNESS_FIELD_NUMBER: _ClassVar[int]
    INTERVENTION_FIELD_NUMBER: _ClassVar[int]
    top_k: _containers.RepeatedCompositeFieldContainer[ClassExplanation]
    exactness: float
    intervention: InterventionResult
    def __init__(self, top_k: _Optional[_Iterable[_Union[ClassExplanation, _Mapping]]] = ..., exactness: _Optional[float] = ..., intervention: _Optional[_Union[InterventionResult, _Mapping]] = ...) -> None: ...

class ExplainResponse(_message.Message):
    __slots__ = ("explanations", "provider")
    EXPLANATIONS_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    explanations: _containers.RepeatedCompositeFieldContainer[Explanation]
    provider: str
    def __init__(self, explanations: _Optional[_Iterable[_Union[Explanation, _Mapping]]] = ..., provider: _Optional[str] = ...) -> None: ...

class ModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfoResponse(_message.Message):
    __slots__ = ("json", "classes", "p", "provider", "model_sha256", "format_version")
    JSON_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    P_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    json: str
    classes: _containers.RepeatedScalarFieldContainer[str]
    p: int
    provider: str
    model_sha256: str
    format_version: int
    def __init__(self, json: _Optional[str] = ..., classes: _Optional[_Iterable[str]] = ..., p: _Optional[int] = ..., provider: _Optional[str] = ..., model_sha256: _Optional[str] = ..., format_version: _Optional[int] = ...) -> None: ...

class PrototypesRequest(_message.Message):
    __slots__ = ("classes",)
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    classes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, classes: _Optional[_Iterable[str]] = ...) -> None: ...

class ExemplarList(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[Exemplar]
    def __init__(self, entries: _Optional[_Iterable[_Union[Exemplar, _Mapping]]] = ...) -> None: ...

class PrototypeInfo(_message.Message):
    __slots__ = ("prototype", "coefficient", "fold_weight", "exemplars")
    class ExemplarsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: ExemplarList
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[ExemplarList, _Mapping]] = ...) -> None: ...
    PROTOTYPE_FIELD_NUMBER: _ClassVar[int]
    COEFFICIENT_FIELD_NUMBER: _ClassVar[int]
    FOLD_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    EXEMPLARS_FIELD_NUMBER: _ClassVar[int]
    prototype: int
    coefficient: float
    fold_weight: float
    exemplars: _containers.MessageMap[str, ExemplarList]
    def __init__(self, prototype: _Optional[int] = ..., coefficient: _Optional[float] = ..., fold_weight: _Optional[float] = ..., exemplars: _Optional[_Mapping[str, ExemplarList]] = ...) -> None: ...

class ExplainedShare(_message.Message):
    __slots__ = ("energy", "norm_ratio")
    ENERGY_FIELD_NUMBER: _ClassVar[int]
    NORM_RATIO_FIELD_NUMBER: _ClassVar[int]
    energy: float
    norm_ratio: float
    def __init__(self, energy: _Optional[float] = ..., norm_ratio: _Optional[float] = ...) -> None: ...

class ClassPrototypes(_message.Message):
    __slots__ = ("class_name", "index", "explained", "fold", "explained_share", "prototypes")
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    EXPLAINED_FIELD_NUMBER: _ClassVar[int]
    FOLD_FIELD_NUMBER: _ClassVar[int]
    EXPLAINED_SHARE_FIELD_NUMBER: _ClassVar[int]
    PROTOTYPES_FIELD_NUMBER: _ClassVar[int]
    class_name: str
    index: int
    explained: bool
    fold: str
    explained_share: ExplainedShare
    prototypes: _containers.RepeatedCompositeFieldContainer[PrototypeInfo]
    def __init__(self, class_name: _Optional[str] = ..., index: _Optional[int] = ..., explained: _Optional[bool] = ..., fold: _Optional[str] = ..., explained_share: _Optional[_Union[ExplainedShare, _Mapping]] = ..., prototypes: _Optional[_Iterable[_Union[PrototypeInfo, _Mapping]]] = ...) -> None: ...

class PrototypesResponse(_message.Message):
    __slots__ = ("p", "exemplar_kinds", "classes")
    P_FIELD_NUMBER: _ClassVar[int]
    EXEMPLAR_KINDS_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    p: int
    exemplar_kinds: _containers.RepeatedScalarFieldContainer[str]
    classes: _containers.RepeatedCompositeFieldContainer[ClassPrototypes]
    def __init__(self, p: _Optional[int] = ..., exemplar_kinds: _Optional[_Iterable[str]] = ..., classes: _Optional[_Iterable[_Union[ClassPrototypes, _Mapping]]] = ...) -> None: ...

class PrototypeImageRequest(_message.Message):
    __slots__ = ("class_name", "prototype", "kind")
    CLASS_NAME_FIELD_NUMBER: _ClassVar[int]
    PROTOTYPE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    class_name: str
    prototype: int
    kind: str
    def __init__(self, class_name: _Optional[str] = ..., prototype: _Optional[int] = ..., kind: _Optional[str] = ...) -> None: ...

class PrototypeImageResponse(_message.Message):
    __slots__ = ("png",)
    PNG_FIELD_NUMBER: _ClassVar[int]
    png: bytes
    def __init__(self, png: _Optional[bytes] = ...) -> None: ...
