"""trainer.decoding.longform on hand-made cases: timestamp tokens to segments, joined clips,
start errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from trainer.decoding.longform import (
    join_clips,
    match_starts,
    segments_from_ids,
    start_error_summary,
    timestamp_begin,
)

NO_TS, EOT, SOT, DE, TRANSCRIBE = 50363, 50257, 50258, 50261, 50359
T0 = timestamp_begin(NO_TS)  # <|0.00|>


def ts(seconds: float) -> int:
    return T0 + round(seconds / 0.02)


def test_segments_from_whisper_timestamp_tokens():
    ids = [SOT, DE, TRANSCRIBE, ts(0.0), 11, 12, ts(2.4), ts(2.8), 13, ts(5.12), EOT, EOT, 99]
    segments = segments_from_ids(ids, NO_TS, EOT)
    assert [(s.start, s.end, s.tokens) for s in segments] == [
        (0.0, 2.4, (11, 12)),
        (2.8, 5.12, (13,)),
    ]
    # a single timestamp between segments (no empty pair) and an unfinished last segment
    ids = [ts(1.0), 11, ts(3.0), 12, 13]
    assert [(s.start, s.end, s.tokens) for s in segments_from_ids(ids, NO_TS, EOT)] == [
        (1.0, 3.0, (11,)),
        (None, None, (12, 13)),
    ]
    # no timestamps at all: one segment without a start
    assert segments_from_ids([SOT, DE, TRANSCRIBE, NO_TS, 11, EOT], NO_TS, EOT)[0].start is None
    assert segments_from_ids([SOT, DE, TRANSCRIBE, EOT], NO_TS, EOT) == []


def test_join_clips_places_each_clip_at_its_offset():
    clips = [np.ones(16000, np.float32), 2 * np.ones(8000, np.float32), 3 * np.ones(100)]
    audio, offsets = join_clips(clips, gap_seconds=0.5)
    assert offsets == [0.0, 1.5, 2.5]
    assert len(audio) == 16000 + 8000 + 8000 + 8000 + 100 and audio.dtype == np.float32
    for clip, offset in zip(clips, offsets, strict=True):
        start = round(offset * 16000)
        assert np.array_equal(audio[start : start + len(clip)], clip)
    assert not audio[16000:24000].any()  # the silence


def test_match_starts_exact_shifted_split_and_merged():
    truth = [0.5, 4.0, 8.0]
    assert match_starts(truth, [0.5, 4.0, 8.0]) == [0.0, 0.0, 0.0]
    assert match_starts(truth, [0.0, 4.2, 8.0]) == pytest.approx([0.5, 0.2, 0.0])
    # the model split the 2nd utterance: the extra start costs nothing
    assert match_starts(truth, [0.5, 4.0, 6.0, 8.1]) == pytest.approx([0.0, 0.0, 0.1])
    # it merged utterances 2 and 3 into one segment: the 3rd is a miss, not paired far away
    assert match_starts(truth, [0.4, 4.1]) == pytest.approx([0.1, 0.1, None])
    # one to one and in order: two true starts never share a predicted one
    errors = match_starts([1.0, 1.2], [1.1])
    assert errors.count(None) == 1 and [e for e in errors if e] == pytest.approx([0.1])
    assert match_starts(truth, []) == [None, None, None]
    assert match_starts([], [1.0]) == []
    # unsorted input is sorted first
    assert match_starts([8.0, 0.5], [0.6, 7.0]) == pytest.approx([0.1, 1.0])


def test_start_error_summary_counts_a_miss_as_not_within():
    summary = start_error_summary([0.0, 0.2, 0.5, 1.5, None])
    assert summary["segment_start_error_median_s"] == pytest.approx(0.35)  # of the 4 paired
    assert summary["segment_start_within_0_5s"] == pytest.approx(3 / 5)
    assert summary["segment_start_missed"] == pytest.approx(1 / 5)
    assert summary["segment_starts"] == 5
    empty = start_error_summary([None])
    assert math.isnan(empty["segment_start_error_median_s"])
    assert empty["segment_start_within_0_5s"] == 0.0 and empty["segment_start_missed"] == 1.0
