"""Typed service errors, each mapped once to an HTTP status and a gRPC code.

    ServiceError                       500 INTERNAL (never raised for client mistakes)
    ├── InvalidInput                   400 INVALID_ARGUMENT
    │   ├── PayloadTooLarge            413 INVALID_ARGUMENT (bytes, pixels, a side, the
    │   │                              decoded raster, a JPEG's scans, decoding time, images)
    │   ├── UnsupportedMediaType       415 INVALID_ARGUMENT (not JPEG/PNG/WebP, animated)
    │   └── Unprocessable              422 INVALID_ARGUMENT (valid image, unusable request:
    │                                  too small, too elongated, unknown class, …)
    ├── Unauthenticated                401 UNAUTHENTICATED (API keys set, none or a wrong one)
    ├── Overloaded                     503 RESOURCE_EXHAUSTED (with Retry-After)
    └── NotReady                       503 UNAVAILABLE

The core raises these; transports (BentoML REST, gRPC) translate them at the boundary.
Refused before the core: a malformed form or a text value in a file field (400, see
``bentoml_fixes``), request bytes that are not the gRPC method's message (INVALID_ARGUMENT
``malformed_message``, see ``grpc_api.add_servicer``).
"""

from __future__ import annotations

__all__ = [
    "InvalidInput",
    "NotReady",
    "Overloaded",
    "PayloadTooLarge",
    "ServiceError",
    "Unauthenticated",
    "Unprocessable",
    "UnsupportedMediaType",
]


class ServiceError(Exception):
    status = 500
    grpc_code = "INTERNAL"
    reason = "internal"

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.message = message
        if reason:
            self.reason = reason

    def to_dict(self) -> dict:
        """The REST error body. ``error`` ends with `` [reason]`` as it always has (clients
        parse it); ``reason`` and ``status`` say the same as fields."""
        return {
            "error": f"{self.message} [{self.reason}]",
            "reason": self.reason,
            "status": self.status,
        }


class InvalidInput(ServiceError):
    status = 400
    grpc_code = "INVALID_ARGUMENT"
    reason = "invalid_input"


class PayloadTooLarge(InvalidInput):
    status = 413
    reason = "too_large"


class UnsupportedMediaType(InvalidInput):
    status = 415
    reason = "unsupported_media_type"


class Unprocessable(InvalidInput):
    status = 422
    reason = "unprocessable"


class Unauthenticated(ServiceError):
    status = 401
    grpc_code = "UNAUTHENTICATED"
    reason = "unauthenticated"


class Overloaded(ServiceError):
    status = 503
    grpc_code = "RESOURCE_EXHAUSTED"
    reason = "overloaded"
    retry_after_s = 1


class NotReady(ServiceError):
    status = 503
    grpc_code = "UNAVAILABLE"
    reason = "not_ready"
