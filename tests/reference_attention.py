"""Independent computations of the raw attention scores of MPNet and DeBERTa-v2/v3 from a layer's weights:
the papers' formulas written out term by term, with each model's relative-position buckets implemented
here rather than taken from transformers. Used by tests/unit/test_adapters.py (tiny models) and
tests/e2e/test_real_encoders.py (the real all-mpnet-base-v2)."""

from __future__ import annotations

import math

import torch


def mpnet_bucket(relative: int, num_buckets: int = 32, max_distance: int = 128) -> int:
    """T5's bidirectional bucket of a relative position j - i, as MPNet uses it (exact below 8, then log)."""
    half = num_buckets // 2
    bucket = half if relative > 0 else 0
    distance = abs(relative)
    exact = half // 2
    if distance < exact:
        return bucket + distance
    large = exact + int(math.log(distance / exact) / math.log(max_distance / exact) * (half - exact))
    return bucket + min(large, half - 1)


def mpnet_scores(attention, bias_table, h_LD, heads):
    """QK^T / sqrt(d) + b[bucket(j - i), head] for one sequence, (H, L, L)."""
    length, width = h_LD.shape
    d = width // heads
    q = attention.q(h_LD).view(length, heads, d).transpose(0, 1)
    k = attention.k(h_LD).view(length, heads, d).transpose(0, 1)
    bias = torch.tensor([[mpnet_bucket(j - i) for j in range(length)] for i in range(length)])
    return q @ k.transpose(-1, -2) / math.sqrt(d) + bias_table[bias].permute(2, 0, 1)


def deberta_bucket(relative: int, buckets: int, max_position: int) -> int:
    """DeBERTa's relative position i - j: exact within buckets/2, log-spaced beyond (no buckets: exact)."""
    if buckets <= 0:
        return relative
    mid = buckets // 2
    if abs(relative) <= mid:
        return relative
    log_pos = math.ceil(math.log(abs(relative) / mid) / math.log((max_position - 1) / mid) * (mid - 1)) + mid
    return int(math.copysign(log_pos, relative))


def deberta_scores(attention, rel_embeddings, config, h_LD, heads):
    """(content + c2p + p2c) / sqrt(3 d) for one sequence, (H, L, L), term by term over (i, j).

    c2p[i, j] = q_i . K_r[delta(i, j) + k] and p2c[i, j] = k_j . Q_r[k - delta(j, i)], indices clamped to
    [0, 2k), with k the attention span (buckets, or the maximum relative distance).
    """
    length, width = h_LD.shape
    d = width // heads
    span = config.position_buckets if config.position_buckets > 0 else config.max_relative_positions
    max_position = config.max_relative_positions
    if max_position <= 0:
        max_position = config.max_position_embeddings
    rel = rel_embeddings[: 2 * span]
    key_proj = attention.key_proj if config.share_att_key else attention.pos_key_proj
    query_proj = attention.query_proj if config.share_att_key else attention.pos_query_proj

    def split(x):
        return x.view(x.shape[0], heads, d).transpose(0, 1)

    q, k = split(attention.query_proj(h_LD)), split(attention.key_proj(h_LD))
    k_r, q_r = split(key_proj(rel)), split(query_proj(rel))
    out = torch.empty(heads, length, length)
    for i in range(length):
        for j in range(length):
            c2p = min(max(deberta_bucket(i - j, config.position_buckets, max_position) + span, 0), 2 * span - 1)
            p2c = min(max(span - deberta_bucket(j - i, config.position_buckets, max_position), 0), 2 * span - 1)
            terms = (q[:, i] * k[:, j]).sum(-1) + (q[:, i] * k_r[:, c2p]).sum(-1) + (k[:, j] * q_r[:, p2c]).sum(-1)
            out[:, i, j] = terms / math.sqrt(3 * d)
    return out
