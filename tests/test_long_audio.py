"""Clips longer than the window, split at pauses (`--long-audio split`, shard_builder/align.py).

Without a pretrained model: the pause finder and planner on synthetic audio, the confidence rule
with a counting aligner, and the builder's guarantees (pieces fit and reassemble, features equal
the extractor, same bytes for any worker count and after a kill, every row accounted for, the
checker agrees) on the demo corpus with the tiny preset as aligner and the confidence rule
switched off (a random-weight model is never confident; `--align-min-*` set very low). With
whisper-base (WHISPER_BASE_DIR): the demo's long rows split at their true joints, and a
transcript that belongs to another clip is rejected. The model-free sentence method
(`--align-method sentences`, what the demo uses with its random preset) on the demo's long rows.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from transformers import WhisperFeatureExtractor

from shard_builder import align
from shard_builder.align import (
    Pause,
    Unaligned,
    find_pauses,
    plan_pieces,
    sentence_split,
    split_clip,
)
from shard_builder.audio import decode_audio
from shard_builder.check import check_folder
from shard_builder.contract import load_manifest, npy_from_bytes, piece_of_key
from shard_builder.features import pad_to_full
from tests.conftest import DEMO_CORPUS, REPO, TINY_MODEL, build_shards, set_window
from tests.test_builder import read_samples
from tests.test_builder_faults import KILL_DRIVER, final_files

RATE = 16000
LONG_ROWS = json.loads((DEMO_CORPUS / "long_rows.json").read_text(encoding="utf-8"))
# The random-weight preset scores every text ~-10.9 nats per token: switch the rule off.
NOT_CONFIDENT_ANYWAY = ("--align-min-logprob=-1e9", "--align-min-margin=-1e9")


def train_rows() -> list[dict]:
    return pq.read_table(next((DEMO_CORPUS / "data").glob("train-*"))).to_pylist()


# --- pauses and plans, on synthetic audio ------------------------------------------------------


def bursts(spans: list[tuple[float, float]], seconds: float, seed: int = 0) -> np.ndarray:
    """Noise in the given (start, stop) spans (seconds), digital silence elsewhere."""
    rng = np.random.default_rng(seed)
    audio = np.zeros(int(seconds * RATE), dtype=np.float32)
    for start, stop in spans:
        audio[int(start * RATE) : int(stop * RATE)] = 0.2 * rng.standard_normal(
            int(stop * RATE) - int(start * RATE)
        )
    return audio


def test_pauses_are_the_silences_inside_the_clip_long_enough():
    audio = bursts([(0.5, 2.0), (2.1, 3.0), (3.6, 5.0)], 5.5)
    pauses = find_pauses(audio, min_pause=0.3)
    assert len(pauses) == 1  # 0.1 s is too short; leading and trailing silence is no joint
    (pause,) = pauses
    assert 3.0 * RATE <= pause.start < 3.03 * RATE and 3.57 * RATE < pause.stop <= 3.6 * RATE
    assert not np.any(audio[pause.start : pause.stop])
    assert len(find_pauses(audio, min_pause=0.05)) == 2


def test_plan_has_the_fewest_pieces_that_fit_and_cuts_at_the_longest_pauses():
    window = 10 * RATE
    # 25 s: three pieces are needed; the pauses at ~8 s and ~17 s are the long ones
    pauses = [
        Pause(int(s * RATE), int((s + length) * RATE))
        for s, length in [(4, 0.4), (8, 1.0), (12, 0.4), (17, 0.9), (19, 0.4)]
    ]
    bounds = plan_pieces(25 * RATE, pauses, window)
    assert len(bounds) == 3
    assert all(stop - start <= window for start, stop in bounds)
    assert bounds[0][0] == 0 and bounds[-1][1] == 25 * RATE
    for (_, stop), (start, _), pause in zip(
        bounds[:-1], bounds[1:], [pauses[1], pauses[3]], strict=True
    ):
        # each cut lies in its pause; a piece keeps at most PAUSE_KEEP of it; only silence goes
        assert pause.start <= stop <= start <= pause.stop
        assert stop - pause.start <= align.PAUSE_KEEP and pause.stop - start <= align.PAUSE_KEEP
        assert stop % 160 == 0 and start % 160 == 0  # offsets exact in seconds (10 ms)
    with pytest.raises(Unaligned, match="within the window"):
        plan_pieces(25 * RATE, pauses[:2], window)


class CountingAligner:
    """A stand-in for the Whisper aligner: a 'word' is a burst, so it knows how many words a
    piece holds, and scores boundaries by their distance to that count."""

    def __init__(self, logprob: float = -0.5, sharpness: float = 10.0) -> None:
        self.logprob, self.sharpness = logprob, sharpness

    def boundary_scores(self, audio, words, last=False):
        spoken = np.flatnonzero(np.diff(np.concatenate([[0], audio != 0, [0]]).astype(int)) == 1)
        b = np.arange(1, len(words) + 1)
        scores = -self.sharpness * np.abs(b - len(spoken))
        return scores.astype(float), np.full(len(words), self.logprob)


def sentence_clip() -> tuple[np.ndarray, str, list[str]]:
    """Six 'sentences' of 3-4 'words' (0.3 s bursts, 0.1 s apart), 0.6 s pauses between."""
    spans, texts, t = [], [], 0.2
    for s in range(6):
        words = [f"w{s}{k}" for k in range(3 + s % 2)]
        for _ in words:
            spans.append((t, t + 0.3))
            t += 0.4
        texts.append(" ".join(words))
        t += 0.5
    return bursts(spans, t + 0.2), " ".join(texts), texts


def test_split_gives_every_word_to_exactly_one_piece_in_order():
    audio, text, _ = sentence_clip()
    pieces = split_clip(audio, text, CountingAligner(), 4 * RATE, 0.3, 3.0, -2.5)
    assert len(pieces) >= 3 and all(p.stop - p.start <= 4 * RATE for p in pieces)
    assert " ".join(p.text for p in pieces) == text
    for piece in pieces:  # each piece's text is what its audio holds
        word_gaps = find_pauses(audio[piece.start : piece.stop], 0.05)
        assert len(piece.text.split()) == len(word_gaps) + 1


def test_an_unconfident_split_is_refused_never_guessed():
    audio, text, _ = sentence_clip()
    with pytest.raises(Unaligned, match="nats per token"):
        split_clip(audio, text, CountingAligner(logprob=-4.0), 4 * RATE, 0.3, 3.0, -2.5)
    with pytest.raises(Unaligned, match="beats the next by"):
        split_clip(audio, text, CountingAligner(sharpness=1.0), 4 * RATE, 0.3, 3.0, -2.5)
    with pytest.raises(Unaligned, match="pieces planned for 2 words"):
        split_clip(audio, "zwei Wörter", CountingAligner(), 4 * RATE, 0.3, 3.0, -2.5)


def test_word_boundaries_are_token_boundaries():
    """The aligner scores words by their tokens laid end to end: they must be the text's."""
    aligner = align.Aligner(str(TINY_MODEL), "de", "transcribe")
    text = " ".join(json.loads((DEMO_CORPUS / "long_rows.json").read_text())[0]["texts"])
    text += " Größe, Maße und 5 € – „Anführungszeichen“?"
    joined = [t for tokens in aligner.word_tokens(text.split()) for t in tokens]
    assert joined == aligner.tokenizer.encode(text, add_special_tokens=False)


