"""Regenerate the tiny Whisper preset config/models/tiny-whisper-de/ (no weights).

The tokenizer is a byte-level BPE learned from demo/sentences_de.txt, padded with filler
tokens so that every special token sits at the id it has in OpenAI's multilingual Whisper
(<|endoftext|> 50257 ... <|notimestamps|> 50363) and the model's vocabulary has 51865 entries.
Tools that tell a multilingual Whisper from an English-only one by these ids or by the
vocabulary size (Hugging Face generate, CTranslate2, faster-whisper) then treat the tiny model
like a real one. The trainer initialises the weights from config.json with a fixed seed.

Usage: python scripts/make_tiny_model.py [--sentences demo/sentences_de.txt]
                                         [--out config/models/tiny-whisper-de]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import GenerationConfig, WhisperConfig, WhisperFeatureExtractor

# OpenAI Whisper's language codes in token order: <|en|> is 50259, <|de|> 50261, ...
_LANGUAGE_CODES = (
    "en zh de es ru ko fr ja pt tr pl ca nl ar sv it id hi fi vi he uk el ms cs ro da hu ta no "
    "th ur hr bg lt la mi ml cy sk te fa lv bn sr az sl kn et mk br eu is hy ne mn bs kk sq sw "
    "gl mr pa si km sn yo so af oc ka be tg sd gu am yi lo uz fo ht ps tk nn mt sa lb my bo tl "
    "mg as tt haw ln ha ba jw su"
)
LANGUAGES = _LANGUAGE_CODES.split()
ENDOFTEXT_ID = 50257  # the first special id: the BPE vocabulary is ids 0..50256
TASK_TOKENS = ("translate", "transcribe", "startoflm", "startofprev", "nocaptions", "notimestamps")
VOCAB_SIZE = 51865  # model vocabulary: tokenizer ids 0..50363 plus 1501 timestamp ids
BPE_VOCAB_SIZE = 1000  # 256 byte tokens + learned merges
BPE_MIN_FREQUENCY = 2
FILLER = "<|filler_{}|>"

# Merges a real Whisper vocabulary has and that tools rely on, as (left, right) UTF-8 bytes:
# faster-whisper suppresses the first token of " -", " '", "♪" and " ♪" (U+2640..U+267F share
# their first two UTF-8 bytes). Without these merges that first token would be the bare space
# (or the lead byte that "€", "„" and "“" share), and suppressing it would cripple decoding.
EXTRA_MERGES = ((b" ", b"-"), (b" ", b"'"), (b"\xe2", b"\x99"), (b" ", b"\xe2\x99"))

# Same symbols as OpenAI's `non_speech_tokens` (whisper/tokenizer.py), for suppress_tokens.
NON_SPEECH_SYMBOLS = list('"#()*+/:;<=>@[\\]^_`{|}~「」『』') + (
    "<< >> <<< >>> -- --- -( -[ (' (\" (( )) ((( ))) [[ ]] {{ }} ♪♪ ♪♪♪".split()  # noqa: SIM905
)
MISC_SYMBOLS = "♩♪♫♬♭♮♯"


def special_tokens() -> list[str]:
    return (
        ["<|endoftext|>", "<|startoftranscript|>"]
        + [f"<|{code}|>" for code in LANGUAGES]
        + [f"<|{task}|>" for task in TASK_TOKENS]
    )


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def learn_bpe(sentences: list[str]) -> tuple[dict[str, int], list[list[str]]]:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=BPE_MIN_FREQUENCY,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(sentences, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    vocab: dict[str, int] = model["vocab"]
    merges = [m.split(" ") if isinstance(m, str) else list(m) for m in model["merges"]]
    assert sorted(vocab.values()) == list(range(len(vocab)))

    byte_char = bytes_to_unicode()
    for left_bytes, right_bytes in EXTRA_MERGES:
        left, right = ("".join(byte_char[b] for b in t) for t in (left_bytes, right_bytes))
        if left + right not in vocab:
            merges.append([left, right])
            vocab[left + right] = len(vocab)
    return vocab, merges


def tokenizer_json(vocab: dict[str, int], merges: list[list[str]]) -> dict:
    """A tokenizer.json laid out like Hugging Face's multilingual Whisper tokenizers."""
    if len(vocab) >= ENDOFTEXT_ID - 1:
        raise ValueError(f"learned vocabulary ({len(vocab)}) does not fit below {ENDOFTEXT_ID}")
    full_vocab = dict(vocab)
    for i in range(len(vocab), ENDOFTEXT_ID - 1):
        full_vocab[FILLER.format(i)] = i
    # OpenAI's multilingual vocabulary holds an empty token at 50256 (the English-only one has
    # <|endoftext|> there); CTranslate2 >= 4.7 calls a model multilingual only when it exists.
    full_vocab[""] = ENDOFTEXT_ID - 1
    full_vocab["<|endoftext|>"] = ENDOFTEXT_ID
    added = [
        {
            "id": ENDOFTEXT_ID + i,
            "content": token,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i, token in enumerate(special_tokens())
    ]

    def special(token: str) -> dict:
        return {"SpecialToken": {"id": token, "type_id": 0}}

    ids = {t: ENDOFTEXT_ID + i for i, t in enumerate(special_tokens())}
    sot, eot, nts = "<|startoftranscript|>", "<|endoftext|>", "<|notimestamps|>"
    byte_level = {"add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", **byte_level},
        # transformers rewrites this at load time from the language and task it is given.
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [special(sot), special(nts), {"Sequence": {"id": "A", "type_id": 0}}]
            + [special(eot)],
            "pair": [special(sot), special(nts), {"Sequence": {"id": "A", "type_id": 0}}]
            + [
                {"Sequence": {"id": "B", "type_id": 1}},
                {"SpecialToken": {"id": eot, "type_id": 1}},
            ],
            "special_tokens": {
                t: {"id": t, "ids": [ids[t]], "tokens": [t]} for t in (eot, nts, sot)
            },
        },
        "decoder": {"type": "ByteLevel", **byte_level, "add_prefix_space": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": full_vocab,
            "merges": merges,
        },
    }


