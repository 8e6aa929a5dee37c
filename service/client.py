"""A small client for both transports, returning the REST response shapes.

    from protonmf.service.client import RestClient, GrpcClient
    with RestClient("http://127.0.0.1:3000") as c:       # or GrpcClient("127.0.0.1:50051"),
                                                         # channels=N to reach N workers
        body = c.explain([open("cat.jpg", "rb").read()], top_k=3,
                         interventions=[{"class": "tabby", "prototype": 0}])

Both raise ``RequestFailed`` with the REST status or gRPC code and the service's reason
(``too_large``, ``unsupported_media_type``, ...). Needs httpx (REST) or grpcio (gRPC).
"""

from __future__ import annotations

import base64
import itertools
import json
import re
from collections.abc import Sequence

__all__ = ["GrpcClient", "RequestFailed", "RestClient"]

_REASON = re.compile(r"\[([a-z_]+)\]\s*$")


class RequestFailed(Exception):
    def __init__(self, code: int | str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        match = _REASON.search(message)
        self.reason = match.group(1) if match else None


class _Client:
    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class RestClient(_Client):
    def __init__(self, url: str, timeout: float = 60.0):
        import httpx

        self._http = httpx.Client(base_url=url, timeout=timeout)

    def _post(self, path: str, body: dict) -> dict:
        return self._send(path, body).json()

    def _send(self, path: str, body: dict):
        r = self._http.post(path, json=body)
        if r.status_code != 200:
            raise RequestFailed(r.status_code, r.text)
        return r

    @staticmethod
    def _b64(images: Sequence[bytes]) -> list[str]:
        return [base64.b64encode(b).decode() for b in images]

    def classify(self, images: Sequence[bytes], top_k: int = 5) -> dict:
        return self._post("/classify", {"images_base64": self._b64(images), "top_k": top_k})

    def explain(self, images: Sequence[bytes], top_k: int = 3, heatmaps: bool = True,
                box_percentile: float = 90.0, interventions: Sequence[dict] = (),
                map_kind: str = "similarity") -> dict:  # fmt: skip
        return self._post("/explain", {
            "images_base64": self._b64(images), "top_k": top_k, "heatmaps": heatmaps,
            "box_percentile": box_percentile, "interventions": list(interventions),
            "map_kind": map_kind,
        })  # fmt: skip

    def model(self) -> dict:
        return self._post("/model", {})

    def prototypes(self, classes: Sequence[str | int] = ()) -> dict:
        return self._post("/prototypes", {"classes": list(classes)})

    def prototype_image(self, class_name: str | int, prototype: int,
                        kind: str = "augmented") -> bytes:  # fmt: skip
        """PNG bytes of the prototype's exemplar strip."""
        body = {"class": class_name, "prototype": prototype, "kind": kind}
        return self._send("/prototype_image", body).content

    def close(self) -> None:
        self._http.close()


def grpc_channel_options(max_message_bytes: int = 256 << 20, own_connection: bool = False):
    """Channel options; ``own_connection``: a TCP connection of the channel's own. gRPC
    otherwise shares one connection between channels to the same target, and the server's
    workers share their port with SO_REUSEPORT, which balances connections, not calls."""
    options = [("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.max_send_message_length", max_message_bytes)]  # fmt: skip
    if own_connection:
        options.append(("grpc.use_local_subchannel_pool", 1))
    return options


class GrpcClient(_Client):
    """``channels`` > 1: that many connections, calls spread round-robin over them — how
    one client reaches several server workers (one connection stays on one worker)."""

    def __init__(self, target: str, timeout: float = 60.0, max_message_bytes: int = 256 << 20,
                 channels: int = 1):  # fmt: skip
        import grpc

        from .grpc_api import pb, pb_grpc

        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        self._grpc, self._pb, self.timeout = grpc, pb, timeout
        options = grpc_channel_options(max_message_bytes, own_connection=channels > 1)
        self._channels = [grpc.insecure_channel(target, options=options) for _ in range(channels)]
        self._stubs = [pb_grpc.ProtoNMFStub(c) for c in self._channels]
        self._next = itertools.count()  # next() on a count is atomic under the GIL

    @property
    def stub(self):
        return self._stubs[next(self._next) % len(self._stubs)]

    def _call(self, method, request):
        try:
            return method(request, timeout=self.timeout)
        except self._grpc.RpcError as e:
            raise RequestFailed(e.code().name, e.details() or "") from e

    def classify(self, images: Sequence[bytes], top_k: int = 5) -> dict:
        r = self._call(self.stub.Classify, self._pb.ClassifyRequest(images=images, top_k=top_k))
        return _to_dict(r)

    def explain(self, images: Sequence[bytes], top_k: int = 3, heatmaps: bool = True,
                box_percentile: float = 90.0, interventions: Sequence[dict] = (),
                map_kind: str = "similarity") -> dict:  # fmt: skip
        request = self._pb.ExplainRequest(
            images=images, top_k=top_k, heatmaps=heatmaps, box_percentile=box_percentile,
            interventions=[self._pb.Intervention(class_name=str(i["class"]),
                                                 prototype=i["prototype"]) for i in interventions],
            map_kind=map_kind,
        )  # fmt: skip
        return explain_response_to_dict(self._call(self.stub.Explain, request))

    def model(self) -> dict:
        return json.loads(self._call(self.stub.ModelInfo, self._pb.ModelInfoRequest()).json)

    def prototypes(self, classes: Sequence[str | int] = ()) -> dict:
        request = self._pb.PrototypesRequest(classes=[str(c) for c in classes])
        return prototypes_response_to_dict(self._call(self.stub.Prototypes, request))

    def prototype_image(self, class_name: str | int, prototype: int,
                        kind: str = "augmented") -> bytes:  # fmt: skip
        """PNG bytes of the prototype's exemplar strip."""
        request = self._pb.PrototypeImageRequest(class_name=str(class_name), prototype=prototype,
                                                 kind=kind)  # fmt: skip
        return self._call(self.stub.PrototypeImage, request).png

    def close(self) -> None:
        for channel in self._channels:
            channel.close()


def _to_dict(message) -> dict:
    from google.protobuf import json_format

    return json_format.MessageToDict(message, always_print_fields_with_no_presence=True)


def explain_response_to_dict(response) -> dict:
    """ExplainResponse → the REST /explain body (nested heatmaps, explicit nulls)."""
    body = _to_dict(response)
    for explanation in body["explanations"]:
        explanation.setdefault("intervention", None)
        for entry in explanation["top_k"]:
            entry.setdefault("description", None)
            _nulls(entry.get("residual_share"), "logit", "margin", "versus")
            entry.setdefault("residual_share", None)
            for proto in entry["prototypes"]:
                _nulls(proto, "share_of_logit", "nmf_contribution", "residual_contribution")
                if "heatmap" in proto:
                    hm = proto["heatmap"]
                    h, w = hm["shape"]
                    hm["values"] = [hm["values"][r * w : (r + 1) * w] for r in range(h)]
    return body


def _nulls(d: dict | None, *keys: str) -> None:
    """Unset optional fields (gRPC leaves them out) → explicit nulls, as REST sends them."""
    if d is not None:
        for key in keys:
            d.setdefault(key, None)


def prototypes_response_to_dict(response) -> dict:
    """PrototypesResponse → the REST /prototypes body (exemplar lists by kind, nulls)."""
    body = _to_dict(response)
    for c in body["classes"]:
        _nulls(c["explained_share"], "energy", "norm_ratio")
        for proto in c["prototypes"]:
            _nulls(proto, "fold_weight")
            proto["exemplars"] = {k: v.get("entries", []) for k, v in proto["exemplars"].items()}
    return body