# --- the builder, with the tiny preset as aligner -----------------------------------------------


@pytest.fixture(scope="module")
def split_shards(module_tmp) -> Path:
    out = module_tmp("split-shards")
    result = build_shards(out, TINY_MODEL, "--splits", "train", *NOT_CONFIDENT_ANYWAY)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def pieces_by_row(split_dir: Path) -> dict[int, list[dict]]:
    found: dict[int, list[dict]] = {}
    for shard in sorted(split_dir.glob("shard-*.tar")):
        for key, members in read_samples(shard).items():
            if piece_of_key(key) is not None:
                meta = json.loads(members["json"])
                found.setdefault(meta["id"], []).append({**meta, "key": key, **members})
    return {row: sorted(p, key=lambda m: m["piece"]) for row, p in found.items()}


def test_long_rows_become_pieces_that_fit_and_reassemble_the_transcript(split_shards):
    manifest = load_manifest(split_shards / "train")
    rows = train_rows()
    split = pieces_by_row(split_shards / "train")
    long_ids = [r["row"] for r in LONG_ROWS] + [266]  # 266: the corpus's older 33.7 s row
    assert sorted(split) == sorted(long_ids)
    assert manifest["num_split"] == len(split)
    assert manifest["num_split_pieces"] == sum(len(p) for p in split.values())
    assert (
        manifest["num_samples"] - manifest["num_split_pieces"] + manifest["num_split"]
        + manifest["num_rejected"] == manifest["num_input_rows"] == len(rows)
    )  # fmt: skip
    window = manifest["features"]["max_frames"] / 100
    for row_id, pieces in split.items():
        assert [p["piece"] for p in pieces] == list(range(len(pieces)))
        assert {p["num_pieces"] for p in pieces} == {len(pieces)}
        transcript = rows[row_id]["transkription"]
        assert " ".join(p["text"] for p in pieces) == " ".join(transcript.split())
        assert all(0 < p["duration"] <= window for p in pieces)
        offsets = [p["offset"] for p in pieces]
        assert offsets[0] == 0 and offsets == sorted(offsets)


