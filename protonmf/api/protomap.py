"""JSON bodies (dicts shaped as schemas.py's models) ↔ protonmf.v1 messages, driven by the
message descriptors.

    to_message(body, pb.ExplainResponse)   the REST body → its gRPC message (the servicer)
    from_message(message)                   a message → the REST body (the client, then
                                            ExplainResponse.model_validate)

Field by field, a body key is the proto field's name after ``RENAMES`` (``class_name`` is
``class`` in JSON: the .proto's json_name). Beyond names, three rules cover every
difference between the two shapes, each read off the descriptors:

- optional fields (proto3 ``optional``, message fields): None / unset on either side;
- a map whose value message wraps one repeated field (``map<string, ExemplarList>``) is a
  dict of lists in JSON (``{"augmented": [exemplar, ...]}``);
- ``RESHAPED`` repeated scalars are nested lists in JSON and flat in the message, reshaped
  by a sibling field (Heatmap.values, by Heatmap.shape).

float (float32) fields come back as the shortest decimal that reads as the same float32,
as json_format.MessageToDict writes them: the REST body's heatmap values (5 decimals) come
back as they were sent.

Per message type a plan (its fields, their converters, the message class) is built once
from its descriptor and kept; converting is then a loop over that plan building keyword
arguments for the message's constructor, what hand-written converters do.

ModelInfoResponse carries the whole /model body as JSON plus a few of its fields:
``model_info_message`` / ``model_info_from_message``.

Imports protobuf only (the client uses this module without BentoML or onnxruntime).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Mapping
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

__all__ = [
    "RENAMES",
    "RESHAPED",
    "body_key",
    "from_message",
    "model_info_from_message",
    "model_info_message",
    "to_message",
]

# proto field name → JSON key, wherever the field appears (the .proto's json_name; a test
# checks the two agree)
RENAMES: dict[str, str] = {"class_name": "class"}
# message full name → {repeated scalar field: the field holding its shape}
RESHAPED: dict[str, dict[str, str]] = {"protonmf.v1.Heatmap": {"values": "shape"}}

_FLOAT = FieldDescriptor.TYPE_FLOAT


def body_key(field: FieldDescriptor) -> str:
    """The JSON key of a proto field."""
    return RENAMES.get(field.name, field.name)


def _is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


def _wrapped(descriptor: Descriptor) -> FieldDescriptor | None:
    """The one field of a message that only wraps a repeated field (ExemplarList.entries)."""
    fields = descriptor.fields
    if len(fields) == 1 and fields[0].is_repeated and not _is_map(fields[0]):
        return fields[0]
    return None


# --- dict → message ---------------------------------------------------------------------

_ENCODERS: dict[str, Callable[[Mapping], Message]] = {}


def to_message(body: Mapping[str, Any], message_class: type[Message] | Descriptor) -> Message:
    """``body`` (shaped as the schemas.py model of ``message_class``) → the message.

    Keys the message has no field for are ignored; None or a missing key leaves a field
    unset (for a proto3 scalar without presence: its zero)."""
    descriptor = getattr(message_class, "DESCRIPTOR", message_class)
    return _encoder(descriptor)(body)


def _encoder(descriptor: Descriptor) -> Callable[[Mapping], Message]:
    encode = _ENCODERS.get(descriptor.full_name)
    if encode is None:
        encode = _ENCODERS[descriptor.full_name] = _build_encoder(descriptor)
    return encode


def _build_encoder(descriptor: Descriptor) -> Callable[[Mapping], Message]:
    cls = GetMessageClass(descriptor)
    # registered first: a message type that contains itself finds its own encoder
    plan: list[tuple[str, str, Callable | None]] = []

    def encode(body: Mapping) -> Message:
        kwargs = {}
        for key, name, convert in plan:
            value = body.get(key)
            if value is not None:
                kwargs[name] = value if convert is None else convert(value)
        return cls(**kwargs)

    _ENCODERS[descriptor.full_name] = encode
    reshaped = RESHAPED.get(descriptor.full_name, {})
    for field in descriptor.fields:
        plan.append((body_key(field), field.name, _field_encoder(field, field.name in reshaped)))
    if all(convert is None and key == name for key, name, convert in plan):
        # only scalars, under their own names: the body is the keyword arguments (a key
        # the message has no field for: the general path, which leaves it out)
        def encode_flat(body: Mapping) -> Message:
            try:
                return cls(**body)
            except ValueError:
                return encode(body)

        _ENCODERS[descriptor.full_name] = encode_flat
        return encode_flat
    return encode


def _field_encoder(field: FieldDescriptor, reshaped: bool) -> Callable | None:
    if _is_map(field):
        value = field.message_type.fields_by_name["value"]
        if value.message_type is None:
            return None  # map<string, scalar>: the dict itself
        sub = _encoder(value.message_type)
        inner = _wrapped(value.message_type)
        if inner is not None:  # {kind: [entry, ...]} → {kind: ExemplarList(entries=[...])}
            wrap_key = body_key(inner)
            return lambda d: {k: sub({wrap_key: v}) for k, v in d.items()}
        return lambda d: {k: sub(v) for k, v in d.items()}
    if field.message_type is not None:
        sub = _encoder(field.message_type)
        if field.is_repeated:
            return lambda items: [sub(x) for x in items]
        return sub
    if reshaped:  # nested lists → flat, row-major
        return _flatten
    return None


def _flatten(values: list) -> list:
    while values and isinstance(values[0], (list, tuple)):
        values = [v for row in values for v in row]
    return values


# --- message → dict ---------------------------------------------------------------------

_DECODERS: dict[str, Callable[[Message], dict]] = {}


def from_message(message: Message) -> dict[str, Any]:
    """A message → its JSON body, shaped as its schemas.py model: every field present,
    unset optional ones as None."""
    return _decoder(message.DESCRIPTOR)(message)


def _decoder(descriptor: Descriptor) -> Callable[[Message], dict]:
    decode = _DECODERS.get(descriptor.full_name)
    if decode is None:
        decode = _build_decoder(descriptor)
    return decode


def _build_decoder(descriptor: Descriptor) -> Callable[[Message], dict]:
    plan: list[tuple[str, str, bool, Callable | None]] = []
    reshape = [
        (body_key(descriptor.fields_by_name[f]), body_key(descriptor.fields_by_name[s]))
        for f, s in RESHAPED.get(descriptor.full_name, {}).items()
    ]

    def decode(message: Message) -> dict:
        body = {}
        for key, name, presence, convert in plan:
            if presence and not message.HasField(name):
                body[key] = None
                continue
            value = getattr(message, name)
            body[key] = value if convert is None else convert(value)
        for key, shape_key in reshape:
            body[key] = _reshape(body[key], body[shape_key])
        return body

    _DECODERS[descriptor.full_name] = decode
    for field in descriptor.fields:
        presence = field.has_presence and not field.is_repeated
        plan.append((body_key(field), field.name, presence, _field_decoder(field)))
    return decode


def _field_decoder(field: FieldDescriptor) -> Callable | None:
    if _is_map(field):
        value = field.message_type.fields_by_name["value"]
        if value.message_type is None:
            return _float32_dict if value.type == _FLOAT else dict
        sub = _decoder(value.message_type)
        inner = _wrapped(value.message_type)
        if inner is not None:  # {kind: ExemplarList(entries=[...])} → {kind: [entry, ...]}
            unwrap = _field_decoder(inner)
            return lambda m: {k: unwrap(getattr(v, inner.name)) for k, v in m.items()}
        return lambda m: {k: sub(v) for k, v in m.items()}
    if field.message_type is not None:
        sub = _decoder(field.message_type)
        if field.is_repeated:
            return lambda items: [sub(x) for x in items]
        return sub
    if field.type == _FLOAT:
        return (lambda items: [_float32(v) for v in items]) if field.is_repeated else _float32
    if field.is_repeated:
        return list
    return None


def _reshape(flat: list, shape: list[int]) -> list:
    """Row-major ``flat`` → nested lists of ``shape`` (left flat if the sizes disagree)."""
    size = 1
    for n in shape:
        size *= n
    if len(shape) < 2 or size != len(flat):
        return flat
    for n in reversed(shape[1:]):
        flat = [flat[i : i + n] for i in range(0, len(flat), n)]
    return flat


_F32 = struct.Struct("<f")


def _float32(value: float) -> float:
    """A float32's shortest decimal that reads back as the same float32 (as
    json_format.MessageToDict writes floats): 0.1234500035… → 0.12345."""
    if value != value or value in (float("inf"), float("-inf")):
        return value
    for digits in (6, 7, 8):
        shorter = float(f"{value:.{digits}g}")
        if _F32.unpack(_F32.pack(shorter))[0] == value:
            return shorter
    return float(f"{value:.9g}")


def _float32_dict(values: Mapping) -> dict:
    return {k: _float32(v) for k, v in values.items()}


# --- ModelInfoResponse: the /model body as JSON, plus a few of its fields ---------------


def model_info_message(
    info: Mapping[str, Any], message_class: type[Message] | None = None
) -> Message:
    """The /model body → ModelInfoResponse: ``json`` is the body; ``classes``, ``p``,
    ``provider`` are its own; ``model_sha256`` and ``format_version`` its ``artifact``'s."""
    if message_class is None:
        from protonmf.api.proto.protonmf.v1.protonmf_pb2 import ModelInfoResponse as message_class
    artifact = info["artifact"]
    return message_class(
        json=json.dumps(info),
        classes=info["classes"],
        p=info["p"],
        provider=info["provider"],
        model_sha256=artifact["model_sha256"] or "",
        format_version=artifact["format_version"],
    )


def model_info_from_message(message: Message) -> dict[str, Any]:
    """ModelInfoResponse → the /model body (its ``json``)."""
    return json.loads(message.json)
