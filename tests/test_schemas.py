"""One typed schema (issue #17): the core's real bodies validate against the pydantic
models, the models and the .proto name the same fields, and protomap's generic converter
builds exactly the messages the hand-written converters built, about as fast."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import timeit
import types
import typing

import pydantic
import pytest
from helpers import FASHION_DATA, assert_same_body, run_images

from protonmf.api import protomap
from protonmf.api import schemas as S
from protonmf.api.proto.protonmf.v1 import protonmf_pb2 as pb
from protonmf.service.ops.errors import (
    InvalidInput,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    ServiceError,
    Unprocessable,
    UnsupportedMediaType,
)

# --- the core's bodies -------------------------------------------------------------------


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    return [
        next((FASHION_DATA / "test" / c).glob("*.png")).read_bytes()
        for c in ("bag", "sandal", "trouser")
    ]


# core_all, core_topk: conftest.py
@pytest.fixture(scope="module")
def core_presence(fashion_artifact, tmp_path_factory):
    """The top-k graph with Eq. 9's presence maps too (the third map kind)."""
    from protonmf.cli import main
    from protonmf.service.engine.pipeline import Engine

    out = tmp_path_factory.mktemp("presence") / "artifact"
    args = [
        "export",
        fashion_artifact,
        "--maps",
        "topk",
        "--scores",
        "topk",
        "--presence",
        "--out",
        out,
    ]
    assert main([str(a) for a in args]) == 0
    return Engine.from_artifact(out)


@pytest.fixture(scope="module", params=["all", "topk", "presence"])
def core(request, fashion_artifact, fashion_topk_artifact):  # named: the tier sees them
    return request.getfixturevalue(f"core_{request.param}")


def explain_body(core, images, **options) -> dict:
    """The REST /explain body for ``images``; interventions as (class, prototype) pairs."""
    from protonmf.service.engine.options import ExplainOptions, Intervention

    interventions = options.pop("interventions", ())
    opts = ExplainOptions(
        interventions=tuple(Intervention(c, p) for c, p in interventions), **options
    )
    return {
        "explanations": [core.explanations.explanation(o, opts) for o in run_images(core, images)],
        "provider": core.model.graph.provider,
    }


def test_classification_validates(core, images):
    body = {
        "predictions": [core.explanations.classification(o, 5) for o in run_images(core, images)]
    }
    model = S.ClassifyResponse.model_validate(body)
    assert model.predictions[0].top_k[0].class_name == "bag"
    assert model.model_dump(mode="json") == body  # nothing lost, nothing added


def test_explanation_validates_every_map_kind(core, images):
    kinds = core.model_info()["map_kinds"]
    assert ("presence" in kinds) == core.model.has_presence
    for kind in kinds:
        body = explain_body(core, images, top_k=3, map_kind=kind)
        model = S.ExplainResponse.model_validate(body)
        heatmaps = [p.heatmap for e in model.explanations for c in e.top_k for p in c.prototypes]
        assert heatmaps and all(h is not None and h.kind == kind for h in heatmaps)
        assert model.model_dump(mode="json", exclude_unset=True) == json.loads(json.dumps(body))


def test_presence_is_among_the_kinds_where_exported(core_presence, core_all):
    assert "presence" in core_presence.model_info()["map_kinds"]
    assert "presence" not in core_all.model_info()["map_kinds"]


def test_explanation_with_interventions_validates(core, images):
    # one of the top class's prototypes and a class outside the graph's top-k
    body = explain_body(
        core, images, top_k=2, interventions=[("bag", 0), ("ankle_boot", 1), (3, 2)]
    )
    model = S.ExplainResponse.model_validate(body)
    for e in model.explanations:
        assert e.intervention is not None
        assert {(s.class_name, s.prototype) for s in e.intervention.switched_off} == {
            ("bag", 0),
            ("ankle_boot", 1),
            ("dress", 2),
        }
        assert set(e.intervention.logits) == {"bag", "ankle_boot", "dress"}
    assert model.model_dump(mode="json", exclude_unset=True) == json.loads(json.dumps(body))