def test_piece_features_equal_the_extractor_on_the_piece_audio(split_shards):
    rows = train_rows()
    reference = WhisperFeatureExtractor.from_pretrained(TINY_MODEL)
    row_id = LONG_ROWS[0]["row"]
    pieces = pieces_by_row(split_shards / "train")[row_id]
    waveform = decode_audio(rows[row_id]["audio"]["bytes"])
    starts = [round(p["offset"] * RATE) for p in pieces]
    for piece, start, following in zip(pieces, starts, [*starts[1:], None], strict=True):
        stop = waveform.size if following is None else start + round(piece["duration"] * RATE)
        audio = waveform[start:stop]
        assert abs(audio.size / RATE - piece["duration"]) < 1e-4
        expected = reference(audio, sampling_rate=RATE, return_tensors="np").input_features[0]
        mel = npy_from_bytes(piece["mel.npy"]).astype(np.float32)
        restored = pad_to_full(mel, piece["pad_value"], expected.shape[1])
        assert np.abs(restored - expected).max() < 1e-3
    # what lies between the pieces was dropped: it must be silence (part of a pause)
    for piece, start, following in zip(pieces[:-1], starts[:-1], starts[1:], strict=True):
        gap = waveform[start + round(piece["duration"] * RATE) : following]
        assert gap.size == 0 or np.abs(gap).max() < 0.02


def test_split_shards_pass_the_deep_check_and_a_wrong_count_is_caught(split_shards, tmp_path):
    assert check_folder(split_shards, deep=True, progress=False).ok
    broken = tmp_path / "broken"
    (broken / "train").mkdir(parents=True)
    for path in (split_shards / "train").glob("*"):
        if path.is_file():
            (broken / "train" / path.name).write_bytes(path.read_bytes())
    manifest = json.loads((broken / "train" / "manifest.json").read_text())
    manifest["num_split"] -= 1
    manifest["num_rejected"] += 1
    (broken / "train" / "manifest.json").write_text(json.dumps(manifest))
    (broken / "train" / "rejects.jsonl").write_text(
        (split_shards / "train" / "rejects.jsonl").read_text() + '{"id": 0}\n'
    )
    report = check_folder(broken, progress=False)
    assert not report.ok
    pieces = manifest["num_split_pieces"]
    assert [str(p) for p in report.problems] == [
        f"train/manifest.json: the shards hold {pieces} pieces of 5 split rows, the manifest "
        f"counts {pieces} pieces of 4"
    ]


