"""Where input rows come from: a hub dataset, a local parquet folder, or a saved `datasets` folder.

Every source answers the same three questions — which columns exist, how many rows a split has,
and the rows in a range `[start, stop)` — so that shards can be planned by row index before any
audio is decoded, and each worker reads only its own rows. Hub datasets are read through the
hub's file system straight from their parquet files, so nothing is downloaded whole.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

# Layouts of parquet files, relative to the dataset root, tried in this order.
PARQUET_PATTERNS = (
    "data/{split}-*.parquet",
    "data/{split}/*.parquet",
    "{split}/*.parquet",
    "{split}-*.parquet",
    "**/{split}-*.parquet",
)


@dataclass(frozen=True)
class Row:
    row_id: int  # index of the row within its split, the identity recorded in shards and rejects
    audio_bytes: bytes | None
    audio_path: str | None
    text: str | None
    source: str | None


@dataclass(frozen=True)
class Columns:
    audio: str = "audio"
    text: str = "transkription"
    source: str = "source"


class MissingColumnError(ValueError):
    pass


def check_columns(available: list[str], columns: Columns, where: str) -> None:
    for role, name in (("audio", columns.audio), ("text", columns.text)):
        if name not in available:
            raise MissingColumnError(
                f"{where} has no {role} column {name!r}; its columns are: "
                f"{', '.join(available)}. Pick one with --{role}-column."
            )


class ParquetSource:
    """Parquet files of one dataset, on local disk or on the hub (through fsspec)."""

    def __init__(self, root: str, filesystem: Any, identity: dict[str, Any], columns: Columns):
        self.root = root
        self.fs = filesystem
        self.identity = identity
        self.columns = columns
        self._files: dict[str, list[tuple[str, int]]] = {}
        self._footers: dict[str, pq.FileMetaData] = {}

    def files(self, split: str) -> list[tuple[str, int]]:
        """The split's parquet files in name order, each with its row count from the footer."""
        if split not in self._files:
            for pattern in PARQUET_PATTERNS:
                found = sorted(self.fs.glob(posixpath.join(self.root, pattern.format(split=split))))
                if found:
                    break
            else:
                raise FileNotFoundError(
                    f"no parquet files for split {split!r} under {self.root} "
                    f"(looked for {', '.join(p.format(split=split) for p in PARQUET_PATTERNS)})"
                )
            self._files[split] = [(path, self._metadata(path).num_rows) for path in found]
        return self._files[split]

    def _metadata(self, path: str) -> pq.FileMetaData:
        # Kept: on the hub every footer costs a few HTTP range requests.
        if path not in self._footers:
            with self.fs.open(path, "rb") as handle:
                self._footers[path] = pq.ParquetFile(handle).metadata
        return self._footers[path]

    def column_names(self, split: str) -> list[str]:
        return list(self.schema(split).names)

    def schema(self, split: str):
        """The arrow schema of the split's first file, read from its footer."""
        return self._metadata(self.files(split)[0][0]).schema.to_arrow_schema()

    def row_groups(self, split: str) -> list[tuple[int, int]]:
        """`[start, stop)` row ranges of the split's row groups in row order, from the footers."""
        ranges, offset = [], 0
        for path, _ in self.files(split):
            metadata = self._metadata(path)
            for group in range(metadata.num_row_groups):
                rows = metadata.row_group(group).num_rows
                ranges.append((offset, offset + rows))
                offset += rows
        return ranges

    def num_rows(self, split: str) -> int:
        return sum(count for _, count in self.files(split))

    def rows(self, split: str, start: int, stop: int) -> Iterator[Row]:
        wanted = [self.columns.audio, self.columns.text]
        has_source = self.columns.source in self.column_names(split)
        if has_source:
            wanted.append(self.columns.source)
        offset = 0
        for path, count in self.files(split):
            if offset + count > start and offset < stop:
                yield from self._rows_of_file(path, offset, start, stop, wanted, has_source)
            offset += count

    def _rows_of_file(self, path, offset, start, stop, wanted, has_source) -> Iterator[Row]:
        with self.fs.open(path, "rb") as handle:
            parquet = pq.ParquetFile(handle, metadata=self._metadata(path))
            for group in range(parquet.num_row_groups):
                group_rows = parquet.metadata.row_group(group).num_rows
                if offset + group_rows > start and offset < stop:
                    table = parquet.read_row_group(group, columns=wanted)
                    first = max(start - offset, 0)
                    last = min(stop - offset, group_rows)
                    yield from self._to_rows(
                        table.slice(first, last - first), offset + first, has_source
                    )
                offset += group_rows
                if offset >= stop:
                    return

    def _to_rows(self, table, first_id: int, has_source: bool) -> Iterator[Row]:
        audio = table.column(self.columns.audio).to_pylist()
        texts = table.column(self.columns.text).to_pylist()
        sources = table.column(self.columns.source).to_pylist() if has_source else None
        for i, (clip, text) in enumerate(zip(audio, texts, strict=True)):
            yield make_row(first_id + i, clip, text, sources[i] if sources else None)