def test_explanation_without_heatmaps_validates(core, images):
    body = explain_body(core, images, top_k=len(core.model.classes), heatmaps=False)
    model = S.ExplainResponse.model_validate(body)
    protos = [p for e in model.explanations for c in e.top_k for p in c.prototypes]
    assert protos and all(p.heatmap is None for p in protos)
    assert all(
        "heatmap" not in p
        for e in body["explanations"]
        for c in e["top_k"]
        for p in c["prototypes"]
    )
    # exclude_unset: the body leaves heatmap out, the model does not invent it
    assert model.model_dump(mode="json", exclude_unset=True) == json.loads(json.dumps(body))


def test_prototypes_validate(core):
    for classes in (None, ["bag", 0, "3"]):
        body = core.listings.prototypes(classes)
        model = S.PrototypesResponse.model_validate(body)
        assert model.p == core.model.p and model.exemplar_kinds == ["augmented", "nmf"]
        assert model.model_dump(mode="json") == json.loads(json.dumps(body))


def test_model_info_validates(core):
    info = core.model_info()
    model = S.ModelInfo.model_validate(info)
    assert model.limits.max_images == core.model.limits.max_images
    assert model.artifact.format_version == info["artifact"]["format_version"]
    # crop_mode is written only where not the default; the model says it either way
    assert model.preprocessing.crop_mode == info["preprocessing"].get("crop_mode", "center")


def test_a_drifting_body_fails(core_all, images):
    """Responses forbid unknown fields: a field the core adds without the schema fails."""
    body = explain_body(core_all, images[:1], top_k=1)
    body["explanations"][0]["top_k"][0]["prototypes"][0]["new_field"] = 1.0
    with pytest.raises(pydantic.ValidationError, match="new_field"):
        S.ExplainResponse.model_validate(body)
    body = explain_body(core_all, images[:1], top_k=1)
    del body["explanations"][0]["top_k"][0]["bias"]
    with pytest.raises(pydantic.ValidationError, match="bias"):
        S.ExplainResponse.model_validate(body)


# --- models alone ------------------------------------------------------------------------

MODELS = [
    m
    for m in vars(S).values()
    if isinstance(m, type) and issubclass(m, pydantic.BaseModel) and m.__module__ == S.__name__
]


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_examples_validate_and_are_singular(model):
    """Each model's example is a valid instance; the model-level key is ``example`` (BentoML's
    Schema object has no ``examples``)."""
    schema = model.model_json_schema()
    assert "examples" not in schema
    for definition in schema.get("$defs", {}).values():
        assert "examples" not in definition
    if "example" in schema:
        instance = model.model_validate(schema["example"])
        assert instance.model_dump(mode="json", exclude_unset=True) == schema["example"]


def test_error_body_is_every_service_errors_dict():
    for error in (
        ServiceError("boom"),
        InvalidInput("x"),
        PayloadTooLarge("x", "too_many_images"),
        UnsupportedMediaType("x"),
        Unprocessable("x", "unknown_class"),
        Overloaded("x"),
        NotReady("x"),
    ):
        body = S.ErrorBody.model_validate(error.to_dict())
        assert body.model_dump() == error.to_dict()
        assert error.status in S.ERROR_STATUSES


def test_request_models_match_the_endpoints():
    assert S.PrototypeImageIn is S.PrototypeImageRequest
    assert S.ClassifyRequest().top_k == 5 and S.ExplainRequest().top_k == 3
    e = S.ExplainRequest()
    assert (e.heatmaps, e.box_percentile, e.map_kind, e.interventions) == (
        True,
        90.0,
        "similarity",
        [],
    )
    assert (S.OverlayRequest().rank, S.OverlayRequest().map_kind) == (0, "contribution")
    assert S.PrototypeImageRequest.model_validate({"class": 3, "prototype": 1}).kind == "augmented"
    for bad in ({"top_k": 0}, {"topk": 3}, {"interventions": [{"class": "bag"}]}):
        with pytest.raises(pydantic.ValidationError):
            S.ExplainRequest.model_validate(bad)
    with pytest.raises(pydantic.ValidationError):
        S.OverlayRequest(rank=-1)
    # by alias and by name; dumped by alias
    a = S.InterventionIn.model_validate({"class": "bag", "prototype": 1})
    assert a == S.InterventionIn(class_name="bag", prototype=1)
    assert a.model_dump() == {"class": "bag", "prototype": 1}


def test_intervention_in_to_core(core_all):
    from protonmf.service.engine.options import Intervention

    assert S.InterventionIn(class_name="bag", prototype=2).to_core() == Intervention("bag", 2)


