"""Layer partition: how many decoder layers each pipeline stage holds.

A partition such as [2, 3, 3] becomes a stage-major grid `[stages, max_layers_per_stage]`:
layer l of stage s lives at grid slot (s, i), and a boolean mask marks the filled slots.

    partition [2, 3, 3]          grid (layer index, '-' = empty slot, skipped at run time)
    stage 0:  layers 0..1        [ 0  1  - ]
    stage 1:  layers 2..4        [ 2  3  4 ]
    stage 2:  layers 5..7        [ 5  6  7 ]
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

PARTITION_ENV = "JAXPP_PP_LAYER_PARTITION"


def layer_partition(
    num_layers: int, pp: int, custom: str | Sequence[int] | None = None
) -> list[int]:
    """Layers per stage.

    `custom` (a comma string "10,10,12" or a sequence) wins; otherwise the env var
    JAXPP_PP_LAYER_PARTITION; otherwise the automatic rule shared with vLLM and SGLang: every
    stage gets num_layers // pp layers and the leftover layers go one each to the stages just
    before the last, starting at the second-to-last and moving toward the front.
    """
    if pp < 1:
        raise ValueError(f"pp={pp} is invalid: expected at least 1 pipeline stage")
    if pp > num_layers:
        raise ValueError(
            f"pp={pp} is invalid: the model has only {num_layers} layers, "
            "so at most that many pipeline stages"
        )
    if custom is None:
        custom = os.environ.get(PARTITION_ENV) or None
    if custom is not None:
        return _parse_custom(custom, num_layers, pp)
    base, leftover = divmod(num_layers, pp)
    sizes = [base] * pp
    for i in range(leftover):
        sizes[pp - 2 - i if pp > 1 else 0] += 1
    return sizes


def _parse_custom(custom: str | Sequence[int], num_layers: int, pp: int) -> list[int]:
    label = f"layer partition {custom!r}"
    if isinstance(custom, str):
        if not custom.strip():
            raise ValueError(f"{label} is empty: expected {pp} comma-separated layer counts")
        items = custom.split(",")
        sizes = []
        for position, item in enumerate(items, 1):
            item = item.strip()
            if not item:
                raise ValueError(f"{label} has an empty item at position {position}")
            try:
                sizes.append(int(item))
            except ValueError:
                raise ValueError(
                    f"{label} has a non-integer item {item!r}: expected whole layer counts"
                ) from None
    else:
        sizes = list(custom)
        for item in sizes:
            if not isinstance(item, int | np.integer) or isinstance(item, bool):
                raise ValueError(
                    f"{label} has a non-integer item {item!r}: expected whole layer counts"
                )
        sizes = [int(s) for s in sizes]
    if len(sizes) != pp:
        raise ValueError(f"{label} has {len(sizes)} entries: expected one per stage, pp={pp}")
    bad = [s for s in sizes if s <= 0]
    if bad:
        raise ValueError(f"{label} has entry {bad[0]}: every stage needs at least 1 layer")
    if sum(sizes) != num_layers:
        raise ValueError(f"{label} sums to {sum(sizes)}: expected the model's {num_layers} layers")
    return sizes


def stage_ranges(sizes: Sequence[int]) -> list[tuple[int, int]]:
    """[start, end) layer range of each stage."""
    ends = np.cumsum(sizes).tolist()
    return [(end - size, end) for size, end in zip(sizes, ends, strict=True)]


def layer_grid(sizes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(layer index per slot [S, Lmax] with -1 for empty slots, mask [S, Lmax])."""
    lmax = max(sizes)
    grid = np.full((len(sizes), lmax), -1, dtype=np.int32)
    for s, (start, end) in enumerate(stage_ranges(sizes)):
        grid[s, : end - start] = np.arange(start, end)
    return grid, grid >= 0