def test_split_shards_are_byte_identical_for_any_worker_count(split_shards, tmp_path):
    extra = ("--splits", "train", *NOT_CONFIDENT_ANYWAY)
    result = build_shards(tmp_path, TINY_MODEL, *extra, workers=2)
    assert result.returncode == 0, result.stderr[-2000:]
    assert final_files(tmp_path / "train") == final_files(split_shards / "train")


def test_a_build_killed_among_the_pieces_resumes_to_the_same_bytes(split_shards, tmp_path):
    args = ["--dataset", str(DEMO_CORPUS), "--model", str(TINY_MODEL), "--out", str(tmp_path)]
    args += ["--workers", "1", "--shard-size", "64", "--splits", "train", *NOT_CONFIDENT_ANYWAY]
    # samples 1..264 are the short rows; 265 and 266 are the first two pieces of row 266
    killed = subprocess.run(
        [sys.executable, "-c", KILL_DRIVER, "add:266", *args], cwd=REPO, capture_output=True
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (tmp_path / "train" / "manifest.json").exists()
    resumed = subprocess.run(
        [sys.executable, "-m", "shard_builder", *args], cwd=REPO, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stdout
    assert final_files(tmp_path / "train") == final_files(split_shards / "train")


def test_the_random_preset_is_never_confident_so_long_rows_are_counted_rejects(demo_shards):
    rejects = [json.loads(line) for line in (demo_shards / "train" / "rejects.jsonl").open()]
    unaligned = {r["id"] for r in rejects if r["reason"] == "too_long_unaligned"}
    assert unaligned == {266, *(r["row"] for r in LONG_ROWS)}
    assert all("nats per token" in r["detail"] for r in rejects if r["id"] in unaligned)
    assert load_manifest(demo_shards / "train")["num_split"] == 0


def test_long_audio_reject_is_the_old_behaviour(demo_shards, tmp_path):
    result = build_shards(tmp_path, TINY_MODEL, "--splits", "train", "--long-audio", "reject")
    assert result.returncode == 0, result.stderr[-2000:]
    rejects = [json.loads(line) for line in (tmp_path / "train" / "rejects.jsonl").open()]
    too_long = {r["id"] for r in rejects if r["reason"] == "too_long"}
    assert too_long == {266, *(r["row"] for r in LONG_ROWS)}
    assert "too_long_unaligned" not in {r["reason"] for r in rejects}
    manifest = load_manifest(tmp_path / "train")
    assert manifest["long_audio"] == "reject" and manifest["num_split"] == 0
    # the aligner never ran: the shards are those of the default build, whose aligner refused
    assert manifest["shards"] == load_manifest(demo_shards / "train")["shards"]
    assert (
        "long_audio"
        not in json.loads(next((tmp_path / "train" / ".build").glob("*.json")).read_text())[
            "settings"
        ]
    )


def test_an_aligner_with_a_shorter_window_than_the_model_is_refused_before_any_work(tmp_path):
    model = tmp_path / "tiny-30s"
    shutil.copytree(TINY_MODEL, model)
    set_window(model, 30)
    out = tmp_path / "out"
    result = build_shards(out, model, "--align-model", str(TINY_MODEL), "--splits", "train")
    assert result.returncode == 2
    assert "hears 5 s, less than the 30 s window" in result.stderr
    assert not list(out.rglob("*.tar"))


# --- the sentence method (no model) ------------------------------------------------------------


def long_row_audio(long_row) -> tuple[np.ndarray, str]:
    row = train_rows()[long_row["row"]]
    return decode_audio(row["audio"]["bytes"]), row["transkription"]


@pytest.mark.parametrize("window", [5, 30])
@pytest.mark.parametrize("index", range(len(LONG_ROWS)))
def test_the_sentence_method_splits_the_demo_long_rows_at_their_true_joints(index, window):
    waveform, text = long_row_audio(LONG_ROWS[index])
    pieces = sentence_split(waveform, text, window * RATE, 0.3, 0.75)
    assert len(pieces) >= 2 and all(p.stop - p.start <= window * RATE for p in pieces)
    assert " ".join(p.text for p in pieces) == text
    assert true_pieces_hold(pieces, LONG_ROWS[index])
    assert all(p.margin >= 0.75 for p in pieces)


def test_the_sentence_method_refuses_what_the_speaking_rate_cannot_place():
    waveform, text = long_row_audio(LONG_ROWS[0])
    _, other = long_row_audio(LONG_ROWS[1])
    with pytest.raises(Unaligned, match="sentence end is"):  # another clip's transcript
        sentence_split(waveform, other, 5 * RATE, 0.3, 0.75)
    with pytest.raises(Unaligned, match="no speech rate"):  # three times the words
        sentence_split(waveform, " ".join([text] * 3), 30 * RATE, 0.3, 0.75)
    with pytest.raises(Unaligned, match="no sentence end"):
        sentence_split(waveform, text.replace(".", "").replace("?", ""), 30 * RATE, 0.3, 0.75)


def test_the_demo_build_with_the_sentence_method_splits_its_long_rows(tmp_path):
    result = build_shards(tmp_path, TINY_MODEL, "--splits", "train", "--align-method", "sentences")
    assert result.returncode == 0, result.stderr[-3000:]
    split = pieces_by_row(tmp_path / "train")
    assert sorted(split) == sorted([r["row"] for r in LONG_ROWS] + [266])
    rows = train_rows()
    for row_id, pieces in split.items():
        assert " ".join(p["text"] for p in pieces) == rows[row_id]["transkription"]
    manifest = load_manifest(tmp_path / "train")
    assert manifest["num_split"] == 5
    assert manifest["long_audio_settings"]["align_method"] == "sentences"
    assert check_folder(tmp_path, deep=True, progress=False).ok


# --- whisper-base as aligner ------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_aligner(whisper_base_dir):
    return align.Aligner(str(whisper_base_dir), "de", "transcribe")


def true_pieces_hold(pieces, long_row) -> bool:
    """Each piece's text is whole consecutive utterances, and each cut lies in a true pause."""
    texts, pauses = long_row["texts"], long_row["pauses"]
    joints = [len(" ".join(texts[: i + 1]).split()) for i in range(len(texts) - 1)]
    ends = np.cumsum([len(p.text.split()) for p in pieces])[:-1].tolist()
    for end, piece, following in zip(ends, pieces[:-1], pieces[1:], strict=True):
        pause = pauses[joints.index(end)] if end in joints else None
        if pause is None or not pause[0] <= piece.stop / RATE <= following.start / RATE <= pause[1]:
            return False
    return True


@pytest.mark.parametrize("index", [0, 1])
def test_whisper_base_splits_a_demo_long_row_at_its_true_joints(base_aligner, index):
    long_row = LONG_ROWS[index]
    row = train_rows()[long_row["row"]]
    waveform = decode_audio(row["audio"]["bytes"])
    pieces = split_clip(waveform, row["transkription"], base_aligner, 30 * RATE, 0.3, 3.0, -2.5)
    assert len(pieces) >= 2
    assert " ".join(p.text for p in pieces) == row["transkription"]
    assert true_pieces_hold(pieces, long_row)


def test_whisper_base_rejects_a_transcript_of_another_clip(base_aligner):
    rows = train_rows()
    waveform = decode_audio(rows[LONG_ROWS[0]["row"]]["audio"]["bytes"])
    other = rows[LONG_ROWS[1]["row"]]["transkription"]
    with pytest.raises(Unaligned, match="does the transcript match the audio"):
        split_clip(waveform, other, base_aligner, 30 * RATE, 0.3, 3.0, -2.5)
