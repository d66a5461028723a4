"""Attention maths shared by every memory backend: RoPE re-rotation and softmax attention
that also returns its log-sum-exp, so that two attentions (local and memory) can be merged
exactly into one softmax (Focused Transformer) or mixed by a gate (Memorizing Transformer).

Shapes: Hq query heads, Hkv key/value heads, G = Hq // Hkv (grouped-query attention),
T queries, L keys, D head size.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Attended(NamedTuple):
    out: torch.Tensor  # (Hkv, G, T, D)
    lse: torch.Tensor  # (Hkv, G, T) float32: log of the softmax denominator


def rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., T, D) by RoPE angles for `positions` (T,) or (..., T).

    Rotations compose (R(a) R(b) = R(a + b)), so a key rotated for position p becomes the key
    for position q by `rotate(key, q - p)`, and `rotate(key, -p)` recovers the unrotated key.
    The angles are computed in float32 exactly as transformers does, so that undoing a
    rotation transformers applied is exact to rounding.
    """
    freqs = positions.to(x.device, torch.float32)[..., None] * inv_freq.to(x.device, torch.float32)  # (..., T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    x32 = x.to(torch.float32)
    first, second = x32.chunk(2, dim=-1)
    rotated_half = torch.cat((-second, first), dim=-1)
    return (x32 * emb.cos() + rotated_half * emb.sin()).to(x.dtype)


def softmax_attention(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float, causal: bool) -> Attended:
    """Plain attention of queries (B, H, T, D) over keys/values (B, H or 1, L, D), returning the
    log-sum-exp too. `causal` needs T == L. On CPU this is PyTorch's fused flash kernel (the
    one SDPA uses, called directly because SDPA does not return the log-sum-exp)."""
    if keys.shape[1] != queries.shape[1]:
        keys = keys.expand(-1, queries.shape[1], -1, -1)
        values = values.expand(-1, queries.shape[1], -1, -1)
    if queries.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            queries, keys, values, 0.0, causal, scale=scaling
        )
        return Attended(out, lse)
    scores = torch.matmul(queries, keys.transpose(-1, -2)).float() * scaling  # (B, H, T, L)
    if causal:
        future = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.exp(scores - lse[..., None]).to(values.dtype), values)
    return Attended(out, lse)


def merge(first: Attended, second: Attended) -> Attended:
    """The softmax over the union of two key sets, from the softmaxes over each: weight each
    output by its share of the total mass. Exact, and the Focused Transformer's joint softmax."""
    second_share = torch.sigmoid(second.lse - first.lse)[..., None]
    out = torch.lerp(first.out.float(), second.out.float(), second_share)
    return Attended(out.to(first.out.dtype), torch.logaddexp(first.lse, second.lse))


def attend(
    queries: torch.Tensor,
    prefix_keys: torch.Tensor,
    prefix_values: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scaling: float,
) -> Attended:
    """Local attention: queries (Hkv, G, T, D) over a prefix (Hkv, P, D) that every query sees
    (sinks, local window) and their own tokens' keys/values (Hkv, T, D), seen causally."""
    own = softmax_attention(queries, keys[:, None], values[:, None], scaling, causal=True)
    if prefix_keys.shape[1] == 0:
        return own
    past = softmax_attention(queries, prefix_keys[:, None], prefix_values[:, None], scaling, causal=False)
    return merge(past, own)


def attend_chunks(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float, chunk: int
) -> Attended:
    """Each chunk of `chunk` consecutive queries attends to its own retrieved keys.

    queries (Hkv, G, T, D); keys/values (Hkv, C, M, D) with C = ceil(T / chunk) chunks of M
    retrieved keys each.
    """
    heads, group, num_queries, dim = queries.shape
    chunk = min(chunk, num_queries)  # a decoding step is one short chunk: do not pad it
    num_chunks = keys.shape[1]
    padded = num_chunks * chunk
    q = torch.nn.functional.pad(queries, (0, 0, 0, padded - num_queries))  # (Hkv, G, C*chunk, D)
    q = q.view(heads, group, num_chunks, chunk, dim).transpose(1, 2)  # (Hkv, C, G, chunk, D)
    q = q.reshape(heads, num_chunks, group * chunk, dim)
    out, lse = softmax_attention(q, keys, values, scaling, causal=False)  # (Hkv, C, G*chunk, ...)

    def unchunk(x: torch.Tensor) -> torch.Tensor:  # (Hkv, C, G*chunk, ...) -> (Hkv, G, T, ...)
        x = x.reshape(heads, num_chunks, group, chunk, *x.shape[3:]).transpose(1, 2)
        return x.reshape(heads, group, padded, *x.shape[4:])[:, :, :num_queries]

    return Attended(unchunk(out), unchunk(lse[..., None])[..., 0])


def chunk_query_sums(queries: torch.Tensor, chunk: int) -> torch.Tensor:
    """Search vectors for block retrieval: per key/value head, the sum of all queries of a
    chunk over the heads of its group. The summed query's inner product with a key equals
    the sum of the chunk's individual scores (InfLLM's chunk-level relevance).

    queries (Hkv, G, T, D) -> (Hkv, C, D)
    """
    heads, group, num_queries, dim = queries.shape
    chunk = min(chunk, num_queries)
    num_chunks = -(-num_queries // chunk)
    padded = torch.nn.functional.pad(queries.float(), (0, 0, 0, num_chunks * chunk - num_queries))
    return padded.view(heads, group, num_chunks, chunk, dim).sum(dim=(1, 3))
