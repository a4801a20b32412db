"""The layer mapping g(m) of TinyBERT: which teacher layer each student layer learns from.

Student layer m (1..M) is matched to teacher layer g(m) (1..N), both 1-based as in ``hidden_states[n]``
of a Hugging Face encoder (index 0 is the embedding output, which always maps to the teacher's
embeddings: g(0) = 0 is implicit and not part of the returned list).

- ``uniform``: g(m) = floor(m * N / M), the paper's default and best strategy.
- ``top``: the last M teacher layers, g(m) = N - M + m.
- ``bottom``: the first M teacher layers, g(m) = m.
- an explicit list of M non-decreasing indices within 1..N. A teacher layer may repeat: a student deeper
  than its teacher (M > N) has no other way to be mapped, and two student layers learning one teacher layer
  is well defined for every loss (the teacher's states and scores are read, never consumed). A list that
  goes back down (g(m+1) < g(m)) is refused: a deeper student layer would learn a shallower teacher state.
"""

from __future__ import annotations

from collections.abc import Sequence

STRATEGIES = ("uniform", "top", "bottom")


def layer_map(num_teacher_layers: int, num_student_layers: int, strategy: str | Sequence[int] = "uniform") -> list[int]:
    """Teacher layer index (1-based) for each student layer 1..M.

    Args:
        num_teacher_layers: N, the teacher's number of transformer layers.
        num_student_layers: M, the student's number of transformer layers (M <= N unless ``strategy`` is a list).
        strategy: ``uniform``, ``top``, ``bottom`` or an explicit non-decreasing list of M teacher layers.

    Returns:
        ``[g(1), ..., g(M)]``.

    Raises:
        ValueError: counts out of range, an unknown strategy, or an invalid explicit list.

    Examples:
        >>> layer_map(12, 4)
        [3, 6, 9, 12]
        >>> layer_map(6, 4)
        [1, 3, 4, 6]
    """
    n, m = num_teacher_layers, num_student_layers
    if n < 1 or m < 1:
        raise ValueError(f"layer counts must be >= 1, got teacher={n}, student={m}")
    if not isinstance(strategy, str):
        mapping = [int(x) for x in strategy]
        if len(mapping) != m:
            raise ValueError(
                f"distill.layer_map lists {len(mapping)} teacher layers but the student has {m} layers: {mapping}"
            )
        if any(not 1 <= x <= n for x in mapping):
            raise ValueError(f"distill.layer_map {mapping}: every entry must be within 1..{n} (teacher layers)")
        drops = [(i, a, b) for i, (a, b) in enumerate(zip(mapping, mapping[1:], strict=False), start=1) if b < a]
        if drops:
            i, a, b = drops[0]
            raise ValueError(
                f"distill.layer_map {mapping} must be non-decreasing (a teacher layer may repeat), but student "
                f"layer {i + 1} maps to teacher layer {b}, below layer {i}'s {a}"
            )
        return mapping
    if strategy not in STRATEGIES:
        raise ValueError(f"distill.layer_map must be one of {list(STRATEGIES)} or a list of ints, got {strategy!r}")
    if m > n:
        suggestion = [-(-i * n // m) for i in range(1, m + 1)]  # ceil(m * N / M): every teacher layer, some twice
        raise ValueError(
            f"the student has {m} layers but the teacher only {n}: a '{strategy}' layer map needs M <= N; give "
            f"an explicit list that repeats teacher layers instead, e.g. distill.layer_map={suggestion}"
        )
    if strategy == "uniform":
        return [(i * n) // m for i in range(1, m + 1)]
    if strategy == "top":
        return [n - m + i for i in range(1, m + 1)]
    return list(range(1, m + 1))
