"""Split a clip longer than the model's window at pauses, with its own part of the transcript.

The method, in two steps that never guess:

1. **Where to cut the audio** comes from the audio alone. Pauses are runs of frames at least
   `SILENCE_DB` below the clip's loudest frame, lasting `min_pause` seconds or more. Among them
   the fewest cuts are chosen that leave every piece inside the window, preferring long pauses
   (`plan_pieces`). A piece keeps at most `PAUSE_KEEP` s of each pause it borders; the rest of
   a long pause is silence and is dropped, never speech.
2. **Where to cut the text** comes from the aligner (a Whisper model, `--align-model`), by its
   teacher-forced likelihood. For a piece whose text starts at word `a`, one decoder pass over
   the remaining words on the piece's audio and one on silence give, for every word boundary
   `b`, the score `sum over the tokens t of words[a:b] of (log P(t | piece) - log P(t | silence))
   + log P(<|endoftext|> | piece, words[a:b])`. A word the piece holds gains (the audio explains
   it better than the language prior alone), a word it does not hold gains nothing, and the end
   token says where the piece's speech ends. (The plain likelihood of `words[a:b]` would favour
   the shortest text: every token costs.) Whisper's BPE tokens never span a space, so the
   words' tokens laid end to end are the text's tokens and every word boundary is a token
   boundary. The last piece takes the remaining words.

Without a trained model (`--align-method sentences`: the demo's random-weight preset, or a
build that must not load one) the text is cut only where a sentence ends, matched to the audio
by speaking rate (`sentence_split`): a cut after a piece whose voiced time (frames above the
silence threshold) is `v` of the clip's `V` seconds is expected `v / V` of the way through the
transcript's letters; the sentence end nearest that point is taken when it lies within
`max_error` seconds of speech of it and the next nearest lies at least `max_error` further.
Otherwise, or when a piece's speaking rate strays beyond `RATE_RANGE` of the clip's, or the
clip's rate is no speech rate at all (`CLIP_RATE`), the row is `too_long_unaligned`. This method
cannot hear words: it trusts that the transcript belongs to the audio (a swapped transcript of
similar length may pass), so it is for corpora whose transcripts are known right, as the demo's
are by construction; the likelihood method checks that too.

A split is kept only when it is confident (`check_confidence`): for every cut the best boundary
beats every other boundary by `min_margin` nats, and every piece's text, its end token included,
has a mean log-probability of at least `min_logprob` per token under the aligner. Otherwise the
row is rejected as `too_long_unaligned`. A transcript that does not belong to its audio fails the
second test; a random-weight model (the demo preset) fails it too, by design (~-10.9 per token,
the log of 1/vocabulary).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shard_builder.contract import HOP_LENGTH, SAMPLING_RATE

SILENCE_DB = 35.0  # a frame this far below the clip's loudest frame counts as silence
SENTENCE_END = re.compile(r"[.!?…][\"'»«“”)\]]*$")  # a word that ends a sentence
RATE_RANGE = (0.6, 1.6)  # a piece's letters per voiced second, as a share of the clip's
CLIP_RATE = (5.0, 30.0)  # letters per voiced second of any speech (German: ~12-16)
FRAME = 400  # 25 ms energy frames, every 10 ms (HOP_LENGTH)
PAUSE_KEEP = int(0.2 * SAMPLING_RATE)  # a piece keeps up to 0.2 s of a pause at its edge
INIT_SEED = 0  # a weightless model folder (the demo preset) is initialised with this seed


@dataclass(frozen=True)
class Pause:
    start: int  # first silent sample
    stop: int  # one past the last silent sample

    @property
    def length(self) -> int:
        return self.stop - self.start

    def edges(self) -> tuple[int, int]:
        """Where the piece before this pause ends and the piece after it starts: on the 10 ms
        grid (so offsets in seconds are exact), inside the pause, at most PAUSE_KEEP from its
        ends; what lies between is silence, dropped."""
        left = self.start + min(PAUSE_KEEP, self.length // 2 // HOP_LENGTH * HOP_LENGTH)
        right = -(-(self.stop - PAUSE_KEEP) // HOP_LENGTH) * HOP_LENGTH
        return left, max(left, right)


@dataclass(frozen=True)
class Piece:
    start: int  # sample offset in the clip
    stop: int
    text: str
    # between the chosen text boundary and the next best (inf: last piece): nats for the
    # likelihood method, seconds of speech for the sentence method
    margin: float
    logprob: float  # mean log-probability per token of the piece's text and end token (nan:
    # the sentence method has no model)


class Unaligned(Exception):
    """The clip cannot be split with confidence; the message says why."""


def silent_frames(waveform: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first sample of each 25 ms frame, hop 10 ms; whether it is SILENCE_DB below the
    loudest frame)."""
    squares = np.concatenate([[0.0], np.cumsum(waveform.astype(np.float64) ** 2)])
    starts = np.arange(0, max(1, waveform.size - FRAME + 1), HOP_LENGTH)
    power = (squares[np.minimum(starts + FRAME, waveform.size)] - squares[starts]) / FRAME
    energy = 10 * np.log10(np.maximum(power, 1e-20))
    return starts, energy < energy.max() - SILENCE_DB


