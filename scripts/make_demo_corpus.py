"""Regenerate the bundled German demo corpus from demo/sentences_de.txt with espeak-ng.

The output has exactly the schema of the hub dataset `flozi00/asr-german-mixed`: parquet files
`data/train-00000-of-00001.parquet` and `data/test-00000-of-00001.parquet` with columns
`audio` (struct {bytes, path}, as `datasets.Audio` stores it), `transkription` and `source`.
demo/README.md explains the split design and lists the deliberately bad rows at the end of
each split.

Usage: python scripts/make_demo_corpus.py [--out demo/corpus] [--seed 1234]
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf
import soxr
from tqdm import tqdm

TARGET_RATE = 16_000
ESPEAK_RATE = 22_050  # espeak-ng's native output rate; some clips keep it on purpose

# One source name per voice family, so per-source WER breakdowns have something to show.
VOICE_FAMILIES: dict[str, list[str]] = {
    "espeak-demo-male": ["de", "de+m1", "de+m2", "de+m3", "de+m4", "de+m5", "de+m6", "de+m7"],
    "espeak-demo-female": ["de+f1", "de+f2", "de+f3", "de+f4", "de+f5"],
    "espeak-demo-klatt": ["de+klatt", "de+klatt2", "de+klatt3"],
}
# Voices heard only in the test split (a harder slice of the held-out combinations).
TEST_ONLY_VOICES = ("de+m4", "de+f4")
# Train and test speeds (words per minute) are disjoint, so every test (voice, speed)
# combination is absent from train while staying inside the range the model has heard.
TRAIN_SPEEDS = (130, 150, 170, 190)
TEST_SPEEDS = (140, 160, 180)
PITCH_RANGE = (35, 65)

TRAIN_RENDERINGS_PER_SENTENCE = 2
N_TEST_SEEN = 50
N_TEST_UNSEEN = 10

# Share of good clips per encoding variant, per split.
SHARE_NATIVE_RATE = 0.15
SHARE_WAV = 0.04
SHARE_FLAC = 0.12
SHARE_STEREO = 0.05
VORBIS_COMPRESSION = 0.7  # soundfile's 0..1 scale; espeak speech stays clean at this level

LONG_CLIP_MIN_SECONDS = 32.0
# Long rows appended to train after the bad rows, kept (split at pauses) by the shard builder:
# utterances of one voice joined by short silences, the joints recorded in LONG_ROWS_NAME.
N_LONG_ROWS = 4
LONG_ROW_SECONDS = (31.0, 55.0)
JOINT_SILENCE_SECONDS = (0.4, 1.0)
LONG_ROWS_SEED_OFFSET = 1  # their own generator: the rows before them stay byte for byte
LONG_ROWS_NAME = "long_rows.json"
SPEECH_LEVEL = 1e-3  # |sample| above this is speech when the true joints are measured
HF_FEATURES = {
    "audio": {"sampling_rate": TARGET_RATE, "_type": "Audio"},
    "transkription": {"dtype": "string", "_type": "Value"},
    "source": {"dtype": "string", "_type": "Value"},
}
SCHEMA = pa.schema(
    [
        pa.field("audio", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        pa.field("transkription", pa.string()),
        pa.field("source", pa.string()),
    ],
    metadata={"huggingface": json.dumps({"info": {"features": HF_FEATURES}})},
)


@dataclass(frozen=True)
class Utterance:
    text: str
    voice: str
    speed: int
    pitch: int

    @property
    def source(self) -> str:
        return source_of(self.voice)


@dataclass(frozen=True)
class Encoding:
    container: str  # "ogg", "flac" or "wav"
    native_rate: bool
    stereo: bool


@dataclass
class Row:
    audio: bytes
    path: str
    text: str
    source: str
    seconds: float
    bad: str = ""  # why the row must be rejected; empty for good rows


def source_of(voice: str) -> str:
    for source, voices in VOICE_FAMILIES.items():
        if voice in voices:
            return source
    raise ValueError(f"voice {voice!r} belongs to no family in VOICE_FAMILIES")


def read_sentences(path: Path) -> list[str]:
    sentences = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    sentences = [s for s in sentences if s and not s.startswith("#")]
    if len(set(sentences)) != len(sentences):
        raise ValueError(f"{path} holds duplicate sentences")
    return sentences


def plan_utterances(
    sentences: list[str], rng: np.random.Generator
) -> tuple[list[Utterance], list[Utterance]]:
    """Choose who says what: train and test share sentences but never a (voice, speed) pair."""
    all_voices = [v for voices in VOICE_FAMILIES.values() for v in voices]
    train_voices = [v for v in all_voices if v not in TEST_ONLY_VOICES]

    order = rng.permutation(len(sentences))
    unseen = [sentences[i] for i in order[:N_TEST_UNSEEN]]
    seen = [sentences[i] for i in order[N_TEST_UNSEEN:]]

    train = []
    for text in seen:
        voices = rng.choice(train_voices, size=TRAIN_RENDERINGS_PER_SENTENCE, replace=False)
        for voice in voices:
            train.append(
                Utterance(
                    text, str(voice), int(rng.choice(TRAIN_SPEEDS)), int(rng.integers(*PITCH_RANGE))
                )
            )
    test_texts = [seen[i] for i in rng.choice(len(seen), size=N_TEST_SEEN, replace=False)]
    test = [
        Utterance(
            text,
            str(rng.choice(all_voices)),
            int(rng.choice(TEST_SPEEDS)),
            int(rng.integers(*PITCH_RANGE)),
        )
        for text in test_texts + unseen
    ]
    return [train[i] for i in rng.permutation(len(train))], [
        test[i] for i in rng.permutation(len(test))
    ]


def plan_encodings(n: int, rng: np.random.Generator) -> list[Encoding]:
    """Exact counts per variant (at least one each), placed at random rows."""

    def pick(share: float) -> set[int]:
        return set(rng.permutation(n)[: max(1, round(share * n))].tolist())

    native, stereo = pick(SHARE_NATIVE_RATE), pick(SHARE_STEREO)
    containers = rng.permutation(n)
    n_wav, n_flac = max(1, round(SHARE_WAV * n)), max(1, round(SHARE_FLAC * n))
    wav = set(containers[:n_wav].tolist())
    flac = set(containers[n_wav : n_wav + n_flac].tolist())
    return [
        Encoding("wav" if i in wav else "flac" if i in flac else "ogg", i in native, i in stereo)
        for i in range(n)
    ]


def synthesize(utt: Utterance) -> np.ndarray:
    """espeak-ng's float32 mono waveform at its native 22050 Hz."""
    cmd = ["espeak-ng", "-v", utt.voice, "-s", str(utt.speed), "-p", str(utt.pitch), "--stdout"]
    result = subprocess.run(cmd + [utt.text], capture_output=True, check=True)
    audio, rate = sf.read(io.BytesIO(result.stdout), dtype="float32")
    if rate != ESPEAK_RATE or audio.ndim != 1 or len(audio) == 0:
        raise RuntimeError(
            f"unexpected espeak-ng output ({rate} Hz, shape {audio.shape}) for {utt}"
        )
    return audio


