"""Whisper's log-mel features, computed only for the frames that touch real audio.

Padding a clip to the model's window (30 s for every released Whisper) happens on the waveform
before the STFT, so every frame past the audio holds one value per clip
(`contract.pad_value_for`). Storing only the frames before that value begins, plus the value
itself, reproduces `WhisperFeatureExtractor` exactly once the trainer pads back to the window's
frames (3000), at a fraction of the bytes and compute (docs/design.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from shard_builder.contract import (
    HOP_LENGTH,
    MAX_FRAMES,
    N_FFT,
    frames_touching_audio,
    pad_value_for,
)


@dataclass(frozen=True)
class LogMel:
    features: np.ndarray  # float16, [n_mels, n_frames]
    pad_value: float


class LogMelExtractor:
    """Computes trimmed Whisper log-mel features with torch.stft on one thread."""

    def __init__(self, mel_filters: np.ndarray, max_frames: int = MAX_FRAMES) -> None:
        # mel_filters as WhisperFeatureExtractor holds them: [n_fft // 2 + 1, n_mels].
        self.mel_filters = torch.from_numpy(np.asarray(mel_filters, dtype=np.float32)).T
        self.window = torch.hann_window(N_FFT)
        if max_frames < 1:
            raise ValueError(f"max_frames must be positive, got {max_frames}")
        self.max_frames = max_frames  # the model's window: 3000 frames = 30 s for real Whispers
        self.max_samples = max_frames * HOP_LENGTH

    @property
    def n_mels(self) -> int:
        return self.mel_filters.shape[0]

    def __call__(self, waveform: np.ndarray) -> LogMel:
        if waveform.ndim != 1 or waveform.size == 0 or waveform.size > self.max_samples:
            raise ValueError(
                f"need a mono clip of 1..{self.max_samples} samples, got {waveform.shape}"
            )
        n_frames = frames_touching_audio(waveform.size, self.max_frames)
        audio = torch.from_numpy(np.ascontiguousarray(waveform, dtype=np.float32))
        if n_frames == self.max_frames:
            # The last frames reach the reflection of the window's end: use the full padding.
            signal = torch.nn.functional.pad(audio, (0, self.max_samples - audio.numel()))
        else:
            # Zeros up to the right edge of the last kept frame; frames beyond are discarded, so
            # the reflection torch adds at this shorter end never reaches a kept frame.
            needed = (n_frames - 1) * HOP_LENGTH + N_FFT // 2
            signal = torch.nn.functional.pad(audio, (0, max(0, needed - audio.numel())))
        stft = torch.stft(
            signal, N_FFT, HOP_LENGTH, window=self.window, center=True, return_complex=True
        )
        # |z|^2 as re^2 + im^2: abs() would take a square root only to square it again.
        kept = stft[:, :n_frames]
        power = kept.real.square() + kept.imag.square()
        log_spec = torch.clamp(self.mel_filters @ power, min=1e-10).log10()
        log10_max = float(log_spec.max())
        log_spec = torch.maximum(log_spec, torch.tensor(log10_max - 8.0))
        log_spec = (log_spec + 4.0) / 4.0
        return LogMel(log_spec.to(torch.float16).numpy(), pad_value_for(log10_max))


def pad_to_full(features: np.ndarray, pad_value: float, max_frames: int = MAX_FRAMES) -> np.ndarray:
    """Pad stored frames back to the window (reference use; the trainer does this on device)."""
    full = np.full((features.shape[0], max_frames), pad_value, dtype=np.float32)
    full[:, : features.shape[1]] = features
    return full