def find_pauses(waveform: np.ndarray, min_pause: float) -> list[Pause]:
    """Runs of silent 25 ms frames (hop 10 ms) lasting at least `min_pause` seconds, inside the
    clip (leading and trailing silence is no place to cut)."""
    starts, silent = silent_frames(waveform)
    pauses, run_start = [], None
    for index, is_silent in enumerate([*silent.tolist(), False]):
        if is_silent and run_start is None:
            run_start = index
        elif not is_silent and run_start is not None:
            # every sample of frames run_start..index-1 is quiet: the union of their windows
            start = int(starts[run_start])
            stop = int(starts[index - 1]) + FRAME
            inside = run_start > 0 and index < len(starts)  # not the lead-in, not the tail
            if inside and stop - start >= min_pause * SAMPLING_RATE:
                pauses.append(Pause(start, stop))
            run_start = None
    return pauses


def plan_pieces(num_samples: int, pauses: list[Pause], max_samples: int) -> list[tuple[int, int]]:
    """The fewest pieces, each at most `max_samples` long, cut at pauses; among those, the plan
    whose shortest cut pause is longest (ties: the earlier pauses). Raises Unaligned if no plan
    exists (speech longer than the window without a pause)."""
    # node 0 is the clip's start, node i + 1 the pause i; best[node] = (pieces, -weakest, path)
    starts = [0] + [pause.edges()[1] for pause in pauses]
    best: list[tuple[int, int, list[int]] | None] = [(0, -(10**12), [])] + [None] * len(pauses)

    def better(candidate, current):
        return current is None or candidate[:2] < current[:2]

    ends = [pause.edges()[0] for pause in pauses] + [num_samples]
    lengths = [pause.length for pause in pauses] + [10**12]
    final = None
    for node_b in range(1, len(pauses) + 2):
        for node_a in range(node_b):
            if best[node_a] is None or ends[node_b - 1] - starts[node_a] > max_samples:
                continue
            pieces, weakest, path = best[node_a]
            candidate = (pieces + 1, max(weakest, -lengths[node_b - 1]), [*path, node_b - 1])
            if node_b == len(pauses) + 1:
                final = candidate if better(candidate, final) else final
            elif better(candidate, best[node_b]):
                best[node_b] = candidate
    if final is None:
        raise Unaligned(
            f"no way of cutting at its {len(pauses)} pauses keeps every piece within the window "
            "(speech without a pause longer than the window?)"
        )
    cuts = final[2][:-1]
    bounds = [0] + [pauses[i].edges()[1] for i in cuts]
    return list(zip(bounds, [pauses[i].edges()[0] for i in cuts] + [num_samples], strict=True))