def _ogg_crc_table() -> list[int]:
    table = []
    for i in range(256):
        r = i << 24
        for _ in range(8):
            r = ((r << 1) ^ 0x04C11DB7) if r & 0x80000000 else (r << 1)
        table.append(r & 0xFFFFFFFF)
    return table


_OGG_CRC = _ogg_crc_table()


def fix_ogg_serial(data: bytes, serial: int = 0x5EED) -> bytes:
    """Give every Ogg page the same stream serial and a recomputed CRC.

    libsndfile picks a random serial for each Ogg stream, which would make the corpus differ
    byte for byte on every run; the audio is untouched.
    """
    out = bytearray(data)
    pos = 0
    while pos < len(out):
        if out[pos : pos + 4] != b"OggS":
            raise ValueError(f"no Ogg page at byte {pos}")
        n_segments = out[pos + 26]
        size = 27 + n_segments + sum(out[pos + 27 : pos + 27 + n_segments])
        out[pos + 14 : pos + 18] = serial.to_bytes(4, "little")
        out[pos + 22 : pos + 26] = b"\0\0\0\0"
        crc = 0
        for byte in out[pos : pos + size]:
            crc = ((crc << 8) & 0xFFFFFFFF) ^ _OGG_CRC[(crc >> 24) ^ byte]
        out[pos + 22 : pos + 26] = crc.to_bytes(4, "little")
        pos += size
    return bytes(out)


def encode(audio: np.ndarray, enc: Encoding) -> bytes:
    rate = ESPEAK_RATE if enc.native_rate else TARGET_RATE
    if rate != ESPEAK_RATE:
        audio = soxr.resample(audio, ESPEAK_RATE, rate, quality="HQ").astype(np.float32)
    if enc.stereo:
        audio = np.stack([audio, audio], axis=1)
    buf = io.BytesIO()
    if enc.container == "ogg":
        sf.write(
            buf, audio, rate, format="OGG", subtype="VORBIS", compression_level=VORBIS_COMPRESSION
        )
        return fix_ogg_serial(buf.getvalue())
    if enc.container == "flac":
        sf.write(buf, audio, rate, format="FLAC", subtype="PCM_16")
    else:
        sf.write(buf, audio, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def good_rows(split: str, utterances: list[Utterance], rng: np.random.Generator) -> list[Row]:
    rows = []
    encodings = plan_encodings(len(utterances), rng)
    for i, (utt, enc) in enumerate(
        tqdm(list(zip(utterances, encodings, strict=True)), desc=f"speaking {split}", unit="clip")
    ):
        audio = synthesize(utt)
        path = f"demo_{split}_{i:05d}.{enc.container}"
        rows.append(Row(encode(audio, enc), path, utt.text, utt.source, len(audio) / ESPEAK_RATE))
    return rows


def bad_rows(
    split: str, first_index: int, sentences: list[str], rng: np.random.Generator
) -> list[Row]:
    """Rows the shard builder must reject (and count), appended at the end of a split."""
    voice = "de+m3"
    name = f"demo_{split}_{{:05d}}.{{}}".format
    corrupt = rng.bytes(4096)
    rows = [
        Row(
            corrupt,
            name(first_index, "ogg"),
            sentences[0],
            source_of(voice),
            0.0,
            "corrupt audio bytes",
        ),
    ]
    empty_audio = synthesize(Utterance(sentences[1], voice, 160, 50))
    rows.append(
        Row(
            encode(empty_audio, Encoding("ogg", False, False)),
            name(first_index + 1, "ogg"),
            "",
            source_of(voice),
            len(empty_audio) / ESPEAK_RATE,
            "empty transcript",
        )
    )
    if split != "train":
        return rows

    # Longer than Whisper's 30 s window: sentences with short pauses until >= 32 s.
    pause = np.zeros(int(0.3 * ESPEAK_RATE), dtype=np.float32)
    pieces, texts, seconds, k = [], [], 0.0, 2
    while seconds < LONG_CLIP_MIN_SECONDS:
        piece = synthesize(Utterance(sentences[k % len(sentences)], voice, 150, 50))
        pieces += [piece, pause]
        texts.append(sentences[k % len(sentences)])
        seconds += (len(piece) + len(pause)) / ESPEAK_RATE
        k += 1
    long_audio = np.concatenate(pieces[:-1])
    rows.append(
        Row(
            encode(long_audio, Encoding("ogg", False, False)),
            name(first_index + 2, "ogg"),
            " ".join(texts),
            source_of(voice),
            len(long_audio) / ESPEAK_RATE,
            "longer than 30 s",
        )
    )
    buf = io.BytesIO()
    sf.write(buf, np.zeros(0, dtype=np.float32), TARGET_RATE, format="WAV", subtype="PCM_16")
    rows.append(
        Row(
            buf.getvalue(),
            name(first_index + 3, "wav"),
            sentences[k % len(sentences)],
            source_of(voice),
            0.0,
            "zero audio samples",
        )
    )
    return rows


@dataclass
class LongRow:
    row: Row
    texts: list[str]  # the utterances' transcripts, in order
    pauses: list[tuple[float, float]]  # seconds: each joint's silence, speech end to speech start


def long_row(
    texts: list[str], voice: str, speed: int, pitch: int, silences: list[float], path: str
) -> LongRow:
    """Utterances of one voice joined by the given silences (seconds), at 16 kHz, Ogg Vorbis.

    A joint's true pause runs from the last sample above SPEECH_LEVEL of one utterance to the
    first of the next, so espeak-ng's own lead-in and trailing silence count as pause.
    """
    clips = [
        soxr.resample(synthesize(Utterance(t, voice, speed, pitch)), ESPEAK_RATE, TARGET_RATE)
        for t in texts
    ]
    clips = [clip.astype(np.float32) for clip in clips]
    parts, pauses, offset, pause_start = [], [], 0, 0
    for i, clip in enumerate(clips):
        loud = np.flatnonzero(np.abs(clip) > SPEECH_LEVEL)
        if i:
            pauses.append((pause_start / TARGET_RATE, (offset + loud[0]) / TARGET_RATE))
        pause_start = offset + loud[-1] + 1
        parts.append(clip)
        offset += clip.size
        if i < len(clips) - 1:
            gap = np.zeros(round(silences[i] * TARGET_RATE), dtype=np.float32)
            parts.append(gap)
            offset += gap.size
    audio = np.concatenate(parts)
    data = encode_16k(audio)
    row = Row(data, path, " ".join(texts), source_of(voice), audio.size / TARGET_RATE)
    return LongRow(row, texts, pauses)


def encode_16k(audio: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(
        buf,
        audio,
        TARGET_RATE,
        format="OGG",
        subtype="VORBIS",
        compression_level=VORBIS_COMPRESSION,
    )
    return fix_ogg_serial(buf.getvalue())


def plan_long_row(
    sentences: list[str], voices: list[str], rng: np.random.Generator, seconds_per_word: float
) -> tuple[list[str], str, int, int, list[float]]:
    """Sentences, voice, speed, pitch and joint silences for one long row inside
    LONG_ROW_SECONDS, estimated from the word count (the builder measures the real length)."""
    target = rng.uniform(*LONG_ROW_SECONDS)
    voice = str(rng.choice(voices))
    speed, pitch = int(rng.choice(TRAIN_SPEEDS)), int(rng.integers(*PITCH_RANGE))
    scale = 150 / speed
    texts, silences, seconds = [], [], 0.0
    for i in rng.permutation(len(sentences)):
        estimate = len(sentences[i].split()) * seconds_per_word * scale + 0.6
        silence = float(rng.uniform(*JOINT_SILENCE_SECONDS))
        if texts and seconds + silence + estimate > LONG_ROW_SECONDS[1] - 2:
            break
        if texts:
            silences.append(round(silence, 3))
            seconds += silence
        texts.append(sentences[i])
        seconds += estimate
        if seconds >= target:
            break
    return texts, voice, speed, pitch, silences


def long_rows(
    first_index: int, sentences: list[str], seed: int, count: int = N_LONG_ROWS
) -> list[LongRow]:
    """`count` rows of LONG_ROW_SECONDS; one whose real length falls outside is drawn again."""
    rng = np.random.default_rng(seed)
    voices = [v for voices in VOICE_FAMILIES.values() for v in voices if v not in TEST_ONLY_VOICES]
    made = []
    while len(made) < count:
        texts, voice, speed, pitch, silences = plan_long_row(sentences, voices, rng, 0.42)
        path = f"demo_train_{first_index + len(made):05d}.ogg"
        candidate = long_row(texts, voice, speed, pitch, silences, path)
        if LONG_ROW_SECONDS[0] <= candidate.row.seconds <= LONG_ROW_SECONDS[1]:
            made.append(candidate)
    return made


def write_long_rows(rows: list[LongRow], first_index: int, path: Path) -> None:
    described = [
        {
            "row": first_index + i,
            "path": long.row.path,
            "seconds": round(long.row.seconds, 4),
            "texts": long.texts,
            "pauses": [[round(a, 4), round(b, 4)] for a, b in long.pauses],
        }
        for i, long in enumerate(rows)
    ]
    path.write_text(json.dumps(described, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def write_parquet(rows: list[Row], path: Path) -> None:
    table = pa.table(
        {
            "audio": [{"bytes": r.audio, "path": r.path} for r in rows],
            "transkription": [r.text for r in rows],
            "source": [r.source for r in rows],
        },
        schema=SCHEMA,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".parquet.tmp")
    # Several row groups, like the hub's files, so readers that stream by row group are exercised.
    pq.write_table(table, tmp, row_group_size=100, compression="zstd")
    tmp.replace(path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--sentences",
        type=Path,
        default=Path("demo/sentences_de.txt"),
        help="one German sentence per line; lines starting with # are ignored",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("demo/corpus"), help="corpus folder (gets data/*.parquet)"
    )
    parser.add_argument("--seed", type=int, default=1234, help="seed for every random choice")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if shutil.which("espeak-ng") is None:
        sys.exit(
            "espeak-ng is not installed, and the demo corpus is spoken by it.\n"
            "Install it with `sudo apt-get install espeak-ng` (Debian/Ubuntu), "
            "`sudo dnf install espeak-ng` (Fedora) or `brew install espeak-ng` (macOS).\n"
            "The corpus is already shipped in demo/corpus; you only need this to regenerate it."
        )
    rng = np.random.default_rng(args.seed)
    sentences = read_sentences(args.sentences)
    train, test = plan_utterances(sentences, rng)
    train_sentences = sorted({u.text for u in train})
    splits = {"train": train, "test": test}

    summary = []
    for split, utterances in splits.items():
        rows = good_rows(split, utterances, rng)
        rows += bad_rows(split, len(rows), train_sentences, rng)
        if split == "train":
            longs = long_rows(len(rows), train_sentences, args.seed + LONG_ROWS_SEED_OFFSET)
            write_long_rows(longs, len(rows), args.out / LONG_ROWS_NAME)
            rows += [long.row for long in longs]
        path = args.out / "data" / f"{split}-00000-of-00001.parquet"
        write_parquet(rows, path)
        good = [r for r in rows if not r.bad]
        bad = [r for r in rows if r.bad]
        hours = sum(r.seconds for r in rows) / 3600
        good_hours = sum(r.seconds for r in good) / 3600
        summary.append(
            f"{split:5s}: {len(rows)} rows = {len(good)} good + {len(bad)} bad; "
            f"{hours:.3f} h of audio ({good_hours:.3f} h in good rows); "
            f"{path.stat().st_size / 1e6:.2f} MB -> {path}"
        )
        for r in bad:
            summary.append(f"        bad row {rows.index(r)} ({r.path}): {r.bad}")
    print("\n".join(summary))


if __name__ == "__main__":
    main()
