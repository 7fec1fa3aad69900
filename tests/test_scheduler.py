"""The host scheduler on its own (no device): admission, slot balance, chunk plans, the finish
rules it shares with the device, stop-string withdrawal and the run counters. Device logs are
written by hand here, shaped like pipeline.StepLog."""

from types import SimpleNamespace

import numpy as np
import pytest

from jaxpp.config import SamplingParams
from jaxpp.scheduler import Request, Scheduler, SlotLayout

EOS = (2,)


def _scheduler(replicas=1, microbatches=2, rows=2, chunk=4, stages=2, stop_check=None):
    layout = SlotLayout(replicas, microbatches, rows)
    return Scheduler(layout, chunk, stages, 4, EOS, stop_check)


def _request(tag, length, **params):
    p = SamplingParams(**{"max_tokens": 3, "temperature": 0.0, **params})
    return Request(tag=tag, prompt=list(range(10, 10 + length)), params=p, seed=0, arrival=0.0)


def _log(step, ticks, entries=(), width=None):
    """A StepLog with `entries` = [(tick, replica, column, tag, token)]."""
    width = step.kind.width if width is None else width
    replicas = step.plan_tokens.shape[0]
    k = max(ticks, 1)
    tags = np.full((k, replicas, width + 1), -1, np.int32)
    tokens = np.zeros((k, replicas, width + 1), np.int32)
    for t, r, c, tag, token in entries:
        tags[t, r, c], tokens[t, r, c] = tag, token
    zeros = np.zeros((k, replicas, width + 1), np.float32)
    return SimpleNamespace(
        ticks=np.int32(ticks),
        tags=tags,
        tokens=tokens,
        logprob=zeros,
        top_ids=zeros[..., None][..., :0],
        top_logprobs=zeros[..., None][..., :0],
        busy=np.ones((k, 2), np.int32),
        chunks=np.zeros((k, 2), np.int32),
        logits=np.zeros((k, replicas, 0, 0), np.float32),
        logit_meta=np.full((k, replicas, 5), -1, np.int32),
    )


def test_slot_layout_round_trips():
    lay = SlotLayout(2, 3, 4)
    assert lay.slots == 24
    for slot in range(lay.slots):
        assert lay.slot(*lay.locate(slot)) == slot
    assert lay.locate(13) == (1, 0, 1)  # replica 1, micro-batch 0, row 1


def test_admission_is_fcfs_balanced_and_compact():
    s = _scheduler(replicas=2, microbatches=2, rows=2)
    for tag in range(6):
        s.add(_request(tag, 3))
    step = s.schedule()
    slots = [s.active[tag].slot for tag in range(6)]
    # Replicas alternate, then micro-batches, each filled from row 0.
    assert [s.layout.locate(x) for x in slots] == [
        (0, 0, 0),
        (1, 0, 0),
        (0, 1, 0),
        (1, 1, 0),
        (0, 0, 1),
        (1, 0, 1),
    ]
    assert step.kind.width == 2  # the highest busy row is 1
    assert list(step.tags[slots]) == list(range(6))
    s.add(_request(6, 3))
    s.add(_request(7, 3))
    s.add(_request(8, 3))  # 9 requests, 8 slots: the last one waits
    s.schedule()
    assert [r.tag for r in s.waiting] == [8]


def test_prompts_are_cut_into_chunks_one_per_tick():
    s = _scheduler(microbatches=2, rows=2, chunk=4)
    s.add(_request(0, 10))  # chunks of 4, 4, 2
    s.add(_request(1, 3))  # one chunk
    step = s.schedule()
    assert step.ticks == 4  # as many rounds (M = 2 ticks) as the 4 queued chunks need
    meta = step.plan_meta[0]
    row_of_1 = 1 * 2 + 0  # request 1 sits in micro-batch 1, row 0 (local row index 2)
    assert meta[0].tolist() == [0, 0, 4, 0]  # row 0, start 0, 4 tokens, not last
    assert meta[1].tolist() == [0, 4, 4, 0]
    assert meta[2].tolist() == [0, 8, 2, 1]  # request 0's last chunk
    assert meta[3].tolist() == [row_of_1, 0, 3, 1]
    assert step.plan_tokens[0, 0].tolist() == [10, 11, 12, 13]
    assert step.plan_tokens[0, 2, :2].tolist() == [18, 19]
    assert not any(s.prefill)
    s.update(step, _log(step, 4))
    assert s.schedule().ticks == s.max_ticks  # everything decodes: the longest call