def tokenizer_config() -> dict:
    return {
        "tokenizer_class": "WhisperTokenizer",
        "backend": "tokenizers",
        "processor_class": "WhisperProcessor",
        "add_prefix_space": False,
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        # Without this list transformers 5 sees only <|endoftext|> as special and places the
        # first timestamp at all_special_ids[-1] + 1 = 50258, so decode_with_timestamps and
        # output_offsets read <|startoftranscript|><|de|>... as timestamps. The 4.x name, which
        # transformers 5 still reads: 4.x takes `extra_special_tokens` for a dict and fails on a
        # list.
        "additional_special_tokens": special_tokens()[1:],
        "language": None,
        "task": None,
        "predict_timestamps": False,
        "model_max_length": 448,
    }


def non_speech_tokens(tok: Tokenizer) -> list[int]:
    """OpenAI's `non_speech_tokens` rule, applied to this vocabulary."""

    def encode(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False).ids

    result = {encode(" -")[0], encode(" '")[0]}
    for symbol in NON_SPEECH_SYMBOLS + list(MISC_SYMBOLS):
        for ids in (encode(symbol), encode(" " + symbol)):
            if len(ids) == 1 or symbol in MISC_SYMBOLS:
                result.add(ids[0])
    return sorted(result)


# The encoder's window. Released Whispers hear 30 s (1500 positions); every demo clip is under
# 5 s, and a 5 s window makes each training step ~4x cheaper on the CPU, which is what lets the
# randomly initialised preset learn the demo's acoustics within minutes (docs/training.md).
WINDOW_SECONDS = 5


