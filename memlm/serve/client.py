"""`MemoryClient`: a small Python client of `memlm serve` (the `MemoryLM` gRPC service).

    client = MemoryClient("127.0.0.1:50051")              # grpcs://host:port for TLS
    client.ingest(open("book.txt").read(), memory="book")
    for piece in client.generate("Who is the narrator?", memory="book"):
        print(piece.text, end="", flush=True)
    client.memories(); client.delete("book")

The bearer token and the TLS CA come from the arguments, else MEMLM_TOKEN / MEMLM_TLS_CA or
the config file, as for the store (memlm/store/settings.py). Errors raise `ServiceError`
with the server's status code and message.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from memlm.protos import bearer_metadata, memlm_pb2, memlm_pb2_grpc
from memlm.store.settings import StoreSettings

CHUNK_CHARS = 256 * 1024  # text per Ingest message: at most 1 MiB of UTF-8, under any server's limit
CHUNK_TOKENS = 256 * 1024
FINISH_REASONS = {memlm_pb2.FINISH_REASON_STOP: "stop", memlm_pb2.FINISH_REASON_LENGTH: "length"}


class ServiceError(ValueError):
    """A call the server refused or failed. A ValueError, so that callers that report bad
    input in one line (the CLI) report these too."""

    def __init__(self, code: grpc.StatusCode, details: str):
        self.code, self.details = code, details
        super().__init__(f"{code.name}: {details}")


@dataclass
class Piece:
    """One reply of a streamed generation (the last has `finish_reason` and `usage`)."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" or "length" on the last piece
    usage: memlm_pb2.Usage | None = None


class MemoryClient:
    def __init__(
        self,
        address: str = "127.0.0.1:50051",
        token: str | None = None,
        tls_ca: str | None = None,
        timeout_s: float | None = None,
    ):
        """`address`: host:port, grpc://host:port, or grpcs://host:port (TLS). `timeout_s`:
        deadline of each call (None: none; a long Generate or Ingest may need minutes)."""
        scheme, _, rest = address.rpartition("://")
        if scheme not in ("", "grpc", "grpcs"):
            raise ValueError(f"bad server address {address!r}: use host:port, grpc://host:port or grpcs://host:port")
        settings = StoreSettings.resolve(token=token, tls_ca=tls_ca)
        if scheme == "grpcs":
            root = Path(settings.tls_ca).read_bytes() if settings.tls_ca else None
            self._channel = grpc.secure_channel(rest, grpc.ssl_channel_credentials(root_certificates=root))
        else:
            self._channel = grpc.insecure_channel(rest)
        self._stub = memlm_pb2_grpc.MemoryLMStub(self._channel)
        self._metadata = bearer_metadata(settings.token)
        self.timeout_s = timeout_s

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> MemoryClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- calls ---------------------------------------------------------------------------------

    def ingest(
        self,
        text: str | None = None,
        memory: str = "",
        tokens: Sequence[int] | None = None,
        backend: str = "",
        create_only: bool = False,
    ) -> memlm_pb2.IngestReply:
        """Read `text` (or token ids) into `memory`; returns once the server has made it durable."""
        if (text is None) == (tokens is None):
            raise ValueError("give text or tokens")
        start = memlm_pb2.IngestStart(memory=memory, backend=backend, create_only=create_only)
        return self._unary(self._stub.Ingest, ingest_requests(start, text, tokens))

    def generate(
        self,
        prompt: str | None = None,
        memory: str | None = None,
        messages: Sequence[tuple[str, str]] | None = None,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: Sequence[str] = (),
        seed: int | None = None,
        chat: bool = True,
        request_id: str | None = None,
    ) -> Iterator[Piece]:
        """Stream an answer. `messages`: (role, content) pairs instead of a prompt. `chat`
        False sends the prompt without the chat template. Closing the iterator early cancels
        the call, and the server stops computing."""
        request = memlm_pb2.GenerateRequest(
            prompt=prompt or "",
            messages=[memlm_pb2.ChatMessage(role=role, content=content) for role, content in messages or ()],
            raw=not chat,
            memory=memory or "",
            max_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            stop=list(stop),
            seed=seed,
        )
        metadata = self._metadata + ((("x-request-id", request_id),) if request_id else ())
        call = self._stub.Generate(request, timeout=self.timeout_s, metadata=metadata)
        try:
            for reply in call:
                yield Piece(
                    reply.text,
                    list(reply.token_ids),
                    FINISH_REASONS.get(reply.finish_reason),
                    reply.usage if reply.HasField("usage") else None,
                )
        except grpc.RpcError as error:
            raise ServiceError(error.code(), error.details()) from None
        finally:
            call.cancel()  # a no-op after the last reply; stops the server when we leave early

    def generate_text(self, prompt: str | None = None, memory: str | None = None, **options) -> str:
        return "".join(piece.text for piece in self.generate(prompt, memory, **options))

    def memories(self) -> list[memlm_pb2.MemoryInfo]:
        return list(self._unary(self._stub.ListMemories, memlm_pb2.MemoryListRequest()).memories)

    def delete(self, memory: str) -> None:
        self._unary(self._stub.DeleteMemory, memlm_pb2.DeleteMemoryRequest(memory=memory))

    def _unary(self, method, request):
        try:
            return method(request, timeout=self.timeout_s, metadata=self._metadata)
        except grpc.RpcError as error:
            raise ServiceError(error.code(), error.details()) from None


def ingest_requests(
    start: memlm_pb2.IngestStart, text: str | None, tokens: Sequence[int] | None
) -> Iterator[memlm_pb2.IngestRequest]:
    """An Ingest stream: start, chunks, end."""
    yield memlm_pb2.IngestRequest(start=start)
    if text is not None:
        for at in range(0, len(text), CHUNK_CHARS):
            yield memlm_pb2.IngestRequest(text=text[at : at + CHUNK_CHARS])
    else:
        for at in range(0, len(tokens), CHUNK_TOKENS):
            yield memlm_pb2.IngestRequest(tokens=memlm_pb2.TokenIds(ids=tokens[at : at + CHUNK_TOKENS]))
    yield memlm_pb2.IngestRequest(end=memlm_pb2.IngestEnd())