def test_tokens_finish_requests_like_the_device_does():
    s = _scheduler(rows=4, microbatches=1)
    s.add(_request(0, 2, max_tokens=3))
    s.add(_request(1, 2, max_tokens=5, ignore_eos=False))
    s.add(_request(2, 2, max_tokens=5, stop_token_ids=[7], min_tokens=2))
    step = s.schedule()
    columns = {tag: s.layout.locate(s.active[tag].slot)[2] for tag in range(3)}
    entries = []
    for t, (a, b, c) in enumerate([(5, 6, 7), (5, 2, 7), (5, 9, 7)]):
        entries += [(t, 0, columns[0], 0, a), (t, 0, columns[1], 1, b), (t, 0, columns[2], 2, c)]
    done = s.update(step, _log(step, 3, entries))
    # 0: max_tokens 3; 1: EOS at its 2nd token; 2: stop id 7 only once more than min_tokens.
    assert sorted(r.tag for r in done) == [0, 1, 2]
    assert s.occupant == [None] * 4
    got = {r.tag: r.tokens for r in done}
    assert got == {0: [5, 5, 5], 1: [6, 2], 2: [7, 7, 7]}


def test_stop_string_withdraws_and_frees_the_slot_after_the_next_call():
    s = _scheduler(rows=1, microbatches=2, stop_check=lambda r: r.tokens[-1] == 9)
    s.add(_request(0, 2, max_tokens=10, stop=["x"]))
    first = s.schedule()
    slot = s.active[0].slot
    col = 0
    done = s.update(first, _log(first, 1, [(0, 0, col, 0, 9)]))
    assert [r.tag for r in done] == [0] and done[0].stopped_by_string
    # Withdrawn: tagged -1 for the device, but not free until a call that carried it is back.
    assert s.tags[slot] == -1 and s.occupant[slot] is not None and not s.active
    s.add(_request(1, 2))
    second = s.schedule()  # the first call to carry the withdrawal
    assert second.tags[slot] == -1
    assert s.active[1].slot != slot  # request 1 takes the other micro-batch
    s.update(second, _log(second, 1))
    assert s.occupant[slot] is None


def test_a_withdrawal_alone_still_gets_its_call():
    s = _scheduler(rows=1, microbatches=1, stop_check=lambda r: True)
    s.add(_request(0, 2, max_tokens=10, stop=["x"]))
    first = s.schedule()
    s.update(first, _log(first, 1, [(0, 0, 0, 0, 9)]))
    assert not s.active and s.occupant[0] is not None
    carrier = s.schedule()  # nothing active, but the withdrawal must reach the device
    assert carrier is not None and carrier.tags[0] == -1
    s.update(carrier, _log(carrier, 0))
    assert s.occupant[0] is None and s.schedule() is None


def test_abort_drops_queued_and_withdraws_running():
    s = _scheduler(rows=1, microbatches=1)
    s.add(_request(0, 2))
    s.add(_request(1, 2))
    s.schedule()
    s.abort({0, 1})
    assert not s.waiting and not s.active and not s.unfinished
    carrier = s.schedule()  # carries the withdrawal of request 0's slot to the device
    assert carrier.tags[0] == -1 and not carrier.plan_meta[..., 2].any()
    s.update(carrier, _log(carrier, 0))
    assert s.schedule() is None


def test_run_counters():
    s = _scheduler(rows=2, microbatches=1, stages=2)
    s.add(_request(0, 3, max_tokens=2))
    s.add(_request(1, 3, max_tokens=2))
    s.add(_request(2, 3, max_tokens=2))  # waits for a slot
    step = s.schedule()
    log = _log(step, 1, [(0, 0, 0, 0, 5)])
    s.update(step, log)
    stats = s.stats.as_dict()
    assert stats["ticks"] == 1 and stats["tokens"] == 1 and stats["prompt_tokens"] == 3
    assert stats["occupancy"] == pytest.approx(1 / 2)  # 1 token of 2 rows
    assert stats["queued_ticks"] == 1  # request 2 was waiting
    assert stats["schedule"] == [[0, 0]]  # stage s served micro-batch (t - s) mod 1


def test_widths_are_powers_of_two_up_to_the_rows():
    assert _scheduler(rows=6).widths() == [1, 2, 4, 6]
    assert _scheduler(rows=8).widths() == [1, 2, 4, 8]
