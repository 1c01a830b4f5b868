"""The bundled demo corpus and the tiny Whisper preset: schema, bad rows, tokenizer, ids.

Offline and fast. The CTranslate2 check runs only where ctranslate2 and faster-whisper are
installed (the `export` extra).
"""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from tests.conftest import set_window

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "demo" / "corpus" / "data"
SENTENCES = REPO / "demo" / "sentences_de.txt"
TINY_MODEL = REPO / "config" / "models" / "tiny-whisper-de"
SOURCES = {"espeak-demo-male", "espeak-demo-female", "espeak-demo-klatt"}
# (number of rows, number of bad rows after the good ones)
SPLITS = {"train": (272, 4), "test": (62, 2)}
N_GOOD = {"train": 264, "test": 60}
LONG_ROWS = json.loads((REPO / "demo" / "corpus" / "long_rows.json").read_text(encoding="utf-8"))

SPECIAL_IDS = {
    "<|endoftext|>": 50257,
    "<|startoftranscript|>": 50258,
    "<|en|>": 50259,
    "<|zh|>": 50260,
    "<|de|>": 50261,
    "<|su|>": 50357,
    "<|translate|>": 50358,
    "<|transcribe|>": 50359,
    "<|startoflm|>": 50360,
    "<|startofprev|>": 50361,
    "<|nocaptions|>": 50362,
    "<|notimestamps|>": 50363,
}


def sentences() -> list[str]:
    return [s for s in SENTENCES.read_text(encoding="utf-8").splitlines() if s.strip()]


def rows(split: str) -> list[dict]:
    return pq.read_table(DATA / f"{split}-00000-of-00001.parquet").to_pylist()


def decode(audio_bytes: bytes) -> tuple[np.ndarray, int]:
    return sf.read(io.BytesIO(audio_bytes), dtype="float32", always_2d=True)


# --- demo corpus -------------------------------------------------------------------------


@pytest.mark.parametrize("split", SPLITS)
def test_parquet_has_the_hub_schema(split):
    schema = pq.read_schema(DATA / f"{split}-00000-of-00001.parquet")
    audio = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    assert schema.names == ["audio", "transkription", "source"]
    assert schema.field("audio").type == audio
    assert schema.field("transkription").type == pa.string()
    assert schema.field("source").type == pa.string()
    features = json.loads(schema.metadata[b"huggingface"])["info"]["features"]
    assert features["audio"]["_type"] == "Audio"
    assert features["transkription"] == {"dtype": "string", "_type": "Value"}


def test_datasets_loads_it_like_the_hub_dataset():
    datasets = pytest.importorskip("datasets")
    files = {s: str(DATA / f"{s}-00000-of-00001.parquet") for s in SPLITS}
    ds = datasets.load_dataset("parquet", data_files=files)
    for split, (n_rows, _) in SPLITS.items():
        part = ds[split].cast_column("audio", datasets.Audio(decode=False))
        assert part.num_rows == n_rows
        first = part[0]
        assert set(first) == {"audio", "transkription", "source"}
        assert isinstance(first["audio"]["bytes"], bytes) and first["audio"]["path"]


@pytest.mark.parametrize("split", SPLITS)
def test_good_rows_decode_and_cover_the_encodings(split):
    good = rows(split)[: N_GOOD[split]]
    known = set(sentences())
    rates, channels, suffixes = set(), set(), set()
    for row in good:
        audio, rate = decode(row["audio"]["bytes"])
        assert 0.5 < len(audio) / rate < 30, row["audio"]["path"]
        assert row["transkription"] in known
        assert row["source"] in SOURCES
        rates.add(rate)
        channels.add(audio.shape[1])
        suffixes.add(row["audio"]["path"].rsplit(".", 1)[1])
    assert rates == {16000, 22050}
    assert channels == {1, 2}
    assert suffixes == {"ogg", "flac", "wav"}
    assert {row["source"] for row in good} == SOURCES


def test_train_has_the_four_bad_rows_after_the_good_ones():
    corrupt, empty_text, too_long, no_frames = rows("train")[264:268]
    with pytest.raises(sf.LibsndfileError):
        decode(corrupt["audio"]["bytes"])
    assert corrupt["transkription"]

    assert empty_text["transkription"] == ""
    assert len(decode(empty_text["audio"]["bytes"])[0]) > 0

    audio, rate = decode(too_long["audio"]["bytes"])
    assert len(audio) / rate > 30 and too_long["transkription"]

    info = sf.info(io.BytesIO(no_frames["audio"]["bytes"]))
    assert info.format == "WAV" and info.frames == 0 and no_frames["transkription"]


def test_test_ends_with_the_two_bad_rows():
    corrupt, empty_text = rows("test")[-2:]
    with pytest.raises(sf.LibsndfileError):
        decode(corrupt["audio"]["bytes"])
    assert empty_text["transkription"] == ""
    assert len(decode(empty_text["audio"]["bytes"])[0]) > 0


def test_train_ends_with_long_rows_whose_joints_are_known():
    """Utterances of train sentences joined by silences, 31-55 s: the builder splits them."""
    train = rows("train")
    assert [r["row"] for r in LONG_ROWS] == list(range(268, 272)) and len(train) == 272
    known = set(sentences())
    for long_row in LONG_ROWS:
        row = train[long_row["row"]]
        assert row["audio"]["path"] == long_row["path"]
        assert row["transkription"] == " ".join(long_row["texts"])
        assert set(long_row["texts"]) <= known
        audio, rate = decode(row["audio"]["bytes"])
        assert rate == 16000 and 31 <= len(audio) / rate <= 55
        assert abs(len(audio) / rate - long_row["seconds"]) < 1e-3
        assert len(long_row["pauses"]) == len(long_row["texts"]) - 1
        for start, stop in long_row["pauses"]:
            assert stop - start >= 0.4  # at least the joint's silence
            silence = audio[round(start * rate) + 800 : round(stop * rate) - 800, 0]
            assert np.abs(silence).max() < 0.01  # Vorbis rings faintly 50 ms into it


def test_split_design_mostly_seen_sentences_plus_a_few_unseen():
    train = {r["transkription"] for r in rows("train")[:264]}
    test = [r["transkription"] for r in rows("test")[:-2]]
    unseen = [t for t in test if t not in train]
    assert len(test) == 60 and len(unseen) == 10


def test_demo_folder_stays_small():
    size = sum(p.stat().st_size for p in (REPO / "demo").rglob("*") if p.is_file())
    assert size < 15e6


# --- tiny Whisper preset -----------------------------------------------------------------


@pytest.fixture(scope="module")
def processor():
    from transformers import WhisperProcessor

    return WhisperProcessor.from_pretrained(TINY_MODEL, language="de", task="transcribe")


def test_preset_ships_no_weights():
    names = {p.name for p in TINY_MODEL.iterdir()}
    assert not names & {"model.safetensors", "pytorch_model.bin"}
    assert sum(p.stat().st_size for p in TINY_MODEL.iterdir()) < 3e6


def test_preset_configs_load_offline():
    from transformers import GenerationConfig, WhisperConfig

    config = WhisperConfig.from_pretrained(TINY_MODEL)
    assert config.vocab_size == 51865 and config.num_mel_bins == 80
    assert (config.encoder_layers, config.decoder_layers) == (2, 2)
    assert config.decoder_start_token_id == 50258
    assert config.eos_token_id == config.pad_token_id == config.bos_token_id == 50257
    assert config.dropout == 0.0 and str(config.dtype).removeprefix("torch.") == "float32"

    gen = GenerationConfig.from_pretrained(TINY_MODEL)
    assert gen.is_multilingual and gen.no_timestamps_token_id == 50363
    assert gen.decoder_start_token_id == 50258 and gen.max_length == 448
    assert gen.task_to_id == {"translate": 50358, "transcribe": 50359}
    assert len(gen.lang_to_id) == 99
    for token, token_id in SPECIAL_IDS.items():
        if token in gen.lang_to_id:
            assert gen.lang_to_id[token] == token_id
    for layer, head in gen.alignment_heads:
        assert 0 <= layer < config.decoder_layers and 0 <= head < config.decoder_attention_heads


def test_tokenizer_special_ids_match_multilingual_whisper(processor):
    tok = processor.tokenizer
    assert type(tok).__name__ == "WhisperTokenizer"
    assert len(tok) == 50364
    for token, token_id in SPECIAL_IDS.items():
        assert tok.convert_tokens_to_ids(token) == token_id
    vocab = tok.get_vocab()
    assert sorted(vocab.values()) == list(range(50364))
    # CTranslate2 >= 4.7 calls a Whisper multilingual only if this empty token exists.
    assert vocab[""] == 50256
    # Timestamps start right after the last special token, as in OpenAI's tokenizer.
    assert tok.all_special_ids[-1] == 50363


def test_tokenizer_prefix_and_round_trip(processor):
    tok = processor.tokenizer
    ids = tok("Grüß Gott.").input_ids
    assert ids[:4] == [50258, 50261, 50359, 50363] and ids[-1] == 50257
    for sentence in sentences() + ["Größe, Maße und 5 € – „Anführungszeichen“?"]:
        ids = tok(sentence).input_ids
        assert max(ids[4:-1]) < 50256, "the BPE must never produce fillers or specials"
        assert tok.decode(ids, skip_special_tokens=True) == sentence


def test_decode_with_timestamps(processor):
    tok = processor.tokenizer
    ids = [50258, 50261, 50359, 50364] + tok("Hallo", add_special_tokens=False).input_ids
    text = tok.decode(ids + [50414, 50257], decode_with_timestamps=True)
    assert text == "<|startoftranscript|><|de|><|transcribe|><|0.00|>Hallo<|1.00|><|endoftext|>"


def test_suppress_lists_hold_real_symbol_tokens(processor):
    from transformers import GenerationConfig

    tok = processor.tokenizer
    gen = GenerationConfig.from_pretrained(TINY_MODEL)
    space = tok.convert_tokens_to_ids("Ġ")
    assert gen.begin_suppress_tokens == [space, 50257]
    assert space not in gen.suppress_tokens
    assert {50258, 50358, 50359, 50360, 50361, 50362} <= set(gen.suppress_tokens)
    symbols = {tok.decode([i]) for i in gen.suppress_tokens if i < 50256}
    assert {'"', "#", "(", " -", " '"} <= symbols and not symbols & set("abcäöüß.,?!")


def test_random_model_from_preset_generates(processor):
    import torch
    from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(WhisperConfig.from_pretrained(TINY_MODEL)).eval()
    model.generation_config = GenerationConfig.from_pretrained(TINY_MODEL)
    audio = np.zeros(16000, dtype=np.float32)
    features = processor(audio, sampling_rate=16000, return_tensors="pt").input_features
    assert features.shape == (1, 80, 500)  # the preset's 5 s window
    labels = processor.tokenizer("Guten Morgen.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(input_features=features, labels=labels).loss)
        out = model.generate(features, language="de", task="transcribe", max_new_tokens=3)
    assert out.shape[0] == 1


def test_make_tiny_model_script_regenerates_a_loadable_preset(tmp_path):
    from transformers import WhisperProcessor

    spec = importlib.util.spec_from_file_location(
        "make_tiny_model", REPO / "scripts/make_tiny_model.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--out", str(tmp_path), "--sentences", str(SENTENCES)])
    tok = WhisperProcessor.from_pretrained(tmp_path, language="de").tokenizer
    for token, token_id in SPECIAL_IDS.items():
        assert tok.convert_tokens_to_ids(token) == token_id
    committed = json.loads((TINY_MODEL / "tokenizer.json").read_text(encoding="utf-8"))
    fresh = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    assert fresh["added_tokens"] == committed["added_tokens"]
    # The committed tokenizer_config.json is the script's, and transformers 4.x (the floor,
    # scripts/ci_min_versions.sh) loads it: 4.x fails on a list under extra_special_tokens.
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config == json.loads((TINY_MODEL / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert "extra_special_tokens" not in config


@pytest.mark.slow
def test_ctranslate2_treats_preset_as_multilingual_whisper(tmp_path, processor):
    ctranslate2 = pytest.importorskip("ctranslate2")
    faster_whisper = pytest.importorskip("faster_whisper")
    import torch
    from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    config = WhisperConfig.from_pretrained(TINY_MODEL, max_source_positions=1500)
    model = WhisperForConditionalGeneration(config)
    model.generation_config = GenerationConfig.from_pretrained(TINY_MODEL)
    hf_dir, ct2_dir = tmp_path / "hf", tmp_path / "ct2"
    model.save_pretrained(hf_dir)
    processor.save_pretrained(hf_dir)
    # transformers 5 writes only processor_config.json; faster-whisper reads this file.
    processor.feature_extractor.save_pretrained(hf_dir)
    # faster-whisper's transcribe() feeds 3000-frame windows only: the preset's layout (vocabulary,
    # special ids) is what is under test here, with Whisper's 30 s window.
    set_window(hf_dir, 30)
    # What `ct2-transformers-converter --copy_files tokenizer.json preprocessor_config.json` does.
    ctranslate2.converters.TransformersConverter(
        str(hf_dir), copy_files=["tokenizer.json", "preprocessor_config.json"]
    ).convert(str(ct2_dir))

    fw = faster_whisper.WhisperModel(str(ct2_dir), device="cpu", compute_type="float32")
    assert fw.model.is_multilingual
    audio, rate = decode(rows("test")[0]["audio"]["bytes"])
    if rate != 16000:
        import soxr

        audio = soxr.resample(audio, rate, 16000)
    segments, info = fw.transcribe(
        audio.mean(axis=1), language="de", beam_size=1, without_timestamps=True, max_new_tokens=4
    )
    list(segments)
    assert info.language == "de"
