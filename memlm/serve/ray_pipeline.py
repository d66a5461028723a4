"""`memlm serve --ray`: the model's layers split into contiguous blocks, one Ray actor each
(a pipeline), `replicas` pipelines side by side.

    engines = load_pipelines(PipelineConfig(shards=2, replicas=1))   # local Ray cluster
    engines = load_pipelines(PipelineConfig(shards=4, ray_address="ray://head:10001", store="grpc://store:50052"))

A shard is the stock transformers model cut down to its block of layers (renumbered from
0, so that it is a small model of its own); every shard but the last has its final norm
replaced by the identity. The first shard takes token ids, the others take the previous
shard's hidden states as `inputs_embeds`, and the last one applies the LM head. Each shard
runs a `MemoryLM` of its own over its layers: its `MemorySession`s hold the local windows of
those layers only, and it streams its memory layers' keys and values to the store service
over gRPC (`RemoteStore`). The per-shard memories live in the store as
`<memory>.layers-<a>-<b>`, each with its own state, so shards never write the same thing.

On the driver, `PipelineLM` is a `MemoryLM` whose model is an empty skeleton (meta device)
and whose sessions (`PipelineSession`) send a segment through the actors, one hop per shard; hidden states
go from actor to actor without passing through the driver. Everything else, tokenizing,
segmenting, sampling, stop strings, locks and validation, is `MemoryLM`'s own code, so the
pipeline gives the same tokens as one process. `PipelineStore` stands in for the driver's
store: committing a memory commits it on every shard.

Limits: an ingest commits shard by shard; if one shard's commit fails after another's
succeeded, the shards disagree about that memory (the error says so; delete and ingest it
again). Embeddings and the LM head are kept on every shard (simple; they are a small part
of a large model).
"""

from __future__ import annotations

import copy
import os
import threading
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import ray
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedModel

from memlm.config import MemoryConfig
from memlm.engine import MemoryLM
from memlm.memory.base import Logits, Retrieval, logits_of
from memlm.model.loading import embedded_model_dir, load_model, resolve_dtype
from memlm.store import MemoryNotFound, MemoryStats, check_memory_name, open_store

SHARD_SUFFIX = ".layers-"


@dataclass
class PipelineConfig:
    model: str | None = None  # checkpoint directory; None: the embedded model
    backend: str = "fot"
    store: str | None = None  # grpc://... store service; anything else: one is started here over it
    dtype: str = "auto"  # memlm/model/loading.py resolve_dtype, on each shard's own device
    settings: dict = field(default_factory=dict)  # MemoryConfig overrides
    shards: int = 2
    replicas: int = 1
    ray_address: str | None = None  # None: start a local Ray cluster
    cpus_per_shard: float = 1.0
    gpus_per_shard: float | None = None  # None: 1 when the cluster has GPUs, else 0

    @classmethod
    def from_server_config(cls, config) -> PipelineConfig:
        """From a `ModelServerConfig`."""
        return cls(
            model=config.model,
            backend=config.backend,
            store=config.store,
            dtype=config.dtype,
            settings=dict(config.settings),
            shards=config.shards,
            replicas=config.replicas,
            ray_address=config.ray_address,
        )

    def memory_config(self) -> MemoryConfig:
        if self.backend == "rmt":
            # Its memory tokens loop from the last layer's output back into the first layer,
            # so every segment would cross all shards twice: serve rmt in one process.
            raise ValueError("the rmt backend does not run as a Ray pipeline; serve it without --ray")
        # The passage read probes the prompt and fetches every layer's blocks from one place;
        # across shards each actor holds its own layers, so a pipeline reads per head ("bag"),
        # and has no use for a dense index.
        return replace(MemoryConfig(), backend=self.backend, **{"read": "bag", "embedder": None, **self.settings})