def model_config(space_id: int) -> WhisperConfig:
    return WhisperConfig(
        vocab_size=VOCAB_SIZE,
        num_mel_bins=80,
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=256,
        decoder_ffn_dim=256,
        max_source_positions=WINDOW_SECONDS * 50,  # 2 log-mel frames per position, 100 per s
        max_target_positions=448,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        encoder_layerdrop=0.0,
        decoder_layerdrop=0.0,
        apply_spec_augment=False,
        mask_time_prob=0.0,
        bos_token_id=ENDOFTEXT_ID,
        eos_token_id=ENDOFTEXT_ID,
        pad_token_id=ENDOFTEXT_ID,
        decoder_start_token_id=ENDOFTEXT_ID + 1,
        begin_suppress_tokens=[space_id, ENDOFTEXT_ID],
        suppress_tokens=None,
        tie_word_embeddings=True,
        architectures=["WhisperForConditionalGeneration"],
        dtype="float32",
    )


def generation_config(tok: Tokenizer) -> GenerationConfig:
    ids = {t: ENDOFTEXT_ID + i for i, t in enumerate(special_tokens())}
    task_suppress = [
        ids[t]
        for t in (
            "<|startoftranscript|>",
            "<|translate|>",
            "<|transcribe|>",
            "<|startoflm|>",
            "<|startofprev|>",
            "<|nocaptions|>",
        )
    ]
    return GenerationConfig(
        bos_token_id=ENDOFTEXT_ID,
        eos_token_id=ENDOFTEXT_ID,
        pad_token_id=ENDOFTEXT_ID,
        decoder_start_token_id=ids["<|startoftranscript|>"],
        max_length=448,
        is_multilingual=True,
        lang_to_id={f"<|{c}|>": ids[f"<|{c}|>"] for c in LANGUAGES},
        task_to_id={"translate": ids["<|translate|>"], "transcribe": ids["<|transcribe|>"]},
        no_timestamps_token_id=ids["<|notimestamps|>"],
        begin_suppress_tokens=[tok.token_to_id("Ġ"), ENDOFTEXT_ID],
        suppress_tokens=non_speech_tokens(tok) + task_suppress,
        # Cross-attention heads of the last half of the decoder, CTranslate2's own default.
        alignment_heads=[[1, h] for h in range(4)],
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--sentences",
        type=Path,
        default=Path("demo/sentences_de.txt"),
        help="text the byte-level BPE is learned from (one sentence per line, # = comment)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("config/models/tiny-whisper-de"),
        help="preset folder to (re)write",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    lines = args.sentences.read_text(encoding="utf-8").splitlines()
    sentences = [s.strip() for s in lines if s.strip() and not s.startswith("#")]
    vocab, merges = learn_bpe(sentences)
    tok_json = tokenizer_json(vocab, merges)
    tok = Tokenizer.from_str(json.dumps(tok_json))

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(
        json.dumps(tok_json, ensure_ascii=False, separators=(",", ":")) + "\n", encoding="utf-8"
    )
    (out / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config(), indent=2) + "\n", encoding="utf-8"
    )
    model_config(tok.token_to_id("Ġ")).save_pretrained(out)
    generation_config(tok).save_pretrained(out)
    # preprocessor_config.json is what faster-whisper reads for the mel bins and window;
    # processor_config.json is what transformers 5's WhisperProcessor writes and reads.
    extractor = WhisperFeatureExtractor(feature_size=80, chunk_length=WINDOW_SECONDS)
    extractor.save_pretrained(out)
    processor = {"feature_extractor": extractor.to_dict(), "processor_class": "WhisperProcessor"}
    (out / "processor_config.json").write_text(
        json.dumps(processor, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    print(
        f"{out}: {len(vocab)} learned tokens ({len(merges)} merges), "
        f"{ENDOFTEXT_ID - 1 - len(vocab)} fillers, "
        f"special ids {ENDOFTEXT_ID}..{tok.get_vocab_size() - 1}, "
        f"model vocabulary {VOCAB_SIZE}"
    )


if __name__ == "__main__":
    main()
