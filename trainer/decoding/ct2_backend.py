"""Greedy or beam decoding of padded log-mel features with a CTranslate2 Whisper export.

`trainer.evaluate` feeds this the same padded shard features that the Hugging Face path sees, so
the two can be compared token for token; `trainer.export` uses it to verify a fresh export.
ctranslate2 and tokenizers are imported lazily: they come with the optional [export] extra.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from shard_builder.contract import MAX_FRAMES

# Whisper's decoder has 448 learned positions in every released size; a CTranslate2 export keeps
# no copy of that number, and asking for more fails deep inside the decoder.
DECODER_POSITIONS = 448
EOT = "<|endoftext|>"


class CT2Transcriber:
    """A CTranslate2 Whisper folder (model.bin, vocabulary.json, tokenizer.json) for decoding."""

    def __init__(self, folder: str | Path, device: str = "cpu", compute_type: str = "default"):
        import ctranslate2
        from tokenizers import Tokenizer

        self.folder = Path(folder)
        tokenizer_file = self.folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(
                f"{tokenizer_file} is missing: export with `python -m trainer.export`, which "
                "copies it (faster-whisper would otherwise fetch a stock tokenizer from the hub)"
            )
        self.model = ctranslate2.models.Whisper(
            str(self.folder), device=device, compute_type=compute_type
        )
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.eot_id = self.tokenizer.token_to_id(EOT)
        self.n_mels = int(self.model.n_mels)
        self.window_frames = export_window_frames(self.folder)
        self._length_is_halved: bool | None = None

    def prefix_tokens(self, language: str = "de", task: str = "transcribe") -> list[int]:
        """`<|startoftranscript|><|language|><|task|><|notimestamps|>` as ids of this tokenizer."""
        names = ["<|startoftranscript|>", f"<|{language}|>", f"<|{task}|>", "<|notimestamps|>"]
        ids = [self.tokenizer.token_to_id(name) for name in names]
        missing = [name for name, token_id in zip(names, ids, strict=True) if token_id is None]
        if missing:
            raise ValueError(f"{self.folder}/tokenizer.json has no token {missing}")
        return ids

    def generate_tokens(
        self,
        features: np.ndarray,
        prefix_tokens: list[int],
        max_length: int = DECODER_POSITIONS,
        beam_size: int = 1,
    ) -> list[list[int]]:
        """Token ids per utterance, without the prefix and without `<|endoftext|>`.

        features: float32 `[batch, n_mels, window_frames]` (3000 for released Whispers), padded
            exactly like WhisperFeatureExtractor.
        max_length: most tokens generated after the prefix (end token included), like Hugging
        Face's `max_new_tokens`; clamped to what the decoder's 448 positions leave.
        """
        import ctranslate2

        features = self._checked_features(features)
        new_tokens = min(max_length, DECODER_POSITIONS - len(prefix_tokens))
        if new_tokens < 1:
            raise ValueError(f"max_length={max_length} leaves no room after the prefix")
        results = self.model.generate(
            ctranslate2.StorageView.from_array(features),
            [list(prefix_tokens)] * features.shape[0],
            beam_size=beam_size,
            max_length=self._ct2_max_length(new_tokens, list(prefix_tokens)),
            return_scores=False,
        )
        return [self._text_ids(result.sequences_ids[0], new_tokens) for result in results]

    def decode(self, ids: list[int]) -> str:
        """Text of token ids; special and timestamp tokens (not in tokenizer.json) are dropped."""
        known = [i for i in ids if self.tokenizer.id_to_token(i) is not None]
        return self.tokenizer.decode(known, skip_special_tokens=True).strip()

    def _checked_features(self, features: Any) -> np.ndarray:
        features = np.ascontiguousarray(features, dtype=np.float32)
        expected = (self.n_mels, self.window_frames)
        if features.ndim != 3 or features.shape[1:] != expected:
            raise ValueError(
                f"features must be [batch, {self.n_mels}, {self.window_frames}] for this model, "
                f"got {list(features.shape)} (are the export's mel bins and window the model's?)"
            )
        return features

    def _text_ids(self, ids: list[int], new_tokens: int) -> list[int]:
        ids = [int(i) for i in ids]
        if self.eot_id in ids:
            ids = ids[: ids.index(self.eot_id)]
        # The end token counts as a generated token, as in Hugging Face generate.
        return ids[:new_tokens]

    def _ct2_max_length(self, new_tokens: int, prefix: list[int]) -> int:
        """CTranslate2's `max_length` that allows exactly `new_tokens` decoding steps.

        Measured with ctranslate2 4.8.5: Whisper.generate stops after
        `min(max_length - prefix_length + 1, max_length // 2)` steps, so 448 gives at most 224
        tokens, not 445. Which rule holds is probed once, so a CTranslate2 that counts the
        documented way is never asked for more than 448 positions.
        """
        if self._length_is_halved is None:
            self._length_is_halved = self._probe_halved_length(prefix)
        plain = new_tokens + len(prefix) - 1
        return max(plain, 2 * new_tokens) if self._length_is_halved else plain

    def _probe_halved_length(self, prefix: list[int]) -> bool:
        import ctranslate2

        # Suppressing the end token makes the decoder run until max_length stops it.
        max_length = len(prefix) + 15
        silence = np.zeros((1, self.n_mels, self.window_frames), dtype=np.float32)
        result = self.model.generate(
            ctranslate2.StorageView.from_array(silence),
            [prefix],
            beam_size=1,
            max_length=max_length,
            suppress_tokens=[-1, self.eot_id],
        )
        return len(result[0].sequences_ids[0]) < max_length - len(prefix) + 1


def export_window_frames(folder: Path) -> int:
    """The encoder window of an export, from the preprocessor_config.json trainer.export writes.

    A CTranslate2 model does not expose its encoder length; faster-whisper reads the same file.
    """
    import json

    config_file = folder / "preprocessor_config.json"
    if not config_file.is_file():
        return MAX_FRAMES  # the window of every released Whisper
    extractor = json.loads(config_file.read_text(encoding="utf-8"))
    return int(extractor.get("nb_max_frames", MAX_FRAMES))
