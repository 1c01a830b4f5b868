"""A German bench corpus whose sentences never repeat: not between train and test, not within
train. For measuring packed against unpacked training where a packed run's extra utterances are
new speech, not more epochs of the same sentences (the demo's 264 train rows repeat 142
sentences, so any run longer than a few steps there measures memorisation).

Sentence source: Debian's `fortunes-de` (`apt-get install fortunes-de`, installs offline from
the distribution's archive): ~16,000 German quotations, proverbs, jokes and anecdotes in UTF-8
under /usr/share/games/fortunes/de/*.u8. Each fortune is cut into sentences; kept are those of
MIN_WORDS..MAX_WORDS words written in letters and ordinary punctuation only (no digits, quotes,
brackets or ASCII art: espeak-ng would read those in ways no transcript says), deduplicated on
their normalised text. Chosen over Faker's de_DE provider (a few hundred generated sentences
of Lorem-like German) and German text inside PyPI packages (scattered, mostly UI strings).

Speech: espeak-ng, one rendering per sentence. Train voices and test voices are disjoint
(TEST_VOICES are never heard in train), and so are train and test speeds; pitch is drawn at
random. Output: `OUT/data/{train,test}-00000-of-00001.parquet` in the hub dataset's schema
(audio {bytes, path} as FLAC at 16 kHz, transkription, source), ready for
`python -m shard_builder --dataset OUT`. Not shipped in the repository: regenerate it.

    python bench/make_bench_corpus.py --out out/bench-corpus --train 3000 --test 200
"""

from __future__ import annotations

import argparse
import re
import sys
import unicodedata
from pathlib import Path

import numpy as np
from tqdm import tqdm

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

from make_demo_corpus import (  # noqa: E402
    ESPEAK_RATE,
    Encoding,
    Row,
    Utterance,
    encode,
    synthesize,
    write_parquet,
)

FORTUNES = Path("/usr/share/games/fortunes/de")
MIN_WORDS, MAX_WORDS = 5, 16
TRAIN_VOICES = ("de", "de+m1", "de+m2", "de+m3", "de+m5", "de+m6", "de+f1", "de+f2", "de+f3")
TRAIN_VOICES += ("de+f5", "de+klatt", "de+klatt3")
TEST_VOICES = ("de+m4", "de+m7", "de+f4", "de+klatt2")
TRAIN_SPEEDS = (130, 145, 160, 175, 190)
TEST_SPEEDS = (138, 152, 168, 182)
PITCH_RANGE = (35, 65)
ALLOWED = re.compile(r"^[A-Za-zÄÖÜäöüß][A-Za-zÄÖÜäöüß ,.!?;:'\-]*[.!?]$")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-ZÄÖÜ])")
FLAC = Encoding("flac", native_rate=False, stereo=False)


def fortunes(folder: Path = FORTUNES) -> list[str]:
    """Every fortune's text, attribution lines (`-- Name`) dropped, lines joined."""
    files = sorted(folder.glob("*.u8"))
    if not files:
        raise SystemExit(f"no fortunes under {folder}: apt-get install -y fortunes-de")
    texts = []
    for path in files:
        for entry in path.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            lines = [line.strip() for line in entry.splitlines()]
            lines = [line for line in lines if line and not line.startswith("--")]
            texts.append(" ".join(lines))
    return texts


def sentences_of(texts: list[str]) -> list[str]:
    """Distinct clean sentences, in first-seen order; duplicates judged case- and
    punctuation-blind, so "Ja, so ist es." and "ja so ist es" count as one."""
    seen, kept = set(), []
    for text in texts:
        for sentence in SENTENCE_END.split(unicodedata.normalize("NFC", " ".join(text.split()))):
            words = sentence.split()
            if not MIN_WORDS <= len(words) <= MAX_WORDS or not ALLOWED.match(sentence):
                continue
            if sentence.isupper() or "  " in sentence:
                continue
            key = " ".join(re.sub(r"[^\wäöüß ]", "", sentence.lower()).split())
            if key not in seen:
                seen.add(key)
                kept.append(sentence)
    return kept


def plan(sentences: list[str], n_train: int, n_test: int, seed: int):
    """(train, test) utterances: disjoint sentences, voices and speeds."""
    if n_train + n_test > len(sentences):
        raise SystemExit(f"asked for {n_train + n_test} sentences, the source has {len(sentences)}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(sentences))
    chosen = [sentences[i] for i in order[: n_train + n_test]]

    def speak(texts, voices, speeds):
        return [
            Utterance(
                text,
                str(rng.choice(voices)),
                int(rng.choice(speeds)),
                int(rng.integers(*PITCH_RANGE)),
            )
            for text in texts
        ]

    test = speak(chosen[:n_test], TEST_VOICES, TEST_SPEEDS)
    train = speak(chosen[n_test:], TRAIN_VOICES, TRAIN_SPEEDS)
    return train, test


def rows_of(split: str, utterances: list[Utterance]) -> list[Row]:
    rows = []
    for i, utt in enumerate(tqdm(utterances, desc=f"speaking {split}", unit="clip")):
        audio = synthesize(utt)
        source = f"espeak-bench-{utt.voice.replace('+', '-')}"
        rows.append(
            Row(
                encode(audio, FLAC),
                f"bench_{split}_{i:05d}.flac",
                utt.text,
                source,
                len(audio) / ESPEAK_RATE,
            )
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="out/bench-corpus")
    parser.add_argument("--train", type=int, default=3000, help="train utterances")
    parser.add_argument("--test", type=int, default=200, help="test utterances")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    sentences = sentences_of(fortunes())
    print(f"{len(sentences)} distinct sentences of {MIN_WORDS}-{MAX_WORDS} words in fortunes-de")
    train, test = plan(sentences, args.train, args.test, args.seed)
    assert not {u.text for u in train} & {u.text for u in test}
    out = Path(args.out)
    for split, utterances in (("test", test), ("train", train)):
        rows = rows_of(split, utterances)
        write_parquet(rows, out / "data" / f"{split}-00000-of-00001.parquet")
        hours = sum(r.seconds for r in rows) / 3600
        words = sum(len(r.text.split()) for r in rows)
        print(f"{split}: {len(rows)} utterances, {words} words, {hours:.2f} h of audio")
    return 0


if __name__ == "__main__":
    sys.exit(main())