def test_importable_without_bentoml_or_onnxruntime():
    code = (
        "import sys; import protonmf.api.schemas, protonmf.api.protomap; "
        "bad = {'bentoml', 'onnxruntime', 'torch', 'numpy'} & set(sys.modules); "
        "sys.exit(str(bad) if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr + r.stdout


# --- OpenAPI ------------------------------------------------------------------------------


def _generated_spec() -> dict:
    """The shape BentoML 1.4 generates (abridged): its 400/404/500, an infra route."""
    bentoml_400 = {
        "description": "Bad Request",
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/InvalidArgument"}}
        },
    }
    ok = {
        "description": "Successful Response",
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "title": "ExplainResponseIODescriptor",
                    "properties": {
                        "explanations": {
                            "type": "array",
                            "items": {"$ref": "#/components/schemas/Explanation"},
                        }
                    },
                }
            }
        },
    }
    return {
        "openapi": "3.0.2",
        "paths": {
            "/healthz": {
                "get": {"responses": {200: {"description": "ok"}}, "tags": ["Infrastructure"]}
            },
            "/explain": {
                "post": {
                    "responses": {200: ok, 400: bentoml_400, 404: {"description": "x"}},
                    "tags": ["Service APIs"],
                }
            },
            "/model": {
                "post": {"responses": {"200": {"description": "ok"}}, "tags": ["Service APIs"]}
            },
        },
        "components": {
            "schemas": {
                "ExplainResponseIODescriptor": {"title": "ExplainResponseIODescriptor"},
                "Explanation": {"title": "Explanation"},
                "InvalidArgument": {"title": "InvalidArgument"},
            }
        },
    }


def test_with_error_responses():
    spec = _generated_spec()
    before = json.dumps(spec, sort_keys=True, default=str)
    out = S.with_error_responses(spec, {"/model": [429, 503]})
    assert json.dumps(spec, sort_keys=True, default=str) == before  # a new dict
    assert out["components"]["schemas"]["ErrorBody"]["required"] == ["error", "reason", "status"]
    explain = out["paths"]["/explain"]["post"]["responses"]
    assert set(explain) == {200, 404, *map(str, S.ERROR_STATUSES)}  # BentoML's 400 replaced
    for status in S.ERROR_STATUSES:
        media = explain[str(status)]["content"]["application/json"]
        assert media["schema"] == {"$ref": "#/components/schemas/ErrorBody"}
        assert S.ErrorBody.model_validate(media["example"]).status == status
    assert set(out["paths"]["/model"]["post"]["responses"]) == {"200", "429", "503"}
    default = S.with_error_responses(spec)["paths"]["/model"]["post"]["responses"]
    assert set(default) == {"200", *map(str, S.ROUTE_ERRORS["/model"])}
    assert out["paths"]["/healthz"] == spec["paths"]["/healthz"]  # infra left alone
    json.dumps(out)  # serialisable


def test_without_io_suffix():
    out = S.without_io_suffix(_generated_spec())
    assert set(out["components"]["schemas"]) == {
        "ExplainResponse",
        "Explanation",
        "InvalidArgument",
    }
    schema = out["paths"]["/explain"]["post"]["responses"][200]["content"]["application/json"][
        "schema"
    ]
    assert schema["title"] == "ExplainResponse"
    assert (
        schema["properties"]["explanations"]["items"]["$ref"] == "#/components/schemas/Explanation"
    )
    spec = _generated_spec()
    spec["components"]["schemas"]["ExplainResponse"] = {}  # the name is taken: left as it is
    assert "ExplainResponseIODescriptor" in S.without_io_suffix(spec)["components"]["schemas"]


# --- the models and the .proto name the same fields ---------------------------------------

# model ↔ message, for every message a transport sends (ModelInfo: test below)
PAIRS = [
    (S.ClassifyRequest, pb.ClassifyRequest),
    (S.ExplainRequest, pb.ExplainRequest),
    (S.PrototypesRequest, pb.PrototypesRequest),
    (S.PrototypeImageRequest, pb.PrototypeImageRequest),
    (S.ClassifyResponse, pb.ClassifyResponse),
    (S.ExplainResponse, pb.ExplainResponse),
    (S.PrototypesResponse, pb.PrototypesResponse),
]
# REST takes images as multipart files or base64 strings, gRPC as bytes
REQUEST_IMAGES = {"images": "images", "images_base64": "images"}


