"""Layer partition rules: the vLLM/SGLang reference table, custom partitions, and every error."""

import numpy as np
import pytest

from jaxpp import layer_partition
from jaxpp.partition import PARTITION_ENV, layer_grid, stage_ranges

REFERENCE_TABLE = [
    (2, 2, [1, 1]),
    (3, 2, [2, 1]),
    (3, 3, [1, 1, 1]),
    (4, 3, [1, 2, 1]),
    (5, 3, [2, 2, 1]),
    (61, 4, [15, 15, 16, 15]),
    (32, 4, [8, 8, 8, 8]),
    (7, 1, [7]),
]


@pytest.mark.parametrize("layers,pp,expected", REFERENCE_TABLE)
def test_auto_partition_matches_reference_table(layers, pp, expected, monkeypatch):
    monkeypatch.delenv(PARTITION_ENV, raising=False)
    assert layer_partition(layers, pp) == expected


@pytest.mark.parametrize(
    "custom,layers,ranges",
    [
        ("5,5,5,5", 20, [(0, 5), (5, 10), (10, 15), (15, 20)]),
        ("4,6,6,4", 20, [(0, 4), (4, 10), (10, 16), (16, 20)]),
        ("5,6,5,6", 22, [(0, 5), (5, 11), (11, 16), (16, 22)]),
        ([4, 6, 6, 4], 20, [(0, 4), (4, 10), (10, 16), (16, 20)]),
        (" 4, 6 ,6,4 ", 20, [(0, 4), (4, 10), (10, 16), (16, 20)]),
    ],
)
def test_custom_partition(custom, layers, ranges):
    assert stage_ranges(layer_partition(layers, 4, custom)) == ranges


def test_env_var_partition_and_explicit_argument_wins(monkeypatch):
    monkeypatch.setenv(PARTITION_ENV, "10,10,12")
    assert layer_partition(32, 3) == [10, 10, 12]
    assert layer_partition(32, 3, "12,10,10") == [12, 10, 10]


@pytest.mark.parametrize(
    "custom,layers,pp,message",
    [
        ("5,5,5,5,", 20, 4, r"'5,5,5,5,'.*empty item at position 5"),
        ("5,5,5,a", 20, 4, r"'5,5,5,a'.*non-integer item 'a'"),
        ("5,5,5", 15, 4, r"'5,5,5'.*3 entries.*pp=4"),
        ("5,5,5,5", 21, 4, r"'5,5,5,5'.*sums to 20.*21 layers"),
        ("5,0,10,5", 20, 4, r"'5,0,10,5'.*entry 0.*at least 1"),
        ("5,-1,11,5", 20, 4, r"'5,-1,11,5'.*entry -1.*at least 1"),
        ("", 20, 4, r"''.*empty"),
        ("2.5,2.5", 5, 2, r"non-integer item '2.5'"),
        ([5, 5.0, 5, 5], 20, 4, r"non-integer item 5.0"),
    ],
)
def test_bad_custom_partition_names_value(custom, layers, pp, message):
    with pytest.raises(ValueError, match=message):
        layer_partition(layers, pp, custom)


def test_more_stages_than_layers():
    with pytest.raises(ValueError, match=r"pp=5.*only 4 layers"):
        layer_partition(4, 5)


def test_grid_and_mask_for_uneven_partition():
    grid, mask = layer_grid([2, 3, 3])
    np.testing.assert_array_equal(grid, [[0, 1, -1], [2, 3, 4], [5, 6, 7]])
    np.testing.assert_array_equal(mask, grid >= 0)
