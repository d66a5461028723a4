"""The one place that turns a handler's exception into a gRPC status. Handlers of both
servers raise (ValueError for bad input, `MemoryNotFound`, the exceptions below) and
`ErrorStatusInterceptor` answers with the status code and a message that says what to fix.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import grpc

from memlm.store import MemoryNotFound

log = logging.getLogger("memlm.serve")


class NotReady(Exception):
    """The server is still loading what it serves (answered UNAVAILABLE)."""


class TooLarge(Exception):
    """Over a configured size limit (answered RESOURCE_EXHAUSTED)."""


class QueueFull(Exception):
    """More requests than compute slots plus queue places (answered RESOURCE_EXHAUSTED)."""


class AlreadyExists(Exception):
    """IngestStart.create_only and the memory exists."""


class ClientGone(Exception):
    """The call ended (cancelled, disconnected, past its deadline) before its work did."""


class InternalError(Exception):
    """An unexpected error that its server has logged already; the message says where."""


# The status code each expected exception is answered with; anything else is INTERNAL.
ERROR_CODES: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (NotReady, grpc.StatusCode.UNAVAILABLE),
    (MemoryNotFound, grpc.StatusCode.NOT_FOUND),  # a KeyError: before anything broader
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
    (TooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (ClientGone, grpc.StatusCode.CANCELLED),
    (InternalError, grpc.StatusCode.INTERNAL),
]


def status_of(error: Exception, context: grpc.ServicerContext) -> tuple[grpc.StatusCode, str]:
    """The status code and message a call that raised `error` is answered with."""
    code = next((code for kind, code in ERROR_CODES if isinstance(error, kind)), grpc.StatusCode.INTERNAL)
    if code == grpc.StatusCode.CANCELLED and not context.is_active():
        code = ended_code(context)  # the metrics and the log say why the call ended
    if code == grpc.StatusCode.INTERNAL and not isinstance(error, InternalError):
        return code, "internal error; see the server log"  # a traceback is for the operator, not the client
    return code, str(error) or "the call ended before its work did"


def ended_code(context: grpc.ServicerContext) -> grpc.StatusCode:
    """Why a call is no longer active: its deadline passed, or the client cancelled."""
    remaining = context.time_remaining()
    return grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 else grpc.StatusCode.CANCELLED


def _answer(error: Exception, context: grpc.ServicerContext, method: str) -> None:
    code, message = status_of(error, context)
    if code == grpc.StatusCode.INTERNAL and not isinstance(error, InternalError):
        log.exception("internal error", extra={"fields": {"method": method}})
    context.abort(code, message)


class ErrorStatusInterceptor(grpc.ServerInterceptor):
    """Answers an exception raised by a method of `services` with `status_of` it. Other
    services (health, reflection) are left alone: their handlers answer for themselves."""

    def __init__(self, services: Iterable[str]):
        self._prefixes = tuple(f"/{name}/" for name in services)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(self._prefixes):
            return handler
        if handler.response_streaming:
            behavior = handler.unary_stream or handler.stream_stream

            # A generator of its own, so that errors raised while streaming replies are caught
            # too; closing it (the client went away) closes the handler's generator.
            def answer(request_or_iterator, context):
                try:
                    yield from behavior(request_or_iterator, context)
                except Exception as error:
                    _answer(error, context, method)

        else:
            behavior = handler.unary_unary or handler.stream_unary

            def answer(request_or_iterator, context):
                try:
                    return behavior(request_or_iterator, context)
                except Exception as error:
                    _answer(error, context, method)

        return handler_like(handler, answer)


def handler_like(handler: grpc.RpcMethodHandler, behavior: Callable) -> grpc.RpcMethodHandler:
    """A handler of the same kind (request and response streaming) and (de)serializers as
    `handler` that runs `behavior(request_or_iterator, context)` instead."""
    kind = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return kind(
        behavior, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )
