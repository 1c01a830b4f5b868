"""The shard builder honours the contract: exact features, reproducible bytes, every row counted."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile
from transformers import WhisperFeatureExtractor, WhisperTokenizer

from shard_builder.audio import RejectedRow, decode_audio
from shard_builder.contract import (
    MAX_TARGET_POSITIONS,
    load_manifest,
    npy_from_bytes,
    tokenizer_fingerprint,
)
from shard_builder.features import LogMelExtractor, pad_to_full
from shard_builder.tokens import TargetEncoder
from tests.conftest import DEMO_CORPUS, TINY_MODEL, build_shards

SECONDS = [0.1, 0.37, 1.0, 2.5, 7.3, 16.0, 29.99, 30.0]


def read_samples(shard: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(shard) as tar:
        for member in tar.getmembers():
            key, suffix = member.name.split(".", 1)
            samples.setdefault(key, {})[suffix] = tar.extractfile(member).read()
    return samples


@pytest.mark.parametrize(
    ("n_mels", "window_seconds", "seconds"),
    [
        (80, 30, SECONDS),
        (128, 30, SECONDS),
        # A smaller model's shorter window (the demo preset's 5 s): the edge moves with it.
        (80, 5, [0.1, 1.0, 3.3, 4.99, 5.0]),
    ],
)
def test_padded_features_match_whisper_feature_extractor(n_mels, window_seconds, seconds):
    reference = WhisperFeatureExtractor(feature_size=n_mels, chunk_length=window_seconds)
    extractor = LogMelExtractor(reference.mel_filters, reference.nb_max_frames)
    assert extractor.max_frames == window_seconds * 100
    rng = np.random.default_rng(n_mels)
    for duration in seconds:
        # Speech-like: noise under a slow envelope, at a random level.
        t = np.arange(int(duration * 16000)) / 16000
        envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 1.5 * t)
        audio = (rng.standard_normal(t.size) * envelope * rng.uniform(0.01, 0.5)).astype(np.float32)
        expected = reference(audio, sampling_rate=16000, return_tensors="np").input_features[0]
        stored = extractor(audio)
        assert stored.features.dtype == np.float16
        assert stored.features.shape[1] == min(extractor.max_frames, (audio.size + 199) // 160 + 1)
        restored = pad_to_full(
            stored.features.astype(np.float32), stored.pad_value, expected.shape[1]
        )
        assert np.abs(restored - expected).max() < 1e-3, duration


def test_extractor_refuses_a_clip_longer_than_its_window():
    extractor = LogMelExtractor(WhisperFeatureExtractor(feature_size=80).mel_filters, 500)
    with pytest.raises(ValueError, match="1..80000 samples"):
        extractor(np.zeros(80001, np.float32))


def test_stored_frames_end_where_the_pad_value_begins():
    audio = np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1
    reference = WhisperFeatureExtractor(feature_size=80)
    full = reference(audio, sampling_rate=16000, return_tensors="np").input_features[0]
    stored = LogMelExtractor(reference.mel_filters)(audio)
    n = stored.features.shape[1]
    assert np.allclose(full[:, n:], stored.pad_value, atol=1e-6)
    assert not np.allclose(full[:, n - 2], stored.pad_value, atol=1e-3)


def wav_bytes(audio: np.ndarray, rate: int, fmt: str = "WAV", subtype: str | None = None) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, audio, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def test_decode_downmixes_and_resamples():
    rate = 22050
    t = np.arange(rate) / rate
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    stereo = np.stack([tone, tone], axis=1)
    waveform = decode_audio(wav_bytes(stereo, rate, "FLAC"))
    assert waveform.dtype == np.float32 and waveform.ndim == 1
    assert abs(waveform.size - 16000) <= 1
    spectrum = np.abs(np.fft.rfft(waveform))
    assert abs(np.argmax(spectrum) * 16000 / waveform.size - 440) < 2


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "missing_audio"),
        (b"RIFF not really a wave file", "decode_error"),
        (wav_bytes(np.zeros(0, dtype=np.float32), 16000), "empty_audio"),
        (
            wav_bytes(np.array([0.1, np.nan], dtype=np.float32), 16000, subtype="FLOAT"),
            "non_finite",
        ),
    ],
)
def test_bad_audio_is_a_counted_reason_not_a_crash(data, reason):
    with pytest.raises(RejectedRow) as caught:
        decode_audio(data)
    assert caught.value.reason == reason


def test_targets_carry_the_whisper_prefix_and_end_token():
    tokenizer = WhisperTokenizer.from_pretrained(TINY_MODEL)
    encoder = TargetEncoder(tokenizer, "de", "transcribe")
    ids = encoder("Grüß Gott, wie geht es Ihnen?")
    assert ids.dtype == np.int32
    assert list(ids[:4]) == [50258, 50261, 50359, 50363] and ids[-1] == 50257
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Grüß Gott, wie geht es Ihnen?"
    with pytest.raises(RejectedRow, match="too_many_tokens"):
        encoder(" ".join(["Donaudampfschifffahrtsgesellschaft"] * MAX_TARGET_POSITIONS))
    with pytest.raises(RejectedRow, match="empty_text"):
        encoder("   ")


def test_demo_shards_honour_the_contract(demo_shards):
    for split in ("train", "test"):
        manifest = load_manifest(demo_shards / split)
        rejects = (demo_shards / split / "rejects.jsonl").read_text().splitlines()
        input_rows = pq.ParquetFile(next((DEMO_CORPUS / "data").glob(f"{split}-*"))).metadata
        assert manifest["num_samples"] + manifest["num_rejected"] == input_rows.num_rows
        assert manifest["num_input_rows"] == input_rows.num_rows
        assert len(rejects) == manifest["num_rejected"] >= 2
        assert manifest["features"]["n_mels"] == 80 and manifest["features"]["dtype"] == "float16"
        assert manifest["prefix_tokens"] == [50258, 50261, 50359, 50363]
        tokenizer = WhisperTokenizer.from_pretrained(TINY_MODEL)
        assert manifest["tokenizer"]["fingerprint"] == tokenizer_fingerprint(tokenizer.get_vocab())
        assert len(manifest["shards"]) >= 1
        keys = set()
        for entry in manifest["shards"]:
            samples = read_samples(demo_shards / split / entry["name"])
            assert len(samples) == entry["num_samples"]
            for key, members in samples.items():
                assert "." not in key and set(members) == {"mel.npy", "tokens.npy", "json"}
                mel = npy_from_bytes(members["mel.npy"])
                tokens = npy_from_bytes(members["tokens.npy"])
                meta = json.loads(members["json"])
                assert mel.dtype == np.float16 and mel.shape[0] == 80
                assert 1 <= mel.shape[1] <= manifest["features"]["max_frames"] == 500
                assert tokens.dtype == np.int32 and tokens[-1] == 50257
                assert {"id", "text", "source", "duration", "pad_value"} <= set(meta)
                assert 0 < meta["duration"] <= 5  # the tiny preset's window
                keys.add(key)
        assert len(keys) == manifest["num_samples"]


def test_demo_rejects_name_every_bad_row(demo_shards):
    train = [json.loads(line) for line in (demo_shards / "train" / "rejects.jsonl").open()]
    reasons = {line["reason"] for line in train}
    # the long rows: the random-weight preset is never a confident aligner (test_long_audio.py)
    assert {"decode_error", "empty_text", "too_long_unaligned", "empty_audio"} <= reasons
    assert all(isinstance(line["id"], int) and line["detail"] for line in train)


def test_stored_sample_matches_the_extractor_on_its_own_audio(demo_shards):
    """End to end: a shard sample padded back equals WhisperFeatureExtractor on the row's audio."""
    table = pq.read_table(next((DEMO_CORPUS / "data").glob("test-*")))
    manifest = load_manifest(demo_shards / "test")
    samples = read_samples(demo_shards / "test" / manifest["shards"][0]["name"])
    reference = WhisperFeatureExtractor.from_pretrained(TINY_MODEL)
    for members in list(samples.values())[:5]:
        meta = json.loads(members["json"])
        audio = decode_audio(table.column("audio")[meta["id"]].as_py()["bytes"])
        expected = reference(audio, sampling_rate=16000, return_tensors="np").input_features[0]
        mel = npy_from_bytes(members["mel.npy"]).astype(np.float32)
        assert expected.shape[1] == manifest["features"]["max_frames"] == 500  # the 5 s preset
        restored = pad_to_full(mel, meta["pad_value"], expected.shape[1])
        assert np.abs(restored - expected).max() < 1e-3


def test_shards_are_byte_identical_whatever_the_worker_count(demo_shards, tmp_path):
    result = build_shards(tmp_path / "two", TINY_MODEL, workers=2)
    assert result.returncode == 0, result.stderr[-2000:]
    for split in ("train", "test"):
        for path in sorted((demo_shards / split).glob("*")):
            if path.is_file():
                assert path.read_bytes() == (tmp_path / "two" / split / path.name).read_bytes()


def test_rerun_rebuilds_only_missing_shards_to_the_same_bytes(demo_shards, tmp_path):
    out = tmp_path / "again"
    shutil.copytree(demo_shards, out)
    victim = sorted((out / "train").glob("shard-*.tar"))[1]
    victim.unlink()
    (out / "train" / "manifest.json").unlink()
    result = build_shards(out, TINY_MODEL)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resuming" in result.stdout
    assert victim.read_bytes() == (demo_shards / "train" / victim.name).read_bytes()
    for name in ("manifest.json", "rejects.jsonl"):
        assert (out / "train" / name).read_bytes() == (demo_shards / "train" / name).read_bytes()


def test_parts_on_separate_machines_make_the_same_output(demo_shards, tmp_path):
    out = tmp_path / "parts"
    for part in ("0/2", "1/2"):
        result = build_shards(out, TINY_MODEL, "--part", part, "--splits", "train")
        assert result.returncode == 0, result.stderr[-2000:]
    manifest = out / "train" / "manifest.json"
    assert manifest.read_bytes() == (demo_shards / "train" / "manifest.json").read_bytes()


def test_missing_column_stops_before_any_work(tmp_path):
    result = build_shards(tmp_path / "out", TINY_MODEL, "--text-column", "sentence")
    assert result.returncode == 2
    assert "'sentence'" in result.stderr
    assert "audio, transkription, source" in result.stderr
    assert not list((tmp_path / "out").rglob("*.tar"))


def test_saved_datasets_folder_gives_the_same_shards(demo_shards, tmp_path):
    import datasets

    files = {split: str(next((DEMO_CORPUS / "data").glob(f"{split}-*"))) for split in ("train",)}
    dataset = datasets.load_dataset("parquet", data_files=files)
    dataset = dataset.cast_column("audio", datasets.Audio(decode=False))
    dataset.save_to_disk(tmp_path / "saved")
    result = build_shards(
        tmp_path / "out", TINY_MODEL, "--splits", "train", dataset=tmp_path / "saved"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    built = load_manifest(tmp_path / "out" / "train")["shards"]
    assert [s["sha256"] for s in built] == [
        s["sha256"] for s in load_manifest(demo_shards / "train")["shards"]
    ]


def test_shard_names_and_members_are_reproducible_tar(demo_shards):
    shard = sorted((demo_shards / "train").glob("shard-*.tar"))[0]
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.mode == 0o644 for m in members)
    keys = [m.name.split(".", 1)[0] for m in members]
    assert keys == sorted(keys)  # row order
    suffixes = [m.name.split(".", 1)[1] for m in members]
    assert suffixes == ["mel.npy", "tokens.npy", "json"] * (len(members) // 3)


def test_hub_parquet_schema_is_read_like_the_hub(tmp_path):
    """A parquet folder laid out like the hub repo, with row groups, reads every row once."""
    (tmp_path / "data").mkdir()
    clip = {"bytes": wav_bytes(np.zeros(1600, dtype=np.float32) + 0.01, 16000), "path": "a.wav"}
    table = pa.table(
        {
            "audio": [clip] * 25,
            "transkription": [f"Satz {i}" for i in range(25)],
            "source": ["x"] * 25,
        }
    )
    pq.write_table(
        table.slice(0, 12), tmp_path / "data" / "train-00000-of-00002.parquet", row_group_size=5
    )
    pq.write_table(
        table.slice(12), tmp_path / "data" / "train-00001-of-00002.parquet", row_group_size=4
    )
    from shard_builder.source import Columns, open_source

    source = open_source(str(tmp_path), None, Columns())
    assert source.num_rows("train") == 25
    rows = list(source.rows("train", 3, 19))
    assert [row.row_id for row in rows] == list(range(3, 19))
    assert [row.text for row in rows] == [f"Satz {i}" for i in range(3, 19)]


def test_a_part_removes_only_its_own_leftovers(tmp_path):
    """Machines sharing one output folder must not delete each other's shards in progress."""
    from shard_builder.build import RECORDS_DIR, remove_stale_temporaries
    from shard_builder.config import BuilderConfig

    (tmp_path / RECORDS_DIR).mkdir()
    leftovers = [
        tmp_path / ".shard-000004.tar.tmp-11",
        tmp_path / ".shard-000005.tar.tmp-12",
        tmp_path / RECORDS_DIR / ".shard-000007.tar.json.tmp-13",
        tmp_path / ".manifest.json.tmp-14",
    ]
    for path in leftovers:
        path.write_bytes(b"partial")
    remove_stale_temporaries(tmp_path, BuilderConfig(out=str(tmp_path), part="1/2"))
    assert [path.exists() for path in leftovers] == [True, False, False, True]
    remove_stale_temporaries(tmp_path, BuilderConfig(out=str(tmp_path)))
    assert not any(path.exists() for path in leftovers)


def test_the_entry_points_read_the_dotenv_of_the_working_directory(tmp_path, monkeypatch):
    """A .env beside the user's runs fills in what the environment does not set (the builder's
    SHARDS_DIR default here); a variable that is set wins. A bare load_dotenv() would search
    from the package's folder only and miss it."""
    from shard_builder.config import parse_args

    (tmp_path / ".env").write_text("SHARDS_DIR=shards-from-dotenv\nHF_HOME=hf-from-dotenv\n")
    monkeypatch.chdir(tmp_path)
    for name in ("SHARDS_DIR", "HF_HOME"):  # set, then unset: undone after the test either way
        monkeypatch.setenv(name, "placeholder")
        monkeypatch.delenv(name)
    monkeypatch.setenv("HF_HOME", "hf-from-the-environment")
    config = parse_args(["--dataset", "some/dataset"])
    assert config.out == "shards-from-dotenv"
    assert os.environ["HF_HOME"] == "hf-from-the-environment"
    repo = Path(__file__).resolve().parent.parent
    bare = [
        str(path.relative_to(repo))
        for package in ("shard_builder", "trainer")
        for path in (repo / package).rglob("*.py")
        if "load_dotenv()" in path.read_text()
    ]
    assert not bare, f"{bare} call load_dotenv() instead of shard_builder.config.load_dotenv_file"
