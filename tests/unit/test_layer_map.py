from __future__ import annotations

import pytest

from dist_kd.layer_map import layer_map


@pytest.mark.parametrize(
    ("n", "m", "expected"),
    [(12, 4, [3, 6, 9, 12]), (6, 4, [1, 3, 4, 6]), (12, 6, [2, 4, 6, 8, 10, 12]), (4, 4, [1, 2, 3, 4]), (6, 1, [6])],
)
def test_uniform(n, m, expected):
    assert layer_map(n, m) == expected
    assert layer_map(n, m, "uniform") == [(i * n) // m for i in range(1, m + 1)]


def test_top_and_bottom():
    assert layer_map(12, 4, "top") == [9, 10, 11, 12]
    assert layer_map(12, 4, "bottom") == [1, 2, 3, 4]


def test_explicit_list_validated():
    assert layer_map(12, 3, [2, 7, 12]) == [2, 7, 12]
    with pytest.raises(ValueError, match="student has 4 layers"):
        layer_map(12, 4, [1, 2, 3])
    assert layer_map(12, 3, [2, 2, 5]) == [2, 2, 5]  # a repeat is allowed
    with pytest.raises(ValueError, match=r"non-decreasing .* layer 3 maps to teacher layer 4, below layer 2's 7"):
        layer_map(12, 3, [2, 7, 4])
    with pytest.raises(ValueError, match="within 1..12"):
        layer_map(12, 3, [0, 4, 8])
    with pytest.raises(ValueError, match="within 1..12"):
        layer_map(12, 3, [4, 8, 13])


def test_bad_strategy_and_counts():
    with pytest.raises(ValueError, match="uniform"):
        layer_map(12, 4, "middle")
    with pytest.raises(ValueError, match="one of .* got 'bogus'"):  # the unknown name, not the M <= N error
        layer_map(4, 6, "bogus")
    with pytest.raises(ValueError, match="M <= N"):
        layer_map(4, 6)
    with pytest.raises(ValueError):
        layer_map(0, 1)


def test_deeper_student_follows_the_advice_of_the_error():
    """M > N: the error's suggested list is accepted, covers every teacher layer in order and ends at N."""
    for n, m in [(4, 6), (2, 5), (6, 12), (3, 4)]:
        with pytest.raises(ValueError, match="M <= N") as caught:
            layer_map(n, m)
        suggestion = [int(x) for x in str(caught.value).split("layer_map=[")[1].rstrip("]").split(",")]
        assert layer_map(n, m, suggestion) == suggestion
        assert sorted(set(suggestion)) == list(range(1, n + 1)) and suggestion[-1] == n
