"""Decoder targets: `<|startoftranscript|><|lang|><|task|><|notimestamps|> text <|endoftext|>`."""

from __future__ import annotations

import functools

import numpy as np

from shard_builder.audio import RejectedRow
from shard_builder.contract import MAX_TARGET_POSITIONS, tokenizer_fingerprint


class TargetEncoder:
    """Turns transcripts into full target id sequences, every id from the model's tokenizer."""

    def __init__(self, tokenizer, language: str, task: str) -> None:
        tokenizer.set_prefix_tokens(language=language, task=task, predict_timestamps=False)
        self.tokenizer = tokenizer
        self.prefix_tokens = [int(t) for t in tokenizer.prefix_tokens]
        self.eot_id = int(tokenizer.convert_tokens_to_ids("<|endoftext|>"))

    def __call__(self, text: str | None) -> np.ndarray:
        if text is None or not text.strip():
            raise RejectedRow("empty_text", "the transcript is empty")
        ids = self.tokenizer(text.strip()).input_ids
        if ids[: len(self.prefix_tokens)] != self.prefix_tokens or ids[-1] != self.eot_id:
            raise ValueError(f"tokenizer gave {ids[:6]}..., not the Whisper prefix and end token")
        if len(ids) > MAX_TARGET_POSITIONS:
            raise RejectedRow(
                "too_many_tokens",
                f"{len(ids)} target tokens, the decoder takes at most {MAX_TARGET_POSITIONS}",
            )
        return np.asarray(ids, dtype=np.int32)

    @functools.cached_property
    def _identity(self) -> dict:
        # Hashing a 50k-entry vocabulary takes a noticeable fraction of a second: do it once.
        return {
            "name_or_path": self.tokenizer.name_or_path,
            "fingerprint": tokenizer_fingerprint(self.tokenizer.get_vocab()),
            "vocab_size": len(self.tokenizer),
            "eot_id": self.eot_id,
        }

    def identity(self) -> dict:
        return dict(self._identity)