class Aligner:
    """A Whisper model that scores where a piece's text ends, given the piece's audio."""

    def __init__(self, model_name: str, language: str, task: str) -> None:
        import torch
        from transformers import (
            AutoTokenizer,
            WhisperConfig,
            WhisperFeatureExtractor,
            WhisperForConditionalGeneration,
        )

        from shard_builder.features import LogMelExtractor

        self.torch = torch
        folder = Path(model_name)
        weightless = folder.is_dir() and not any(
            (folder / name).is_file() for name in ("model.safetensors", "pytorch_model.bin")
        )
        if weightless:
            # The demo preset ships no weights: the same seeded initialisation as the trainer's.
            torch.manual_seed(INIT_SEED)
            model = WhisperForConditionalGeneration(WhisperConfig.from_pretrained(folder))
        else:
            model = WhisperForConditionalGeneration.from_pretrained(model_name, dtype=torch.float32)
        self.model = model.eval()
        self.random_weights = weightless
        extractor = WhisperFeatureExtractor.from_pretrained(model_name)
        self.mel = LogMelExtractor(extractor.mel_filters, int(extractor.nb_max_frames))
        # Not WhisperTokenizer: in transformers 4.x that is the slow one, which needs vocab.json
        # (the builder's reason too, build.py).
        tokenizer = AutoTokenizer.from_pretrained(model_name)
        tokenizer.set_prefix_tokens(language=language, task=task, predict_timestamps=False)
        self.tokenizer = tokenizer
        self.prefix = [int(t) for t in tokenizer.prefix_tokens]
        self.eot = int(tokenizer.convert_tokens_to_ids("<|endoftext|>"))
        self.max_positions = int(model.config.max_target_positions)
        self.silence = (
            None  # the encoder's output for silence, the prior that text is scored against
        )

    @property
    def max_samples(self) -> int:
        return self.mel.max_samples

    def word_tokens(self, words: list[str]) -> list[list[int]]:
        """Each word's BPE ids as it appears in the text (a leading space after the first)."""
        return [
            self.tokenizer.encode(w if i == 0 else " " + w, add_special_tokens=False)
            for i, w in enumerate(words)
        ]

    def encode(self, audio: np.ndarray):
        from shard_builder.features import pad_to_full

        mel = self.mel(audio)
        features = pad_to_full(mel.features.astype(np.float32), mel.pad_value, self.mel.max_frames)
        with self.torch.inference_mode():
            return self.model.model.encoder(self.torch.from_numpy(features)[None])

    def token_logprobs(self, encoded, ids: list[int]) -> np.ndarray:
        """[len(ids) + 1, vocab] log-probabilities after the prefix and each of `ids`."""
        torch = self.torch
        with torch.inference_mode():
            logits = self.model(
                encoder_outputs=encoded, decoder_input_ids=torch.tensor([self.prefix + ids])
            ).logits[0]
        return torch.log_softmax(logits[len(self.prefix) - 1 :].double(), dim=-1).numpy()

    def boundary_scores(
        self, audio: np.ndarray, words: list[str], last: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """For b = 1..len(words), how well `words[:b]` is this audio's whole text (see the module
        docstring), and the mean log-probability per token of `words[:b] <|endoftext|>` given
        the audio. Words past the decoder's positions score -inf. For the `last` piece, whose
        text is all the words, only the mean log-probability is computed."""
        ids, word_ends = [], []
        room = self.max_positions - len(self.prefix) - 1
        for tokens in self.word_tokens(words):
            if len(ids) + len(tokens) > room:
                break
            ids += tokens
            word_ends.append(len(ids))
        heard = self.token_logprobs(self.encode(audio), ids)
        positions = np.arange(len(ids))
        token_lp = heard[positions, ids]
        if last:
            gain = np.zeros(len(ids))
        else:
            if self.silence is None:
                self.silence = self.encode(np.zeros(HOP_LENGTH, dtype=np.float32))
            gain = np.cumsum(token_lp - self.token_logprobs(self.silence, ids)[positions, ids])
        total = np.cumsum(token_lp)
        scores = np.full(len(words), -np.inf)
        mean_logprob = np.full(len(words), -np.inf)
        for b, end in enumerate(word_ends):
            scores[b] = gain[end - 1] + heard[end, self.eot]
            mean_logprob[b] = (total[end - 1] + heard[end, self.eot]) / (end + 1)
        return scores, mean_logprob


def split_clip(
    waveform: np.ndarray,
    text: str,
    aligner: Aligner,
    max_samples: int,
    min_pause: float,
    min_margin: float,
    min_logprob: float,
) -> list[Piece]:
    """Cut a long clip into confident pieces, or raise Unaligned saying why not."""
    words = text.split()
    bounds = plan_pieces(waveform.size, find_pauses(waveform, min_pause), max_samples)
    if len(bounds) > len(words):
        raise Unaligned(f"{len(bounds)} pieces planned for {len(words)} words")
    pieces, first = [], 0
    for number, (start, stop) in enumerate(bounds):
        later = len(bounds) - number - 1  # every later piece needs at least one word
        scores, mean_logprob = aligner.boundary_scores(
            waveform[start:stop], words[first:], last=later == 0
        )
        if later == 0:
            end, margin = len(words) - first, float("inf")
        else:
            allowed = scores[: len(scores) - later]
            end = int(np.argmax(allowed)) + 1
            others = np.delete(allowed, end - 1)
            margin = float(allowed[end - 1] - others.max()) if others.size else float("inf")
        logprob = float(mean_logprob[end - 1])
        piece = Piece(start, stop, " ".join(words[first : first + end]), margin, logprob)
        check_confidence(piece, number, min_margin, min_logprob)
        pieces.append(piece)
        first += end
    return pieces


def sentence_split(
    waveform: np.ndarray, text: str, max_samples: int, min_pause: float, max_error: float
) -> list[Piece]:
    """Cut a long clip at pauses and its text at sentence ends, matched by speaking rate (see the
    module docstring); or raise Unaligned saying why not."""
    words = text.split()
    bounds = plan_pieces(waveform.size, find_pauses(waveform, min_pause), max_samples)
    starts, silent = silent_frames(waveform)
    voiced = np.array([np.sum(~silent[(starts >= a) & (starts < b)]) for a, b in bounds]) / 100
    letters = np.cumsum([0] + [len(word) for word in words])  # letters before word i
    ends = [i + 1 for i, word in enumerate(words[:-1]) if SENTENCE_END.search(word)]
    rate = letters[-1] / max(voiced.sum(), 1e-9)  # letters per voiced second
    if not CLIP_RATE[0] <= rate <= CLIP_RATE[1]:
        raise Unaligned(
            f"{rate:.1f} letters per voiced second is no speech rate (expected "
            f"{CLIP_RATE[0]:g}-{CLIP_RATE[1]:g}): does the transcript match the audio?"
        )
    cuts, margins = [], []
    for number, heard in enumerate(np.cumsum(voiced)[:-1]):
        errors = sorted((abs(letters[end] - heard * rate) / rate, end) for end in ends)
        if not errors:
            raise Unaligned(f"{len(bounds)} pieces planned but no sentence end to cut the text at")
        (best, end), second = errors[0], errors[1][0] if len(errors) > 1 else float("inf")
        where = f"cut {number} ({bounds[number][1] / SAMPLING_RATE:.2f} s)"
        if best > max_error or second - best < max_error:
            raise Unaligned(
                f"{where}: the nearest sentence end is {best:.2f} s of speech from where the "
                f"speaking rate puts it, the next {second:.2f} s (need <= {max_error:g} and "
                f"{max_error:g} more)"
            )
        if cuts and end <= cuts[-1]:
            raise Unaligned(f"{where}: no sentence left for the piece before it")
        cuts.append(end)
        margins.append(second - best)
    firsts, lasts = [0, *cuts], [*cuts, len(words)]
    pieces = []
    for number, ((start, stop), first, last) in enumerate(zip(bounds, firsts, lasts, strict=True)):
        share = (letters[last] - letters[first]) / max(voiced[number], 1e-9) / rate
        if not RATE_RANGE[0] <= share <= RATE_RANGE[1]:
            raise Unaligned(
                f"piece {number} ({start / SAMPLING_RATE:.2f}-{stop / SAMPLING_RATE:.2f} s) would "
                f"be spoken at {share:.2f} times the clip's rate"
            )
        margin = margins[number] if number < len(margins) else float("inf")
        pieces.append(Piece(start, stop, " ".join(words[first:last]), margin, float("nan")))
    return pieces


def check_confidence(piece: Piece, number: int, min_margin: float, min_logprob: float) -> None:
    where = f"piece {number} ({piece.start / SAMPLING_RATE:.2f}-{piece.stop / SAMPLING_RATE:.2f} s)"
    if not piece.logprob >= min_logprob:
        raise Unaligned(
            f"{where}: its text scores {piece.logprob:.2f} nats per token under the aligner, "
            f"below {min_logprob:g} (does the transcript match the audio?)"
        )
    if not piece.margin >= min_margin:
        raise Unaligned(
            f"{where}: the best text boundary beats the next by {piece.margin:.2f} nats, "
            f"below {min_margin:g}"
        )


def describe(pieces: list[Piece]) -> list[dict[str, Any]]:
    """For reports and the benchmark: each piece's span in seconds and its confidence."""
    return [
        {
            "start": p.start / SAMPLING_RATE,
            "stop": p.stop / SAMPLING_RATE,
            "text": p.text,
            "margin": p.margin,
            "logprob": p.logprob,
        }
        for p in pieces
    ]