class SavedDatasetSource:
    """A folder written by `datasets.Dataset(Dict).save_to_disk`, read without decoding audio."""

    def __init__(self, path: str, columns: Columns) -> None:
        import datasets

        self.path = path
        self.columns = columns
        loaded = datasets.load_from_disk(path)
        self.splits = loaded if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
        self.identity = {"dataset": Path(path).name, "revision": None, "kind": "saved_datasets"}

    def _split(self, split: str):
        import datasets

        if split not in self.splits:
            raise FileNotFoundError(f"{self.path} has no split {split!r}: {sorted(self.splits)}")
        dataset = self.splits[split]
        if isinstance(dataset.features.get(self.columns.audio), datasets.Audio):
            dataset = dataset.cast_column(self.columns.audio, datasets.Audio(decode=False))
        return dataset

    def column_names(self, split: str) -> list[str]:
        return list(self._split(split).column_names)

    def schema(self, split: str):
        return self._split(split).features.arrow_schema

    def num_rows(self, split: str) -> int:
        return len(self._split(split))

    def rows(self, split: str, start: int, stop: int) -> Iterator[Row]:
        batch = self._split(split)[start:stop]
        sources = batch.get(self.columns.source)
        for i, (clip, text) in enumerate(
            zip(batch[self.columns.audio], batch[self.columns.text], strict=True)
        ):
            yield make_row(start + i, clip, text, sources[i] if sources else None)


def make_row(row_id: int, clip: Any, text: Any, source: Any) -> Row:
    if isinstance(clip, dict):
        data, path = clip.get("bytes"), clip.get("path")
        if data is None and path and Path(path).is_file():
            data = Path(path).read_bytes()  # datasets keeps local audio as paths, not bytes
    else:
        data, path = clip, None
    return Row(row_id, data, path, text, None if source is None else str(source))


def open_source(dataset: str, revision: str | None, columns: Columns):
    """A local parquet folder, a saved `datasets` folder, or else a hub dataset id."""
    local = Path(dataset).expanduser()
    if local.is_dir():
        if (local / "dataset_dict.json").is_file() or (local / "dataset_info.json").is_file():
            return SavedDatasetSource(str(local), columns)
        import fsspec

        identity = {"dataset": local.resolve().name, "revision": None, "kind": "parquet_folder"}
        return ParquetSource(str(local.resolve()), fsspec.filesystem("file"), identity, columns)
    if local.exists() or dataset.startswith((".", "/", "~")):
        raise FileNotFoundError(f"--dataset {dataset!r} is not a folder")
    from huggingface_hub import HfApi, HfFileSystem

    sha = HfApi().dataset_info(dataset, revision=revision).sha  # pin the exact commit read
    identity = {"dataset": dataset, "revision": sha, "kind": "hub"}
    return ParquetSource(f"datasets/{dataset}@{sha}", HfFileSystem(), identity, columns)
