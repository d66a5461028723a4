"""`memlm serve`: the `MemoryLM` gRPC service (proto/memlm/v1/memlm.proto) over a model in
this process, or over Ray actors that each run a block of its layers (`--ray`).

    memlm serve                                     # embedded model, default store, port 50051
    memlm serve --store grpc://store:50052 --metrics-port 9090
    memlm serve --ray --shards 2 --replicas 1       # a local Ray cluster (or --ray-address ADDR)

From Python: `server = serve(ModelServerConfig(port=0), engine=lm)` returns a started
`ModelServer` (`.port`, `.metrics`, `.stop(grace_s)`); without an engine it loads one from
the config (health says NOT_SERVING and calls get UNAVAILABLE meanwhile). `run(config)`
blocks until SIGTERM/SIGINT, then lets the calls in flight finish.

How a request goes (the waits of 2 and 3 are memlm/serve/admission.py):

1. Checked before it waits for anything: bad input is answered at once.
2. Admitted or refused: at most `concurrency` requests compute at once and `queue_size`
   more wait; the next one gets RESOURCE_EXHAUSTED (clients back off instead of piling up).
3. The memory's lock: many Generates read a memory together, an Ingest or DeleteMemory has
   it alone, so a generation reads one consistent snapshot and two ingests serialize. A
   waiting writer holds off new readers (no starvation).
4. Computing. A Generate checks between tokens whether its client is still there (cancelled,
   disconnected, past its deadline) and stops at once if not; an Ingest checks between
   segments and rolls back. Waiting in 2 and 3 stops the same way.

Ingest gathers its whole stream, up to the end message, before it touches the model: a
client killed halfway changes nothing. Handlers raise; memlm/serve/errors.py answers each
exception with its status code.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import grpc

from memlm.engine import IngestCancelled, MemoryLM
from memlm.extras import require_extra
from memlm.protos import memlm_pb2, memlm_pb2_grpc
from memlm.serve.admission import Admission, Alive, MemoryLocks
from memlm.serve.errors import AlreadyExists, ClientGone, InternalError, NotReady, ended_code, status_of
from memlm.serve.metrics import ServerMetrics, configure_json_logging
from memlm.serve.serving import RunningServer, ServerOptions, Service, StreamShape, start_server, wait_for_signal
from memlm.store import check_memory_name
from memlm.store.settings import StoreSettings

SERVICE_NAME = "memlm.v1.MemoryLM"
DEFAULT_PORT = 50051
REQUEST_ID = "x-request-id"
FINISH_REASONS = {"stop": memlm_pb2.FINISH_REASON_STOP, "length": memlm_pb2.FINISH_REASON_LENGTH}
INGEST_STREAM = StreamShape("Ingest", first="start", last="end", advice="split the document into several ingests")

log = logging.getLogger("memlm.serve")


@dataclass
class ModelServerConfig:
    port: int = DEFAULT_PORT
    model: str | None = None  # checkpoint directory; None: the embedded model
    backend: str = "fot"
    store: str | None = None  # store URL (memlm/store/__init__.py); None: the configured store
    dtype: str = "auto"  # bfloat16 where the hardware computes it, else float32
    device: str = "cpu"
    settings: dict = field(default_factory=dict)  # MemoryConfig overrides: top_k, segment_len, ...
    token: str | None = None  # bearer token clients must send (None: no auth)
    tls_cert: str | None = None
    tls_key: str | None = None
    host: str = "[::]"
    max_message_bytes: int = 8 << 20  # one gRPC message: an Ingest chunk, a prompt
    max_ingest_bytes: int = 256 << 20  # one Ingest stream, held in RAM until it is read in
    max_tokens: int = 4096  # ceiling of GenerateRequest.max_tokens
    default_max_tokens: int = 64
    max_stop_strings: int = 16
    concurrency: int = 4  # requests computing at once (threads sharing the model)
    queue_size: int = 32  # requests waiting for a turn; one more gets RESOURCE_EXHAUSTED
    metrics_port: int | None = None  # Prometheus /metrics on this port (0: any free one)
    grace_s: float = 30.0  # how long a stop waits for calls in flight
    # Ray (memlm/serve/ray_pipeline.py): the model's layers in `shards` actors, `replicas` pipelines.
    ray: bool = False
    shards: int = 1
    replicas: int = 1
    ray_address: str | None = None  # None: start a local Ray cluster


# -- the service ------------------------------------------------------------------------------------


@dataclass
class Call:
    """One request while it runs: its id and what its log line will say."""

    method: str
    request_id: str
    context: grpc.ServicerContext
    started: float
    fields: dict = field(default_factory=dict)

    def alive(self) -> bool:
        return self.context.is_active()


class MemoryLMService(memlm_pb2_grpc.MemoryLMServicer):
    def __init__(self, config: ModelServerConfig):
        self.config = config
        self.engines: list[MemoryLM] = []  # set once loaded (several: Ray replicas); UNAVAILABLE until then
        self._next_engine = itertools.count()
        self.metrics = ServerMetrics(self._memory_sizes)
        self.admission = Admission(config.concurrency, config.queue_size, self.metrics)
        self.locks = MemoryLocks()

    # -- plumbing ----------------------------------------------------------------------------

    def _engine(self) -> MemoryLM:
        engines = self.engines
        if not engines:
            raise NotReady("the model is still loading; retry shortly")
        return engines[next(self._next_engine) % len(engines)]  # round robin over replicas

    def _memory_sizes(self):
        if not self.engines:
            return
        store = self.engines[0].store
        for name in store.memories():
            stats = store.stats(name)
            yield name, stats.tokens, stats.bytes

    @contextmanager
    def _call(self, method: str, context: grpc.ServicerContext) -> Iterator[Call]:
        """Request id, metrics and one log line per request. Errors go on to the error
        interceptor; this only accounts for the status it will answer with."""
        given = dict(context.invocation_metadata()).get(REQUEST_ID)
        call = Call(method, given or uuid.uuid4().hex[:16], context, time.perf_counter())
        context.send_initial_metadata(((REQUEST_ID, call.request_id),))
        code, message = grpc.StatusCode.OK, None
        try:
            yield call
        except GeneratorExit:  # gRPC dropped a streaming call (client gone): only account for it
            code, message = ended_code(context), "the call ended before its work did"
            raise
        except Exception as error:
            code, message = status_of(error, context)
            if code == grpc.StatusCode.INTERNAL:
                # Logged here, where the request id is known, and told to the client with it.
                log.exception("internal error", extra={"fields": {"request_id": call.request_id, "method": method}})
                message = f"internal error (request id {call.request_id}); see the server log"
                raise InternalError(message) from error
            raise
        finally:
            seconds = time.perf_counter() - call.started
            self.metrics.requests.labels(method, code.name).inc()
            self.metrics.request_seconds.labels(method).observe(seconds)
            fields = {"request_id": call.request_id, "method": method, "code": code.name, "seconds": round(seconds, 4)}
            log.info("request", extra={"fields": {**fields, **call.fields, **({"error": message} if message else {})}})

    # -- Ingest ------------------------------------------------------------------------------------

    def Ingest(self, request_iterator, context):
        with self._call("Ingest", context) as call:
            engine = self._engine()
            start, text, tokens = self._read_ingest(request_iterator, engine, call.alive)
            call.fields.update(
                memory=start.memory, chars=len(text) if text is not None else None, tokens=len(tokens or ())
            )
            if text is not None and not text.strip():
                raise ValueError("nothing to ingest: the text is empty (send text or token-id chunks)")
            with self.admission.admit(), self.locks.write(start.memory, call.alive):
                if start.create_only and start.memory in engine.store.memories():
                    raise AlreadyExists(f"memory {start.memory!r} exists and create_only is set; delete it first")
                with self.admission.compute(call.alive):
                    cancelled = lambda: not call.alive()  # noqa: E731
                    try:
                        if text is not None:
                            stats = engine.ingest(text, start.memory, progress=False, cancelled=cancelled)
                        else:
                            stats = engine.ingest_tokens(tokens, start.memory, progress=False, cancelled=cancelled)
                    except IngestCancelled as error:  # it asked `cancelled`: the client is gone
                        raise ClientGone(str(error)) from error
            self.metrics.tokens.labels("ingested").inc(stats.tokens)
            call.fields.update(tokens=stats.tokens, segments=stats.segments, memory_tokens=stats.memory_tokens)
            return memlm_pb2.IngestReply(
                memory=stats.memory,
                tokens=stats.tokens,
                segments=stats.segments,
                seconds=stats.seconds,
                memory_tokens=stats.memory_tokens,
            )

    def _read_ingest(
        self, requests, engine: MemoryLM, alive: Alive
    ) -> tuple[memlm_pb2.IngestStart, str | None, list[int] | None]:
        """The whole stream, checked: (start, text or None, token ids or None)."""
        start, texts, tokens = None, [], []
        for kind, request in INGEST_STREAM.read(requests, self.config.max_ingest_bytes, alive):
            if start is None:  # the first message, a `start`
                start = request.start
                check_memory_name(start.memory)
                if start.backend and start.backend != engine.config.backend:
                    raise ValueError(
                        f"this server runs the {engine.config.backend!r} backend, not {start.backend!r}; "
                        "leave backend empty or ask a server started with --backend " + start.backend
                    )
            elif kind == "text":
                texts.append(request.text)
            elif kind == "tokens":
                tokens.extend(request.tokens.ids)
            else:
                raise ValueError(f"unexpected {kind or 'empty'} message after `start`")
        if texts and tokens:
            raise ValueError("an Ingest stream sends text or token ids, not both")
        if tokens:
            return start, None, tokens
        return start, "".join(texts), None

    # -- Generate ----------------------------------------------------------------------------------

    def Generate(self, request, context):
        with self._call("Generate", context) as call:
            engine = self._engine()
            options = self._generate_options(request, engine)
            memory = request.memory or None
            call.fields.update(memory=memory, max_tokens=options["max_new_tokens"])
            reading = self.locks.read(memory, call.alive) if memory else _nothing()
            with self.admission.admit(), reading, self.admission.compute(call.alive):
                yield from self._stream(engine, options, memory, call)

    def _stream(
        self, engine: MemoryLM, options: dict, memory: str | None, call: Call
    ) -> Iterator[memlm_pb2.GenerateReply]:
        started = time.perf_counter()
        sent, last = 0, None
        generation = engine.stream(memory=memory, **options)
        try:
            for piece in generation:
                if not call.alive():  # cancelled or past its deadline: compute no further token
                    raise ClientGone()
                if sent == 0:
                    self.metrics.first_token_seconds.observe(time.perf_counter() - call.started)
                sent += 1
                self.metrics.tokens.labels("generated").inc()
                if piece.finish_reason is not None:
                    last = piece  # sent below, with the usage the finished generator fills in
                    continue
                yield memlm_pb2.GenerateReply(text=piece.text, token_ids=[piece.token_id])
        finally:
            generation.close()  # stop the model now, not when the generator is collected
        result = generation.result  # complete: the loop ran to the end
        seconds = time.perf_counter() - started
        self.metrics.tokens.labels("prompt").inc(result.prompt_tokens)
        self.metrics.decode_speed.observe(sent / max(seconds, 1e-9))
        call.fields.update(
            prompt_tokens=result.prompt_tokens, completion_tokens=sent, finish_reason=result.finish_reason
        )
        yield memlm_pb2.GenerateReply(
            text=last.text,
            token_ids=[last.token_id],
            finish_reason=FINISH_REASONS[last.finish_reason],
            usage=memlm_pb2.Usage(prompt_tokens=result.prompt_tokens, completion_tokens=sent, seconds=seconds),
        )

    def _generate_options(self, request: memlm_pb2.GenerateRequest, engine: MemoryLM) -> dict:
        """`MemoryLM.stream` keyword arguments from a request; ValueError says what is wrong."""
        limit = self.config.max_tokens
        max_tokens = request.max_tokens if request.HasField("max_tokens") else self.config.default_max_tokens
        if not 1 <= max_tokens <= limit:
            raise ValueError(f"max_tokens must be between 1 and {limit}, got {max_tokens}")
        if not (math.isfinite(request.temperature) and 0.0 <= request.temperature <= 5.0):
            raise ValueError(f"temperature must lie in [0, 5] (0 is greedy), got {request.temperature}")
        top_p = request.top_p if request.HasField("top_p") else 1.0
        if not (math.isfinite(top_p) and 0.0 < top_p <= 1.0):
            raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
        if len(request.stop) > self.config.max_stop_strings:
            raise ValueError(f"at most {self.config.max_stop_strings} stop strings, got {len(request.stop)}")
        if request.memory:
            check_memory_name(request.memory)
        if request.messages and request.prompt:
            raise ValueError("send either a prompt or chat messages, not both")
        if request.messages:  # the last user message is the question the memory is read for
            prompt, chat = [{"role": m.role, "content": m.content} for m in request.messages], True
        elif request.prompt.strip():
            prompt, chat = request.prompt, not request.raw
        else:
            raise ValueError("the prompt is empty: send a prompt or chat messages")
        return dict(
            prompt=prompt,
            max_new_tokens=max_tokens,
            temperature=float(request.temperature),
            top_p=float(top_p),
            stop=list(request.stop),
            chat=chat,
            seed=request.seed if request.HasField("seed") else None,
        )

    # -- the rest ----------------------------------------------------------------------------------

    def ListMemories(self, request, context):
        with self._call("ListMemories", context):
            store = self._engine().store
            infos = []
            for name in store.memories():
                stats = store.stats(name)
                infos.append(memlm_pb2.MemoryInfo(name=name, tokens=stats.tokens, bytes=stats.bytes))
            return memlm_pb2.MemoryList(memories=infos)

    def DeleteMemory(self, request, context):
        with self._call("DeleteMemory", context) as call:
            engine = self._engine()
            check_memory_name(request.memory)
            call.fields.update(memory=request.memory)
            with self.locks.write(request.memory, call.alive):
                engine.forget(request.memory)
            return memlm_pb2.DeleteMemoryReply()


@contextmanager
def _nothing() -> Iterator[None]:
    yield


# -- starting and stopping --------------------------------------------------------------------------


@dataclass
class ModelServer:
    running: RunningServer
    service: MemoryLMService
    metrics_port: int | None

    @property
    def port(self) -> int:
        return self.running.port

    @property
    def metrics(self) -> ServerMetrics:
        return self.service.metrics

    def stop(self, grace_s: float | None = None) -> None:
        """Refuse new calls, let calls in flight finish for up to `grace_s` seconds (the
        config's by default), then release the model, the store and the metrics port."""
        self.running.stop(self.service.config.grace_s if grace_s is None else grace_s)
        self.service.metrics.stop()
        for engine in self.service.engines:
            close = getattr(engine, "close", None) or getattr(engine.store, "close", None)
            if close is not None:
                close()


def load_engines(config: ModelServerConfig) -> list[MemoryLM]:
    """The model(s) the config asks for: one in process, or Ray pipeline replicas."""
    if config.ray:
        require_extra("ray", "`memlm serve --ray`")
        from memlm.serve.ray_pipeline import PipelineConfig, load_pipelines  # ray is imported only when used

        return load_pipelines(PipelineConfig.from_server_config(config))
    return [
        MemoryLM.load(
            model=config.model,
            backend=config.backend,
            store=config.store,
            dtype=config.dtype,
            device=config.device,
            **config.settings,
        )
    ]


def serve(config: ModelServerConfig, engine: MemoryLM | list[MemoryLM] | None = None) -> ModelServer:
    """Start the service; return once the model is loaded (or `engine` given) and health says SERVING."""
    service = MemoryLMService(config)
    # Enough threads for every admitted request plus cheap calls (list, delete, health); gRPC
    # itself refuses calls beyond that instead of letting them hang in its executor.
    workers = config.concurrency + config.queue_size + 8
    options = ServerOptions(
        host=config.host,
        port=config.port,
        token=config.token,
        tls_cert=config.tls_cert,
        tls_key=config.tls_key,
        max_message_bytes=config.max_message_bytes,
        max_workers=workers,
        max_concurrent_rpcs=workers,
    )
    running = start_server(
        options, [Service(SERVICE_NAME, lambda server: memlm_pb2_grpc.add_MemoryLMServicer_to_server(service, server))]
    )
    try:
        metrics_port = service.metrics.serve_http(config.metrics_port) if config.metrics_port is not None else None
        if engine is None:
            engine = load_engines(config)
        service.engines = engine if isinstance(engine, list) else [engine]
    except BaseException:
        running.server.stop(None)
        service.metrics.stop()
        raise
    running.set_serving(True)
    return ModelServer(running, service, metrics_port)


def run(config: ModelServerConfig) -> None:
    """Serve until SIGTERM/SIGINT, then finish the calls in flight. A token not given comes
    from MEMLM_TOKEN or the config file (memlm/store/settings.py), as for the store service."""
    configure_json_logging()
    settings = StoreSettings.resolve(token=config.token, url=config.store)
    config.token, config.store = settings.token, settings.url
    where = f"{config.shards} shards x {config.replicas} replicas on Ray" if config.ray else "in process"
    log.info("starting", extra={"fields": {"port": config.port, "model": config.model or "embedded", "engine": where}})
    server = serve(config)
    log.info(
        "serving",
        extra={
            "fields": {
                "port": server.port,
                "tls": bool(config.tls_cert),
                "auth": bool(config.token),
                "metrics_port": server.metrics_port,
                "store": config.store or "default",
            }
        },
    )
    wait_for_signal()
    log.info("stopping: finishing calls in flight", extra={"fields": {"grace_s": config.grace_s}})
    server.stop()
    log.info("stopped")
