"""Decode audio bytes to a 16 kHz mono float32 waveform, or say precisely why not.

The bytes are decoded here rather than by `datasets` (torchcodec/FFmpeg) so that one corrupt row
becomes a counted reject instead of a crash that ends a multi-hour build.
"""

from __future__ import annotations

import io
import re

import numpy as np
import soundfile
import soxr

from shard_builder.contract import SAMPLING_RATE


class RejectedRow(Exception):
    """An input row that cannot become a sample; `reason` is a short code counted in the summary."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def decode_audio(data: bytes | None) -> np.ndarray:
    """Bytes of WAV, FLAC, OGG or MP3 to a mono float32 waveform at 16 kHz."""
    if not data:
        raise RejectedRow("missing_audio", "the row has no audio bytes")
    try:
        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as error:  # soundfile raises several types for undecodable input
        # Drop object addresses from the message so rejects.jsonl is reproducible.
        message = re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "the audio bytes", str(error))
        raise RejectedRow("decode_error", f"{type(error).__name__}: {message}") from None
    waveform = samples.mean(axis=1, dtype=np.float32) if samples.shape[1] > 1 else samples[:, 0]
    if waveform.size == 0:
        raise RejectedRow("empty_audio", "the audio holds no samples")
    if not np.isfinite(waveform).all():
        raise RejectedRow("non_finite", "the audio holds NaN or infinite samples")
    if rate != SAMPLING_RATE:
        waveform = soxr.resample(waveform, rate, SAMPLING_RATE, quality="HQ").astype(np.float32)
    return np.ascontiguousarray(waveform)