def _models_in(annotation) -> set[type[pydantic.BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return {annotation}
    return set().union(*(_models_in(a) for a in typing.get_args(annotation)))


def _shape(annotation) -> str:
    """ "list", "dict" or "one" (None allowed or not aside)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        shapes = {_shape(a) for a in typing.get_args(annotation) if a is not type(None)}
        return shapes.pop() if len(shapes) == 1 else "one"
    return {list: "list", dict: "dict"}.get(origin, "one")


def _nullable(annotation) -> bool:
    return type(None) in typing.get_args(annotation)


def _check_pair(model, descriptor, seen: set[str], path: str) -> None:
    seen.add(descriptor.full_name)
    fields = {f.alias or name: f for name, f in model.model_fields.items()}
    keys = {REQUEST_IMAGES.get(k, k) if descriptor.name.endswith("Request") else k for k in fields}
    proto = {protomap.body_key(f): f for f in descriptor.fields}
    assert keys == set(proto), (
        f"{path}: model {sorted(keys)} vs {descriptor.full_name} {sorted(proto)}"
    )
    for key, info in fields.items():
        field = proto[REQUEST_IMAGES.get(key, key) if descriptor.name.endswith("Request") else key]
        where = f"{path}.{key}"
        ann = info.annotation
        # None in the model: the message can leave the field unset
        if _nullable(ann):
            assert field.has_presence, f"{where}: nullable in the model, no presence in the proto"
        target = field.message_type
        if protomap._is_map(field):
            assert _shape(ann) == "dict", where
            target = field.message_type.fields_by_name["value"].message_type
            wrapped = target and protomap._wrapped(target)
            if wrapped is not None:  # map<string, ExemplarList>: dict of lists
                seen.add(target.full_name)
                target = wrapped.message_type
        elif field.is_repeated:
            assert _shape(ann) == "list", where
        else:
            assert _shape(ann) == "one", where
        nested = _models_in(ann)
        assert len(nested) <= 1, where
        assert bool(nested) == (target is not None), f"{where}: model {nested} vs message {target}"
        if nested:
            _check_pair(nested.pop(), target, seen, where)


def test_models_and_messages_have_the_same_fields():
    seen: set[str] = set()
    for model, message in PAIRS:
        _check_pair(model, message.DESCRIPTOR, seen, model.__name__)
    # every message of the .proto is covered (ModelInfo's: the test below; PNG bytes have
    # no model)
    every = {m.full_name for m in pb.DESCRIPTOR.message_types_by_name.values()}
    assert every - seen == {
        "protonmf.v1.ModelInfoRequest",
        "protonmf.v1.ModelInfoResponse",
        "protonmf.v1.PrototypeImageResponse",
    }


def test_model_info_message_carries_the_body(core_all):
    """ModelInfoResponse: the /model body as JSON, plus fields of it named as in it."""
    own = {"classes", "p", "provider"}
    artifact = {"model_sha256", "format_version"}
    names = {f.name for f in pb.ModelInfoResponse.DESCRIPTOR.fields}
    assert names == {"json"} | own | artifact
    assert own <= set(S.ModelInfo.model_fields) and artifact <= set(S.ArtifactInfo.model_fields)
    info = core_all.model_info()
    message = protomap.model_info_message(info, pb.ModelInfoResponse)
    assert (list(message.classes), message.p, message.provider) == (
        info["classes"],
        info["p"],
        info["provider"],
    )
    assert message.model_sha256 == info["artifact"]["model_sha256"]
    assert message.format_version == info["artifact"]["format_version"]
    back = pb.ModelInfoResponse.FromString(message.SerializeToString())
    assert S.ModelInfo.model_validate(
        protomap.model_info_from_message(back)
    ) == S.ModelInfo.model_validate(info)


def test_renames_are_the_protos_json_names():
    """RENAMES agrees with the .proto: a field named otherwise in JSON has that json_name,
    and every explicit json_name is the field's name or its RENAMES entry."""
    from google.protobuf.descriptor_pb2 import FileDescriptorProto

    proto = FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(proto)
    renamed = set()
    for message in proto.message_type:
        for field in message.field:
            key = protomap.RENAMES.get(field.name, field.name)
            if field.HasField("json_name"):
                assert field.json_name == key, f"{message.name}.{field.name}"
            if key != field.name:
                assert field.HasField("json_name"), f"{message.name}.{field.name}"
                renamed.add(field.name)
    assert renamed == set(protomap.RENAMES)


# --- protomap: the same messages as the hand-written converters ----------------------------
# The hand-written dict → message functions of grpc_api.py before issue #17, verbatim: the
# reference the generic converter must equal and keep up with.


def _score(d: dict) -> pb.ClassScore:
    return pb.ClassScore(
        class_name=d["class"], index=d["index"], logit=d["logit"], probability=d["probability"]
    )


def _heatmap(h: dict) -> pb.Heatmap:
    box = h["box"]
    return pb.Heatmap(
        shape=h["shape"],
        values=[v for row in h["values"] for v in row],
        peak=pb.Peak(**h["peak"]),
        box=pb.Box(
            percentile=box["percentile"],
            feature=pb.Rect(**box["feature"]),
            input=pb.Rect(**box["input"]),
        ),
        kind=h["kind"],
    )


def _exemplars(entries: list[dict]) -> list[pb.Exemplar]:
    return [
        pb.Exemplar(image=x["image"], source=x["source"], presence=x["presence"]) for x in entries
    ]


def _class_entry(e: dict) -> pb.ClassExplanation:
    protos = [
        pb.PrototypeExplanation(
            prototype=d["prototype"],
            coefficient=d["coefficient"],
            score=d["score"],
            contribution=d["contribution"],
            share_of_logit=d["share_of_logit"],
            heatmap=_heatmap(d["heatmap"]) if "heatmap" in d else None,
            nmf_contribution=d["nmf_contribution"],
            residual_contribution=d["residual_contribution"],
            exemplars=_exemplars(d["exemplars"]),
        )
        for d in e["prototypes"]
    ]
    share = e["residual_share"]
    return pb.ClassExplanation(
        class_name=e["class"],
        index=e["index"],
        description=e["description"],
        logit=e["logit"],
        probability=e["probability"],
        bias=e["bias"],
        exactness_gap=e["exactness_gap"],
        prototypes=protos,
        residual_share=pb.ResidualShare(**share) if share else None,
    )


def _intervention(d: dict | None) -> pb.InterventionResult | None:
    if d is None:
        return None
    return pb.InterventionResult(
        switched_off=[
            pb.SwitchedOff(class_name=s["class"], prototype=s["prototype"])
            for s in d["switched_off"]
        ],
        logits=d["logits"],
        top_k=[_score(s) for s in d["top_k"]],
        prediction_before=d["prediction_before"],
        prediction_after=d["prediction_after"],
        prediction_changed=d["prediction_changed"],
    )


def explanation_to_proto(explanation: dict) -> pb.Explanation:
    return pb.Explanation(
        top_k=[_class_entry(e) for e in explanation["top_k"]],
        exactness=explanation["exactness"],
        intervention=_intervention(explanation["intervention"]),
    )


def classification_to_proto(classification: dict) -> pb.Classification:
    return pb.Classification(top_k=[_score(s) for s in classification["top_k"]])


def prototypes_to_proto(body: dict) -> pb.PrototypesResponse:
    classes = [
        pb.ClassPrototypes(
            class_name=c["class"],
            index=c["index"],
            explained=c["explained"],
            fold=c["fold"],
            explained_share=pb.ExplainedShare(**c["explained_share"]),
            prototypes=[
                pb.PrototypeInfo(
                    prototype=d["prototype"],
                    coefficient=d["coefficient"],
                    fold_weight=d["fold_weight"],
                    exemplars={
                        k: pb.ExemplarList(entries=_exemplars(v)) for k, v in d["exemplars"].items()
                    },
                )
                for d in c["prototypes"]
            ],
        )
        for c in body["classes"]
    ]
    return pb.PrototypesResponse(
        p=body["p"], exemplar_kinds=body["exemplar_kinds"], classes=classes
    )


def hand_explain_response(body: dict) -> pb.ExplainResponse:
    return pb.ExplainResponse(
        explanations=[explanation_to_proto(e) for e in body["explanations"]],
        provider=body["provider"],
    )


def _same(a, b) -> None:
    assert a == b
    assert a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True)


def test_protomap_explanations_equal_the_hand_written(core, images):
    kinds = core.model_info()["map_kinds"]
    bodies = [explain_body(core, images, top_k=3, map_kind=k) for k in kinds]
    bodies += [
        explain_body(core, images, top_k=2, heatmaps=False),
        explain_body(
            core,
            images,
            top_k=len(core.model.classes),
            heatmaps=False,
            interventions=[("bag", 0), (9, 1)],
        ),
        explain_body(core, images, top_k=1, interventions=[("sandal", 2)]),
    ]
    for body in bodies:
        message = protomap.to_message(body, pb.ExplainResponse)
        _same(message, hand_explain_response(body))
        for e in body["explanations"]:
            _same(protomap.to_message(e, pb.Explanation), explanation_to_proto(e))
        # and back: the same model as the REST body's, from the bytes gRPC sends
        wire = pb.ExplainResponse.FromString(message.SerializeToString())
        back = S.ExplainResponse.model_validate(protomap.from_message(wire))
        rest = S.ExplainResponse.model_validate(body)
        assert_same_body(
            rest.model_dump(mode="json"), back.model_dump(mode="json"), same_types=True
        )


def test_protomap_classifications_and_prototypes_equal_the_hand_written(core, images):
    outs = run_images(core, images)
    for top_k in (1, 5, len(core.model.classes)):
        body = {"predictions": [core.explanations.classification(o, top_k) for o in outs]}
        message = protomap.to_message(body, pb.ClassifyResponse)
        _same(
            message,
            pb.ClassifyResponse(
                predictions=[classification_to_proto(c) for c in body["predictions"]]
            ),
        )
        assert protomap.from_message(message) == body
    for classes in (None, ["bag", 1]):
        body = core.listings.prototypes(classes)
        message = protomap.to_message(body, pb.PrototypesResponse)
        _same(message, prototypes_to_proto(body))
        wire = pb.PrototypesResponse.FromString(message.SerializeToString())
        assert protomap.from_message(wire) == json.loads(json.dumps(body))


def test_protomap_nulls_and_empties():
    """None ↔ unset for optional fields; empty lists and maps; a body missing a key."""
    body = copy.deepcopy(S.PrototypesResponse.model_json_schema()["example"])
    body["classes"][0]["explained_share"] = {"energy": None, "norm_ratio": None}
    body["classes"][0]["prototypes"][0]["fold_weight"] = None
    body["classes"][0]["prototypes"][0]["exemplars"] = {"augmented": [], "nmf": []}
    message = protomap.to_message(body, pb.PrototypesResponse)
    _same(message, prototypes_to_proto(body))
    info = message.classes[0].prototypes[0]
    assert not info.HasField("fold_weight") and set(info.exemplars) == {"augmented", "nmf"}
    assert protomap.from_message(message) == body
    # keys without a field are ignored, missing keys leave fields unset
    m = protomap.to_message({"class": "bag", "index": 2, "extra": 1}, pb.ClassScore)
    assert m == pb.ClassScore(class_name="bag", index=2)
    assert protomap.to_message({"row": 1, "col": 2, "extra": 3}, pb.Peak) == pb.Peak(row=1, col=2)


def test_protomap_float32_values_read_back_as_sent():
    """Heatmap values (5 decimals in REST) come back from float32 as the same decimals."""
    values = [[0.12345, -22.58842, 1e-05], [3.0, 0.0, -0.00001]]
    h = dict(S.Heatmap.model_json_schema()["example"], shape=[2, 3], values=values)
    back = protomap.from_message(protomap.to_message(h, pb.Heatmap))
    assert back["values"] == values and back == h


def test_protomap_is_about_as_fast_as_the_hand_written(core_all, images):
    """/explain body, top-3 with heatmaps: the generic converter within 1.5× (measured
    ~1.05×) of the hand-written one; interleaved rounds, best of each."""
    body = explain_body(core_all, images[:1], top_k=3)
    hand = lambda: hand_explain_response(body)  # noqa: E731
    generic = lambda: protomap.to_message(body, pb.ExplainResponse)  # noqa: E731
    best = {hand: float("inf"), generic: float("inf")}
    for _ in range(7):
        for f in best:
            best[f] = min(best[f], timeit.timeit(f, number=200))
    ratio = best[generic] / best[hand]
    print(f"generic / hand-written: {ratio:.2f} ({best[hand] / 200 * 1e6:.0f} µs per body)")
    assert ratio < 1.5
