"""The store's numpy types as `memlm.v1` messages and back (proto/memlm/v1/store.proto).

Decoding checks everything a server must check before it trusts bytes from the network
(dtype, dimensions, byte length, NaN/Inf, empty batches, agreement with the declared
layout) and raises ValueError with a message that says what to fix.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from memlm.protos import from_tensor, store_pb2, to_tensor
from memlm.store.base import Blocks, MemoryStats, SearchResult

KEY_DTYPES = ("float16", "float32")
STATE_DTYPES = ("bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64") + (
    "float16",
    "float32",
    "float64",
)


# -- blocks ---------------------------------------------------------------------------------


def layout_of(layer: int, blocks: Blocks) -> store_pb2.LayerLayout:
    heads, _, block_len, dim = blocks.keys.shape
    return store_pb2.LayerLayout(
        layer=layer, heads=heads, block_len=block_len, head_dim=dim, dtype=blocks.keys.dtype.name
    )


def check_layout(layout: store_pb2.LayerLayout) -> None:
    if min(layout.heads, layout.block_len, layout.head_dim) < 1:
        raise ValueError(
            f"layer {layout.layer}: heads, block_len and head_dim must be >= 1, got "
            f"{layout.heads}, {layout.block_len}, {layout.head_dim}"
        )
    if layout.dtype not in KEY_DTYPES:
        accepted = " or ".join(KEY_DTYPES)
        raise ValueError(f"layer {layout.layer}: key dtype {layout.dtype!r} is not accepted; use {accepted}")


def layout_of_batch(batch: store_pb2.BlockBatch) -> store_pb2.LayerLayout:
    """The layout a layer's first batch declares when the header did not."""
    shape = list(batch.keys.shape)
    if len(shape) != 4:
        raise ValueError(f"layer {batch.layer}: keys must be (heads, blocks, block_len, head_dim), got shape {shape}")
    layout = store_pb2.LayerLayout(
        layer=batch.layer, heads=shape[0], block_len=shape[2], head_dim=shape[3], dtype=batch.keys.dtype
    )
    check_layout(layout)
    return layout


def split_blocks(blocks: Blocks, max_bytes: int) -> Iterator[Blocks]:
    """Consecutive slices of at most `max_bytes` each (at least one block per slice)."""
    heads, n, block_len, dim = blocks.keys.shape
    per_block = heads * (dim * 4 + 2 * block_len * dim * blocks.keys.itemsize) + block_len * 8
    step = max(1, max_bytes // per_block)
    for start in range(0, n, step):
        part = slice(start, start + step)
        yield Blocks(blocks.search_keys[:, part], blocks.keys[:, part], blocks.values[:, part], blocks.positions[part])


def blocks_to_proto(layer: int, blocks: Blocks, batch: store_pb2.BlockBatch) -> None:
    batch.layer = layer
    to_tensor(blocks.search_keys.astype(np.float32, copy=False), batch.search_keys)
    to_tensor(blocks.keys, batch.keys)
    to_tensor(blocks.values, batch.values)
    to_tensor(blocks.positions.astype(np.int64, copy=False), batch.positions)


def blocks_from_proto(batch: store_pb2.BlockBatch, layout: store_pb2.LayerLayout) -> Blocks:
    keys = from_tensor(batch.keys, "keys", KEY_DTYPES, ndim=4)
    heads, n, block_len, dim = keys.shape
    expected = (layout.heads, layout.block_len, layout.head_dim, layout.dtype)
    if (heads, block_len, dim, keys.dtype.name) != expected:
        raise ValueError(
            f"layer {batch.layer}: keys of shape {list(keys.shape)} {keys.dtype.name} do not match the header's "
            f"layout (heads, block_len, head_dim, dtype) = {expected}"
        )
    if n == 0:
        raise ValueError(f"layer {batch.layer}: empty batch (0 blocks)")
    blocks = Blocks(  # checks that the four shapes agree
        search_keys=from_tensor(batch.search_keys, "search_keys", ("float32",), ndim=3),
        keys=keys,
        values=from_tensor(batch.values, "values", (keys.dtype.name,), ndim=4),
        positions=from_tensor(batch.positions, "positions", ("int64",), ndim=2),
    )
    for name in ("search_keys", "keys", "values"):
        if not all_finite(getattr(blocks, name)):
            raise ValueError(f"layer {batch.layer}: {name} contain NaN or Inf")
    return blocks


def read_blocks_from_proto(batch: store_pb2.BlockBatch) -> Blocks:
    """A `ReadBlocks` reply (no blocks: `Blocks.none()`)."""
    if len(batch.keys.shape) == 4 and batch.keys.shape[1] == 0 or not batch.keys.shape:
        return Blocks.none()
    return blocks_from_proto(batch, layout_of_batch(batch))


def all_finite(array: np.ndarray) -> bool:
    if array.dtype == np.float16:  # numpy's float16 isfinite is slow; all-ones exponent bits mean NaN/Inf
        return not ((array.view(np.uint16) & 0x7C00) == 0x7C00).any()
    return bool(np.isfinite(array).all())


# -- search -----------------------------------------------------------------------------------


def queries_from_proto(tensor: store_pb2.Tensor) -> np.ndarray:
    queries = from_tensor(tensor, "queries", ("float32",), ndim=3)
    if 0 in queries.shape:
        raise ValueError(f"queries: empty batch, shape {list(queries.shape)}; send (heads, queries, head_dim)")
    if not all_finite(queries):
        raise ValueError("queries contain NaN or Inf")
    return queries


def result_to_proto(result: SearchResult) -> store_pb2.SearchReply:
    reply = store_pb2.SearchReply()
    to_tensor(result.keys, reply.keys)
    to_tensor(result.values, reply.values)
    to_tensor(result.positions.astype(np.int64, copy=False), reply.positions)
    to_tensor(result.scores.astype(np.float32, copy=False), reply.scores)
    return reply


def result_from_proto(reply: store_pb2.SearchReply) -> SearchResult:
    """Copies out of the message: callers get writable arrays, as from an in-process store
    (torch.from_numpy warns on read-only ones)."""
    keys = from_tensor(reply.keys, "keys", KEY_DTYPES, ndim=5)
    return SearchResult(
        keys=keys.copy(),
        values=from_tensor(reply.values, "values", (keys.dtype.name,), ndim=5).copy(),
        positions=from_tensor(reply.positions, "positions", ("int64",), ndim=4).copy(),
        scores=from_tensor(reply.scores, "scores", ("float32",), ndim=3).copy(),
    )


# -- state and stats ----------------------------------------------------------------------------


def state_to_proto(state: dict[str, np.ndarray], message: store_pb2.State) -> None:
    for name, array in state.items():
        to_tensor(np.asarray(array), message.arrays[name])


def state_from_proto(message: store_pb2.State) -> dict[str, np.ndarray]:
    return {name: from_tensor(t, f"state[{name!r}]", STATE_DTYPES).copy() for name, t in message.arrays.items()}


def stats_to_proto(stats: MemoryStats) -> store_pb2.MemoryStats:
    return store_pb2.MemoryStats(
        memory=stats.memory, blocks_per_layer=stats.blocks_per_layer, tokens=stats.tokens, bytes=stats.bytes
    )


def stats_from_proto(message: store_pb2.MemoryStats) -> MemoryStats:
    return MemoryStats(
        memory=message.memory,
        blocks_per_layer={int(layer): int(n) for layer, n in sorted(message.blocks_per_layer.items())},
        tokens=message.tokens,
        bytes=message.bytes,
    )