def layer_blocks(num_layers: int, shards: int) -> list[tuple[int, int]]:
    """Contiguous blocks [a, b) covering the layers, sizes differing by at most one."""
    if not 1 <= shards <= num_layers:
        raise ValueError(f"shards must lie between 1 and the model's {num_layers} layers, got {shards}")
    bounds = [round(i * num_layers / shards) for i in range(shards + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def shard_memory(memory: str, block: tuple[int, int]) -> str:
    return f"{memory}{SHARD_SUFFIX}{block[0]}-{block[1]}"


def shard_model(model: PreTrainedModel, block: tuple[int, int]) -> PreTrainedModel:
    """The layers [a, b) of `model` as a model of their own (layers renumbered from 0); the
    final norm only in the last block."""
    start, stop = block
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = stop - start
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[start:stop]
    shard = AutoModelForCausalLM.from_config(config, dtype=model.dtype).eval()
    state = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("model.layers."):
            index = int(name.split(".")[2])
            if not start <= index < stop:
                continue
            name = name.replace(f"model.layers.{index}.", f"model.layers.{index - start}.", 1)
        state[name] = tensor
    shard.load_state_dict(state)
    if stop < model.config.num_hidden_layers:
        shard.model.norm = nn.Identity()  # the next block continues from the raw residual stream
    return shard


# -- the actor ----------------------------------------------------------------------------------------


@dataclass
class ShardSpec:
    block: tuple[int, int]
    num_layers: int  # of the whole model
    config: MemoryConfig  # the whole model's; the actor keeps its own layers
    store: str  # grpc://... of the store service
    model: str | None = None  # checkpoint to load and cut (None: the embedded model) ...
    weights: PreTrainedModel | None = None  # ... unless the shard itself is given (tests, small models)
    dtype: str = "auto"


class ShardWorker:
    """One block of layers: a Ray actor (methods run one at a time)."""

    def __init__(self, spec: ShardSpec):
        self.spec = spec
        start, stop = spec.block
        self.first, self.last = start == 0, stop == spec.num_layers
        self.device = torch.device("cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu")
        if spec.weights is not None:
            shard = spec.weights
        else:
            weights = resolve_dtype(spec.dtype, self.device.type)
            shard = shard_model(load_model(spec.model, dtype=weights)[0], spec.block)
        shard = shard.to(self.device).eval()
        local = [layer - start for layer in spec.config.layer_indices(spec.num_layers) if start <= layer < stop]
        self.lm = MemoryLM(shard, None, open_store(spec.store), replace(spec.config, memory_layers=local))
        self.sessions: dict[str, tuple[str, object]] = {}  # session id -> (store memory name, MemorySession)

    def ready(self) -> str:
        return str(self.device)

    def open(self, session_id: str, memory: str | None, writes: bool) -> int:
        """Open a session over this shard's part of `memory`; returns where the prompt starts
        (the window end) for reads."""
        name = shard_memory(memory, self.spec.block) if memory is not None else None
        session = self.lm.open_session(name, writes)
        self.sessions[session_id] = (name, session)
        return 0 if writes else session.window_end

    @torch.inference_mode()
    def forward(self, session_id: str, hidden: torch.Tensor | None, token_ids: list[int], logits: str):
        """Run the block over one segment: token ids into the first shard, the previous shard's
        hidden states into the others. Returns hidden states, or from the last shard the logits
        (as `Session.forward`)."""
        _, session = self.sessions[session_id]
        out = session.run(token_ids, inputs_embeds=None if self.first else hidden)
        if not self.last:
            return out.cpu()
        result = logits_of(self.lm.model, out, logits)
        return None if result is None else result.cpu()

    def commit(self, session_id: str) -> None:
        name, session = self.sessions.pop(session_id)
        self.lm.commit(name, session)

    def rollback(self, session_id: str) -> None:
        name, _ = self.sessions.pop(session_id, (None, None))
        if name is not None:
            self.lm.store.rollback(name)

    def close(self, session_id: str) -> None:
        self.sessions.pop(session_id, None)


# -- the driver ------------------------------------------------------------------------------------------


class PipelineSession:
    """The driver's handle of one session, open on every shard (the `Session` contract of
    memlm/memory/base.py; the windows themselves live in the actors)."""

    # The shards read their memory layers themselves (the bag read: the pipeline sets read="bag").
    has_memory = False

    def __init__(self, pipeline: PipelineLM, session_id: str, writes: bool, window_end: int):
        self.pipeline, self.session_id, self.writes = pipeline, session_id, writes
        self.window_end = window_end
        self.retrieved: dict[int, Retrieval] = {}

    def forward(self, token_ids: list[int], logits: Logits) -> torch.Tensor | None:
        """Token ids into the first shard; each shard's hidden states go on to the next as an
        object reference, without passing through the driver; the last one's logits come back."""
        actors, hidden = self.pipeline.actors, None
        for actor in actors[:-1]:
            hidden = actor.forward.remote(self.session_id, hidden, token_ids, "none")
        result = ray.get(actors[-1].forward.remote(self.session_id, hidden, token_ids, logits))
        self.window_end += len(token_ids)
        return result

    def in_view(self) -> list[tuple[int, int]]:
        return []  # held by the shards

    def state(self) -> dict[str, np.ndarray]:
        return {}  # each shard saves its own at commit

    def __del__(self):
        if not self.writes:  # a write session is closed by its commit or rollback
            self.pipeline.store.close_session(self.session_id)


class PipelineStore:
    """The driver's view of the store: memories are named as the user names them, each made
    of one store memory per shard. Reads go to the store service; commits and rollbacks go
    to the shards, which hold the open transactions."""

    def __init__(self, store_url: str, blocks: list[tuple[int, int]], actors: list):
        self.blocks, self.actors = blocks, actors
        self.service = open_store(store_url)
        self.writing: dict[str, str] = {}  # memory -> session id of its open ingest

    def _parts(self, memory: str) -> list[str]:
        return [shard_memory(check_memory_name(memory), block) for block in self.blocks]

    def memories(self) -> list[str]:
        names = set(self.service.memories())
        found = {name.rsplit(SHARD_SUFFIX, 1)[0] for name in names if SHARD_SUFFIX in name}
        return sorted(memory for memory in found if all(part in names for part in self._parts(memory)))

    def exists(self, memory: str) -> bool:
        return memory in self.memories()

    def stats(self, memory: str) -> MemoryStats:
        if not self.exists(memory):
            raise MemoryNotFound(memory, self.memories())
        parts = [self.service.stats(part) for part in self._parts(memory)]
        return MemoryStats(memory, tokens=max(p.tokens for p in parts), bytes=sum(p.bytes for p in parts))

    def delete(self, memory: str) -> None:
        names = set(self.service.memories())
        parts = [part for part in self._parts(memory) if part in names]
        if not parts:
            raise MemoryNotFound(memory, self.memories())
        for part in parts:
            self.service.delete(part)

    def save_state(self, memory: str, state: dict) -> None:
        pass  # the shards save their own states when they commit

    def commit(self, memory: str) -> None:
        session_id = self.writing.pop(memory)
        try:
            ray.get([actor.commit.remote(session_id) for actor in self.actors])
        except Exception as error:
            raise RuntimeError(
                f"committing {memory!r} failed on a shard ({error}); its shards may now disagree: "
                "delete the memory and ingest it again"
            ) from error

    def rollback(self, memory: str) -> None:
        session_id = self.writing.pop(memory, None)
        if session_id is not None:
            ray.get([actor.rollback.remote(session_id) for actor in self.actors])

    def close_session(self, session_id: str) -> None:
        try:
            for actor in self.actors:
                actor.close.remote(session_id)
        except Exception:  # noqa: BLE001 - Ray already shut down: nothing left to close
            pass

    def close(self) -> None:
        close = getattr(self.service, "close", None)
        if close is not None:
            close()


class PipelineLM(MemoryLM):
    """A `MemoryLM` whose layers run in a pipeline of Ray actors."""

    def __init__(
        self, skeleton: PreTrainedModel, tokenizer, config: MemoryConfig, store: PipelineStore, shared: _Shared
    ):
        super().__init__(skeleton, tokenizer, store, config)
        self.actors, self._shared = store.actors, shared

    def open_session(self, memory: str | None, writes: bool) -> PipelineSession:
        if memory is not None and not writes and not self.store.exists(memory):
            raise MemoryNotFound(memory, self.store.memories())
        session_id = uuid.uuid4().hex
        window_ends = ray.get([actor.open.remote(session_id, memory, writes) for actor in self.actors])
        if writes:
            self.store.writing[memory] = session_id
        return PipelineSession(self, session_id, writes, window_ends[0])

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.store.close()
        self._shared.release()


class _Shared:
    """What all replicas share and the last one to close releases: the store service this
    process started (if any) and the Ray cluster it started (if any)."""

    def __init__(self, users: int, store_server=None, started_ray: bool = False):
        self.users, self.store_server, self.started_ray = users, store_server, started_ray
        self._guard = threading.Lock()

    def release(self) -> None:
        with self._guard:
            self.users -= 1
            if self.users:
                return
        if self.store_server is not None:
            self.store_server.stop(5).wait()
        if self.started_ray:
            ray.shutdown()


def _skeleton(model_config, generation_config: GenerationConfig | None) -> PreTrainedModel:
    """The model's structure without weights (meta device): what `MemoryLM` reads on the driver."""
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model_config)
    if generation_config is not None:
        skeleton.generation_config = generation_config
    return skeleton


def _start_ray(config: PipelineConfig) -> bool:
    """Join the cluster at `ray_address`, or start a local one; True when started here."""
    if ray.is_initialized():
        return False
    if config.ray_address:
        ray.init(address=config.ray_address, log_to_driver=False)
        return False
    # Logical CPUs enough for every shard even on a small machine; the OS shares the real ones.
    cpus = max(os.cpu_count() or 1, int(np.ceil(config.shards * config.replicas * config.cpus_per_shard)))
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    return True


def _store_service(config: PipelineConfig):
    """The store URL the shards write to: the configured store service, or one started here
    over the configured store (its server is returned too, to stop it at the end)."""
    if config.store and config.store.startswith(("grpc://", "grpcs://")):
        return config.store, None
    from memlm.serve.store_server import serve as serve_store

    local = config.ray_address is None
    server = serve_store(port=0, data=config.store, host="127.0.0.1" if local else "[::]")
    host = "127.0.0.1" if local else ray.util.get_node_ip_address()
    return f"grpc://{host}:{server.port}", server


def load_pipelines(config: PipelineConfig, model: PreTrainedModel | None = None, tokenizer=None) -> list[PipelineLM]:
    """Start `config.replicas` pipelines of `config.shards` actors. `model` and `tokenizer`:
    a model already in memory, shipped to the actors in pieces (tests, small models);
    otherwise every actor loads `config.model` (None: the embedded model) and keeps its block."""
    memory_config = config.memory_config()
    if model is not None:
        model_config, generation_config, path = model.config, model.generation_config, None
    else:
        path = Path(config.model).expanduser() if config.model else embedded_model_dir()
        model_config, tokenizer = AutoConfig.from_pretrained(path), AutoTokenizer.from_pretrained(path)
        generation_config = (
            GenerationConfig.from_pretrained(path) if (path / "generation_config.json").exists() else None
        )
    num_layers = model_config.num_hidden_layers
    memory_config.validate(num_layers, int(model_config.max_position_embeddings))
    blocks = layer_blocks(num_layers, config.shards)

    started_ray = _start_ray(config)
    store_url, store_server = _store_service(config)
    gpus = config.gpus_per_shard
    if gpus is None:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    worker = ray.remote(ShardWorker).options(num_cpus=config.cpus_per_shard, num_gpus=gpus, max_concurrency=1)
    shared = _Shared(config.replicas, store_server, started_ray)
    pipelines = []
    for _ in range(config.replicas):
        actors = []
        for block in blocks:
            weights = shard_model(model, block) if model is not None else None  # pickled to the actor
            spec = ShardSpec(
                block, num_layers, memory_config, store_url, str(path) if path else None, weights, config.dtype
            )
            actors.append(worker.remote(spec))
        ray.get([actor.ready.remote() for actor in actors])  # fail here, not on the first request
        store = PipelineStore(store_url, blocks, actors)
        pipelines.append(
            PipelineLM(_skeleton(model_config, generation_config), tokenizer, memory_config, store, shared)
        )
    return pipelines
