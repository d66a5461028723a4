"""Bearer-token authentication for the gRPC services.

Clients send `authorization: Bearer <token>` metadata; a server interceptor compares it
in constant time. Health checks and reflection stay open, so that load balancers,
Kubernetes probes and grpcurl work without the secret.
"""

from __future__ import annotations

import hmac

import grpc

from memlm.protos import AUTH_METADATA
from memlm.serve.errors import handler_like

OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class BearerTokenInterceptor(grpc.ServerInterceptor):
    def __init__(self, token: str):
        if not token:
            raise ValueError("empty token: leave auth off instead")
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith(OPEN_METHOD_PREFIXES):
            return continuation(handler_call_details)
        given = dict(handler_call_details.invocation_metadata).get(AUTH_METADATA)
        if given is not None and hmac.compare_digest(given.encode(), self._expected):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:
            return None  # unknown method: let gRPC answer UNIMPLEMENTED
        message = (
            "missing bearer token: send metadata 'authorization: Bearer <token>'"
            if given is None
            else "wrong bearer token"
        )
        return _rejecting(handler, message)


def _rejecting(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that answers UNAUTHENTICATED."""

    def reject(request_or_iterator, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return handler_like(handler, reject)
