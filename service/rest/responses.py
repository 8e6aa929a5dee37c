"""HTTP answers of every REST route (the service's own and the Open Inference Protocol's):
a JSON body encoded once, and a typed error as its status, body and Retry-After."""

from __future__ import annotations

import orjson
from starlette.responses import Response

from protonmf.service.ops.errors import ServiceError
from protonmf.service.ops.metrics import METRICS

__all__ = ["error_response", "json_response"]


def json_response(body: dict, status: int = 200, headers: dict | None = None) -> Response:
    """JSON encoded once by orjson. Returning a dict made BentoML rebuild the output schema,
    run pydantic's model_dump twice and json.dumps per response: ~2 ms of the event loop
    per /explain image (profiled, 2 vCPUs). NaN/Inf become null."""
    return Response(
        orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


def error_response(e: ServiceError) -> Response:
    """``{"error": "… [reason]", "reason", "status"}`` with the typed error's status (the
    Open Inference Protocol's ``{"error": …}`` body, with the reason beside it); counted."""
    METRICS.rejected.labels(reason=e.reason).inc()
    retry = getattr(e, "retry_after_s", None)
    return json_response(e.to_dict(), e.status, {"Retry-After": str(retry)} if retry else None)
