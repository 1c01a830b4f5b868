"""Long-form pieces: Whisper's timestamp tokens as segments, clips joined with known offsets, and
how far predicted segment starts lie from the true ones.

Shared by the packed evaluation (`trainer.evaluate`), the export's faster-whisper self-check
(`trainer.export`) and benchmarks that compare long-form decoding of several models.

Timestamps. Whisper's timestamp tokens follow `<|notimestamps|>`: `<|0.00|>` is its id + 1, one
step per 0.02 s. Hugging Face's tokenizers do not list them among their special tokens
(`decode_with_timestamps` of the whisper-base tokenizer misreads them), so times are computed
from the ids here.

Matching starts. True utterance starts and predicted segment starts are paired one to one and in
order (an order-preserving alignment): as many pairs as the shorter list allows, and among those
pairings the one with the smallest summed |error|. A predicted segment left over (the model split
an utterance) costs nothing; a true start left over (the model merged or dropped utterances) is a
miss. The median error is over the paired starts; the share within 0.5 s is over all true starts,
so a miss counts as not within.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

TIME_STEP = 0.02  # seconds per timestamp token
WITHIN_SECONDS = 0.5
SAMPLING_RATE = 16000


@dataclass(frozen=True)
class Segment:
    """A decoded segment: start and end in seconds (None where no timestamp said so) and its
    text token ids (no special or timestamp tokens)."""

    start: float | None
    end: float | None
    tokens: tuple[int, ...]


def timestamp_begin(no_timestamps_id: int) -> int:
    """Id of `<|0.00|>`: the one after `<|notimestamps|>` in every Whisper vocabulary."""
    return int(no_timestamps_id) + 1


def segments_from_ids(ids: Iterable[int], no_timestamps_id: int, eot_id: int) -> list[Segment]:
    """Segments of a decoded sequence `[prefix] <|t|> text <|t|><|t|> text <|t|> <|endoftext|>`.

    Special tokens (ids from `<|endoftext|>` up to the first timestamp) are skipped, decoding
    stops at the first `<|endoftext|>`. A timestamp opens a segment, the next one after some
    text closes it; two timestamps in a row with no text between keep the later as the start.
    Text before any timestamp (a model that predicts none) gives a segment with start None; text
    after the last timestamp a segment with end None.
    """
    begin = timestamp_begin(no_timestamps_id)
    segments: list[Segment] = []
    start: float | None = None
    text: list[int] = []
    for token in ids:
        token = int(token)
        if token == eot_id:
            break
        if token >= begin:
            time = round((token - begin) * TIME_STEP, 2)
            if text:
                segments.append(Segment(start, time, tuple(text)))
                start, text = None, []
            else:
                start = time
        elif token < eot_id:
            text.append(token)
    if text:
        segments.append(Segment(start, None, tuple(text)))
    return segments


def join_clips(
    clips: Sequence[np.ndarray], gap_seconds: float, sampling_rate: int = SAMPLING_RATE
) -> tuple[np.ndarray, list[float]]:
    """One long float32 clip: `clips` in order, `gap_seconds` of silence between them; and each
    clip's start in seconds (the true segment starts of the long clip)."""
    gap = np.zeros(round(gap_seconds * sampling_rate), dtype=np.float32)
    pieces, offsets, position = [], [], 0
    for i, clip in enumerate(clips):
        if i:
            pieces.append(gap)
            position += len(gap)
        offsets.append(position / sampling_rate)
        pieces.append(np.asarray(clip, dtype=np.float32))
        position += len(clip)
    audio = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
    return audio, offsets


def match_starts(true_starts: Sequence[float], predicted: Sequence[float]) -> list[float | None]:
    """Per true start, |error| to the predicted start paired with it, None for a miss.

    Order-preserving one-to-one pairing (module doc): fewest misses first, then the smallest
    summed error. Both lists are sorted first. Dynamic programming, O(len(true) * len(predicted)).
    """
    truth, guess = sorted(float(t) for t in true_starts), sorted(float(p) for p in predicted)
    n, m = len(truth), len(guess)
    # best[i][j]: (misses, summed error) aligning truth[:i] with guess[:j]
    best = [[(0, 0.0)] * (m + 1) for _ in range(n + 1)]
    move = [[""] * (m + 1) for _ in range(n + 1)]
    for i in range(n + 1):
        for j in range(m + 1):
            if i == 0 and j == 0:
                continue
            options = []
            if i and j:
                misses, error = best[i - 1][j - 1]
                options.append(((misses, error + abs(truth[i - 1] - guess[j - 1])), "pair"))
            if i:
                misses, error = best[i - 1][j]
                options.append(((misses + 1, error), "miss"))
            if j:
                options.append((best[i][j - 1], "extra"))
            best[i][j], move[i][j] = min(options, key=lambda option: option[0])
    errors: list[float | None] = [None] * n
    i, j = n, m
    while i or j:
        step = move[i][j]
        if step == "pair":
            errors[i - 1] = abs(truth[i - 1] - guess[j - 1])
            i, j = i - 1, j - 1
        elif step == "miss":
            i -= 1
        else:
            j -= 1
    return errors


def start_error_summary(errors: Iterable[float | None]) -> dict[str, float | int]:
    """Median |error| of the paired starts (NaN if none), the share of all true starts within
    0.5 s (a miss is not), the share missed, and how many true starts there were."""
    errors = list(errors)
    paired = [e for e in errors if e is not None]
    total = len(errors)
    return {
        "segment_start_error_median_s": statistics.median(paired) if paired else math.nan,
        "segment_start_within_0_5s": (
            sum(e <= WITHIN_SECONDS + 1e-9 for e in paired) / total if total else math.nan
        ),
        "segment_start_missed": (total - len(paired)) / total if total else math.nan,
        "segment_starts": total,
    }
