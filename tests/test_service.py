"""The MemoryLM gRPC service on loopback, over a tiny random model: same tokens as in
process, isolation, cancellation, deadlines, the request queue, crash safety of Ingest,
bad input, auth, TLS, health, metrics, graceful stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from conftest import tiny_lm
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from store_fixtures import free_port
from store_fixtures import running_server as running_store

from memlm.serve.client import MemoryClient, ServiceError, ingest_requests
from memlm.protos import memlm_pb2, memlm_pb2_grpc
from memlm.store.remote import RemoteStore
from memlm.serve import model_server
from memlm.serve.admission import MemoryLocks
from memlm.serve.model_server import ModelServer, ModelServerConfig, serve

REPO = Path(__file__).resolve().parent.parent
# Small segments and windows, so that a few hundred tokens already fill the memory.
SETTINGS = dict(segment_len=32, sink_len=4, local_len=16, block_len=4, top_k=2, query_chunk=8)
DOC = "The passkey is 7291. Remember it. " + "The grass is green and the sky is blue. " * 6
OTHER = "Bob keeps the red key in the blue box by the door. " * 5
QUESTION = "What is the passkey?"
LONG_PROMPT = "Once upon a time"  # the tiny model does not stop on its own for hundreds of tokens
Code = grpc.StatusCode


def make_lm():
    return tiny_lm(**SETTINGS)


@contextmanager
def model_service(engine=None, **options) -> Iterator[ModelServer]:
    server = serve(ModelServerConfig(port=0, host="127.0.0.1", **options), engine=engine or make_lm())
    try:
        yield server
    finally:
        server.stop(0)


@pytest.fixture
def server():
    with model_service() as server:
        yield server


def client(server: ModelServer, **options) -> MemoryClient:
    return MemoryClient(f"127.0.0.1:{server.port}", **options)


def stub(server: ModelServer) -> memlm_pb2_grpc.MemoryLMStub:
    return memlm_pb2_grpc.MemoryLMStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))


def tokens_of(pieces) -> list[int]:
    return [token for piece in pieces for token in piece.token_ids]


def requests_counted(server: ModelServer, method: str, code: str) -> float:
    return server.metrics.registry.get_sample_value("memlm_requests_total", {"method": method, "code": code}) or 0.0


def finished(server: ModelServer, method: str) -> float:
    samples = server.metrics.requests.collect()[0].samples
    return sum(s.value for s in samples if s.name == "memlm_requests_total" and s.labels["method"] == method)


def wait_for(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def idle(server: ModelServer) -> bool:
    return server.metrics.registry.get_sample_value("memlm_running_requests") == 0


# -- the same tokens as in process ------------------------------------------------------------------


def test_ingest_then_generate_matches_in_process(server):
    c = client(server)
    reply = c.ingest(DOC, memory="doc")
    reference = make_lm()
    stats = reference.ingest(DOC, "doc", progress=False)
    assert (reply.tokens, reply.segments, reply.memory_tokens) == (stats.tokens, stats.segments, stats.memory_tokens)
    assert reply.memory_tokens > 0  # the question below really reads memory

    expected = list(reference.stream(QUESTION, memory="doc", max_new_tokens=24))
    pieces = list(c.generate(QUESTION, memory="doc", max_new_tokens=24))
    assert tokens_of(pieces) == [piece.token_id for piece in expected]
    assert "".join(p.text for p in pieces) == "".join(p.text for p in expected)
    assert pieces[-1].finish_reason == expected[-1].finish_reason
    assert all(p.finish_reason is None and p.usage is None for p in pieces[:-1])
    usage = pieces[-1].usage
    assert usage.completion_tokens == len(expected)
    assert usage.prompt_tokens == len(reference.prompt_ids(QUESTION))

    # Token ids in, the same memory out.
    c.ingest(tokens=reference.tokenizer(DOC)["input_ids"], memory="doc-ids")
    assert tokens_of(c.generate(QUESTION, memory="doc-ids", max_new_tokens=24)) == tokens_of(pieces)


def test_with_a_remote_store(tmp_path):
    with running_store(tmp_path / "store") as store:
        remote = RemoteStore.from_url(f"grpc://127.0.0.1:{store.port}")
        with model_service(tiny_lm(store=remote, **SETTINGS)) as server:
            c = client(server)
            c.ingest(DOC, memory="doc")
            reference = make_lm()
            reference.ingest(DOC, "doc", progress=False)
            expected = [p.token_id for p in reference.stream(QUESTION, memory="doc", max_new_tokens=16)]
            assert tokens_of(c.generate(QUESTION, memory="doc", max_new_tokens=16)) == expected
            assert remote.memories() == ["doc"]  # written to the store service


def test_chat_messages_and_seeded_sampling(server):
    c = client(server)
    reference = make_lm()
    # The tiny tokenizer has no chat template: messages become their contents, one per line.
    expected = [p.token_id for p in reference.stream("Hi.\nWhat now?", max_new_tokens=8, chat=False)]
    assert tokens_of(c.generate(messages=[("system", "Hi."), ("user", "What now?")], max_new_tokens=8)) == expected
    # With a memory, the engine gets the turns (the last user turn is the question it reads for).
    c.ingest(DOC, memory="doc")
    reference.ingest(DOC, "doc", progress=False)
    turns = [("system", "Hi."), ("user", QUESTION)]
    expected = [p.token_id for p in reference.stream([dict(role=r, content=t) for r, t in turns], "doc", max_new_tokens=8)]
    assert tokens_of(c.generate(messages=turns, memory="doc", max_new_tokens=8)) == expected
    options = dict(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    expected = [p.token_id for p in reference.stream(QUESTION, **options)]
    assert tokens_of(c.generate(QUESTION, **options)) == expected
    assert tokens_of(c.generate(QUESTION, **options)) == expected


# -- memories ------------------------------------------------------------------------------------


def test_memories_are_isolated_and_delete_removes_one(server):
    c = client(server)
    c.ingest(DOC, memory="alpha")
    c.ingest(OTHER, memory="beta")
    expected = {}
    for name, text in (("alpha", DOC), ("beta", OTHER)):
        alone = make_lm()  # a model that has only ever seen this one memory
        alone.ingest(text, name, progress=False)
        expected[name] = [p.token_id for p in alone.stream(QUESTION, memory=name, max_new_tokens=16)]
        assert tokens_of(c.generate(QUESTION, memory=name, max_new_tokens=16)) == expected[name]
    infos = c.memories()
    assert [info.name for info in infos] == ["alpha", "beta"] and all(info.tokens > 0 for info in infos)

    c.delete("alpha")
    assert [info.name for info in c.memories()] == ["beta"]
    with pytest.raises(ServiceError) as error:
        list(c.generate(QUESTION, memory="alpha"))
    assert error.value.code == Code.NOT_FOUND and "no memory named 'alpha'" in error.value.details
    with pytest.raises(ServiceError) as error:
        c.delete("alpha")
    assert error.value.code == Code.NOT_FOUND
    assert tokens_of(c.generate(QUESTION, memory="beta", max_new_tokens=16)) == expected["beta"]


def test_concurrent_ingests_into_one_memory_serialize(server):
    errors = []

    def ingest():
        try:
            client(server).ingest(DOC, memory="doc")
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=ingest) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    reference = make_lm()  # the same text twice: the order does not matter
    reference.ingest(DOC, "doc", progress=False)
    reference.ingest(DOC, "doc", progress=False)
    expected = [p.token_id for p in reference.stream(QUESTION, memory="doc", max_new_tokens=16)]
    assert tokens_of(client(server).generate(QUESTION, memory="doc", max_new_tokens=16)) == expected


def test_memory_locks_readers_share_and_writers_wait():
    locks, alive, order = MemoryLocks(), lambda: True, []
    reading = locks.read("m", alive)
    reading.__enter__()
    with locks.read("other", alive), locks.write("other2", alive):
        pass  # other memories are not held up

    def write():
        with locks.write("m", alive):
            order.append("write")

    def late_read():
        with locks.read("m", alive):
            order.append("late read")

    writer = threading.Thread(target=write)
    writer.start()
    time.sleep(0.2)
    reader = threading.Thread(target=late_read)  # arrives while the writer waits: goes after it
    reader.start()
    time.sleep(0.2)
    assert order == []
    reading.__exit__(None, None, None)
    writer.join(5)
    reader.join(5)
    assert order == ["write", "late read"]


# -- cancellation, deadlines, the queue -------------------------------------------------------------


def test_cancelled_generate_stops_computing(server):
    pieces = client(server).generate(LONG_PROMPT, max_new_tokens=3000)
    for _ in range(5):
        next(pieces)
    pieces.close()  # cancels the call
    wait_for(lambda: requests_counted(server, "Generate", "CANCELLED") == 1)
    count = server.metrics.count("generated")
    time.sleep(0.5)
    assert server.metrics.count("generated") == count < 100  # the token counter stopped growing
    assert idle(server)


def test_deadline_stops_generate(server):
    with pytest.raises(ServiceError) as error:
        list(client(server, timeout_s=0.5).generate(LONG_PROMPT, max_new_tokens=3000))
    assert error.value.code == Code.DEADLINE_EXCEEDED
    wait_for(lambda: requests_counted(server, "Generate", "DEADLINE_EXCEEDED") == 1)
    count = server.metrics.count("generated")
    time.sleep(0.5)
    assert server.metrics.count("generated") == count


def test_full_queue_answers_resource_exhausted():
    with model_service(concurrency=1, queue_size=1) as server:
        raw = stub(server)
        long = memlm_pb2.GenerateRequest(prompt=LONG_PROMPT, max_tokens=3000)
        running = raw.Generate(long)
        next(running)  # computing
        queued = raw.Generate(long)  # the call starts at once and waits in the queue
        wait_for(lambda: server.metrics.registry.get_sample_value("memlm_queue_depth") == 1)
        with pytest.raises(ServiceError) as error:
            list(client(server).generate(QUESTION))
        assert error.value.code == Code.RESOURCE_EXHAUSTED and "busy" in error.value.details
        running.cancel()
        queued.cancel()
        wait_for(lambda: idle(server))
        assert tokens_of(client(server).generate(QUESTION, max_new_tokens=4))  # served again once there is room


KILLED_CLIENT = """
import sys, time, grpc
from memlm.protos import memlm_pb2, memlm_pb2_grpc
from memlm.store.remote import RemoteStore

def requests():
    yield memlm_pb2.IngestRequest(start=memlm_pb2.IngestStart(memory="doc"))
    yield memlm_pb2.IngestRequest(text="New text that must never reach the memory. " * 50)
    print("sent", flush=True)
    time.sleep(60)  # killed here, before the end message

stub = memlm_pb2_grpc.MemoryLMStub(grpc.insecure_channel(sys.argv[1]))
stub.Ingest(requests())
"""


def test_killed_client_mid_ingest_leaves_memory_as_it_was(server):
    c = client(server)
    c.ingest(DOC, memory="doc")
    before = (c.memories(), tokens_of(c.generate(QUESTION, memory="doc", max_new_tokens=16)))
    process = subprocess.Popen(
        [sys.executable, "-c", KILLED_CLIENT, f"127.0.0.1:{server.port}"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert process.stdout.readline().strip() == "sent"
        time.sleep(0.3)  # the chunk reaches the server
        process.send_signal(signal.SIGKILL)
        process.wait(10)
    finally:
        process.kill()
    # Depending on how fast gRPC notices, the server sees a cancelled call or a stream that
    # ended without its end message; either way nothing is ingested.
    wait_for(lambda: finished(server, "Ingest") == 2)
    assert server.metrics.count("ingested") == len(DOC)
    assert (c.memories(), tokens_of(c.generate(QUESTION, memory="doc", max_new_tokens=16))) == before


def test_deadline_mid_ingest_rolls_back():
    lm = make_lm()
    forward = lm.forward
    lm.forward = lambda *args, **kwargs: (time.sleep(0.05), forward(*args, **kwargs))[1]  # a slow model
    with model_service(lm) as server:
        _check_deadline_mid_ingest(server)


def _check_deadline_mid_ingest(server):
    c = client(server)
    c.ingest(DOC, memory="doc")
    before = (c.memories(), tokens_of(c.generate(QUESTION, memory="doc", max_new_tokens=16)))
    with pytest.raises(ServiceError) as error:
        client(server, timeout_s=0.5).ingest(OTHER * 20, memory="doc")  # 33 segments: about 2 s
    assert error.value.code == Code.DEADLINE_EXCEEDED
    wait_for(lambda: requests_counted(server, "Ingest", "DEADLINE_EXCEEDED") == 1)
    assert server.metrics.count("ingested") == len(DOC)  # only the first ingest counted
    assert (c.memories(), tokens_of(c.generate(QUESTION, memory="doc", max_new_tokens=16))) == before


# -- bad input -----------------------------------------------------------------------------------


def ingest_raw(server, *requests):
    return stub(server).Ingest(iter(requests), timeout=30)


START = memlm_pb2.IngestRequest(start=memlm_pb2.IngestStart(memory="doc"))
END = memlm_pb2.IngestRequest(end=memlm_pb2.IngestEnd())
TEXT = memlm_pb2.IngestRequest(text=DOC)

BAD_REQUESTS = {
    "empty text": (lambda c, s: c.ingest("", memory="doc"), Code.INVALID_ARGUMENT, "text is empty"),
    "blank text": (lambda c, s: c.ingest("  \n ", memory="doc"), Code.INVALID_ARGUMENT, "text is empty"),
    "bad memory name": (lambda c, s: c.ingest(DOC, memory="../etc"), Code.INVALID_ARGUMENT, "bad memory name"),
    "other backend": (lambda c, s: c.ingest(DOC, memory="doc", backend="knn"), Code.INVALID_ARGUMENT, "'fot' backend"),
    "token out of vocab": (
        lambda c, s: c.ingest(tokens=[1, 500], memory="doc"),
        Code.INVALID_ARGUMENT,
        "token ids must lie",
    ),
    "no end message": (lambda c, s: ingest_raw(s, START, TEXT), Code.INVALID_ARGUMENT, "without an `end` message"),
    "no start message": (lambda c, s: ingest_raw(s, TEXT, END), Code.INVALID_ARGUMENT, "must be `start`"),
    "text and tokens": (
        lambda c, s: ingest_raw(s, START, TEXT, memlm_pb2.IngestRequest(tokens=memlm_pb2.TokenIds(ids=[1])), END),
        Code.INVALID_ARGUMENT,
        "not both",
    ),
    "unknown memory": (
        lambda c, s: list(c.generate(QUESTION, memory="nope")),
        Code.NOT_FOUND,
        "no memory named 'nope'",
    ),
    "delete unknown memory": (lambda c, s: c.delete("nope"), Code.NOT_FOUND, "no memory named 'nope'"),
    "negative max_tokens": (
        lambda c, s: list(c.generate(QUESTION, max_new_tokens=-3)),
        Code.INVALID_ARGUMENT,
        "max_tokens",
    ),
    "zero max_tokens": (lambda c, s: list(c.generate(QUESTION, max_new_tokens=0)), Code.INVALID_ARGUMENT, "max_tokens"),
    "temperature too high": (
        lambda c, s: list(c.generate(QUESTION, temperature=7.0)),
        Code.INVALID_ARGUMENT,
        "temperature",
    ),
    "negative temperature": (
        lambda c, s: list(c.generate(QUESTION, temperature=-0.5)),
        Code.INVALID_ARGUMENT,
        "temperature",
    ),
    "nan temperature": (
        lambda c, s: list(c.generate(QUESTION, temperature=float("nan"))),
        Code.INVALID_ARGUMENT,
        "temperature",
    ),
    "top_p zero": (lambda c, s: list(c.generate(QUESTION, top_p=0.0)), Code.INVALID_ARGUMENT, "top_p"),
    "empty prompt": (lambda c, s: list(c.generate("")), Code.INVALID_ARGUMENT, "prompt is empty"),
    "prompt and messages": (
        lambda c, s: list(c.generate(QUESTION, messages=[("user", "hi")])),
        Code.INVALID_ARGUMENT,
        "not both",
    ),
    "bad chat role": (lambda c, s: list(c.generate(messages=[("robot", "hi")])), Code.INVALID_ARGUMENT, "role 'robot'"),
    "no user message": (
        lambda c, s: list(c.generate(messages=[("system", "hi")])),
        Code.INVALID_ARGUMENT,
        "need a user message",
    ),
    "empty question": (
        lambda c, s: list(c.generate(messages=[("user", "hi"), ("assistant", "hello"), ("user", " ")])),
        Code.INVALID_ARGUMENT,
        "the question, is empty",
    ),
    "prompt too long for the context": (
        lambda c, s: list(c.generate(QUESTION * 100, max_new_tokens=4096)),
        Code.INVALID_ARGUMENT,
        "do not fit",
    ),
    "oversized message": (
        lambda c, s: list(c.generate("x" * (2 << 20))),
        Code.RESOURCE_EXHAUSTED,
        "larger than max",
    ),
    "oversized ingest stream": (
        lambda c, s: c.ingest("y" * (3 << 20), memory="doc"),  # many chunks, each under the message limit
        Code.RESOURCE_EXHAUSTED,
        "split the document",
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_gets_a_clear_status(case):
    call, code, phrase = BAD_REQUESTS[case]
    with model_service(max_message_bytes=1 << 20, max_ingest_bytes=2 << 20) as server:
        with pytest.raises((ServiceError, grpc.RpcError)) as error:
            call(client(server), server)
        got = error.value
        got_code, details = (got.code, got.details) if isinstance(got, ServiceError) else (got.code(), got.details())
        assert got_code == code, details
        assert phrase in details
        assert client(server).memories() == []  # nothing was written


def test_create_only_refuses_an_existing_memory(server):
    c = client(server)
    c.ingest(DOC, memory="doc", create_only=True)
    with pytest.raises(ServiceError) as error:
        c.ingest(DOC, memory="doc", create_only=True)
    assert error.value.code == Code.ALREADY_EXISTS


# -- auth, TLS, health, reflection, metrics, logs, stop ---------------------------------------------------


def test_bearer_token():
    with model_service(token="s3cret") as server:
        for token, phrase in ((None, "missing bearer token"), ("wrong", "wrong bearer token")):
            with pytest.raises(ServiceError) as error:
                list(client(server, token=token).generate(QUESTION))
            assert error.value.code == Code.UNAUTHENTICATED and phrase in error.value.details
        assert tokens_of(client(server, token="s3cret").generate(QUESTION, max_new_tokens=3))
        assert health_status(server.port) == health_pb2.HealthCheckResponse.SERVING  # probes need no token


def test_tls(tmp_path, self_signed_cert):
    cert, key = self_signed_cert
    with model_service(tls_cert=str(cert), tls_key=str(key)) as server:
        secure = MemoryClient(f"grpcs://127.0.0.1:{server.port}", tls_ca=str(cert))
        assert tokens_of(secure.generate(QUESTION, max_new_tokens=3))
        with pytest.raises(ServiceError):
            MemoryClient(f"127.0.0.1:{server.port}", timeout_s=2).memories()


def health_status(port: int, service: str = "") -> int:
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    return health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_not_serving_while_the_model_loads(monkeypatch):
    release = threading.Event()

    def slow_load(config):
        release.wait(20)
        return [make_lm()]

    monkeypatch.setattr(model_server, "load_engines", slow_load)
    port, started = free_port(), {}
    loader = threading.Thread(
        target=lambda: started.setdefault("server", serve(ModelServerConfig(port=port, host="127.0.0.1")))
    )
    loader.start()
    try:
        wait_for(lambda: _health_or_none(port) == health_pb2.HealthCheckResponse.NOT_SERVING)
        with pytest.raises(ServiceError) as error:
            MemoryClient(f"127.0.0.1:{port}").memories()
        assert error.value.code == Code.UNAVAILABLE and "loading" in error.value.details
        release.set()
        loader.join(20)
        assert health_status(port, "memlm.v1.MemoryLM") == health_pb2.HealthCheckResponse.SERVING
        assert MemoryClient(f"127.0.0.1:{port}").memories() == []
    finally:
        release.set()
        loader.join(20)
        if "server" in started:
            started["server"].stop(0)


def _health_or_none(port: int):
    try:
        return health_status(port)
    except grpc.RpcError:
        return None  # not listening yet


def test_reflection_lists_the_service(server):
    reflection = reflection_pb2_grpc.ServerReflectionStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
    replies = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
    )
    names = {service.name for reply in replies for service in reply.list_services_response.service}
    assert {"memlm.v1.MemoryLM", "grpc.health.v1.Health"} <= names


def test_metrics_endpoint_and_request_ids_in_logs(caplog):
    caplog.set_level("INFO", logger="memlm.serve")
    with model_service(metrics_port=0) as server:
        c = client(server)
        c.ingest(DOC, memory="doc")
        call = stub(server).Generate(
            memlm_pb2.GenerateRequest(prompt=QUESTION, max_tokens=4), metadata=(("x-request-id", "req-42"),)
        )
        assert len(list(call)) >= 1
        assert dict(call.initial_metadata())["x-request-id"] == "req-42"
        text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    assert 'memlm_requests_total{code="OK",method="Ingest"} 1.0' in text
    assert 'memlm_memory_tokens{memory="doc"}' in text
    assert "memlm_time_to_first_token_seconds_count 1.0" in text
    assert f'memlm_tokens_total{{kind="ingested"}} {float(len(DOC))}' in text
    logged = [record.fields for record in caplog.records if getattr(record, "fields", {}).get("request_id") == "req-42"]
    assert logged and logged[0]["method"] == "Generate" and logged[0]["code"] == "OK"


def test_graceful_stop_finishes_calls_in_flight():
    server = serve(ModelServerConfig(port=0, host="127.0.0.1"), engine=make_lm())
    pieces = client(server).generate(LONG_PROMPT, max_new_tokens=200)
    first = next(pieces)
    stopper = threading.Thread(target=server.stop, args=(30,))
    stopper.start()
    rest = list(pieces)
    stopper.join(30)
    assert len(tokens_of([first, *rest])) == 200 and rest[-1].finish_reason == "length"
    with pytest.raises(ServiceError) as error:
        client(server, timeout_s=2).memories()
    assert error.value.code == Code.UNAVAILABLE


def test_ingest_requests_chunk_large_texts():
    requests = list(ingest_requests(memlm_pb2.IngestStart(memory="m"), "z" * 600_000, None))
    assert [r.WhichOneof("kind") for r in requests] == ["start", "text", "text", "text", "end"]
    assert "".join(r.text for r in requests) == "z" * 600_000
