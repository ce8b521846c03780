"""Mix paths as `datasets` lays them out: one file, a `save_to_disk` folder, a folder of data files.

A folder of data files (verl's ``data/{gsm8k,math}/{train,test}.parquet``, one Parquet file per
data source, a hub snapshot's ``data/train-00000-of-00002.parquet``) is split by its file and
folder names exactly as ``datasets.load_dataset(folder)`` splits it (`datasets.data_files`):
files whose names carry no split word all belong to ``train``. A folder written by
``DatasetDict.save_to_disk`` holds its splits by name. The ``train`` split is read unless
another is chosen (``--split``, a mix spec's ``split`` key); a folder with one split reads it.

Every file is read on its own, so files with different columns or conventions may share a
folder, and rows without a task column belong to a task named after their file's path in the
folder without the split words (``gsm8k/train.parquet`` and ``gsm8k_train.parquet`` -> ``gsm8k``;
a hub snapshot's ``data/train-00000-of-00002.parquet`` -> the folder's name). A dataset saved
with splits is one task named after its folder, also when MIX is one split's folder in it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradprobe.errors import UserInputError
from gradprobe.mix.loading import SUFFIXES, FORMATS, first_line, load_table

TRAIN = "train"
_SHARD = re.compile(r"[-._ ]?\d+-of-\d+$")  # datasets' shard suffix: train-00000-of-00002


class SplitError(UserInputError):
    """The split asked for is not there, or none was asked for and ``train`` is not there."""


@dataclass(frozen=True)
class TablePart:
    """One table of a mix path: its rows, the file it came from and the task its rows default to.

    `label` names it in messages and in the mix's sources (a file, or ``folder[split]``);
    `path` is the file or folder read (None for a hub dataset); `split` the split it belongs to
    (None for a single file).
    """

    table: Any  # datasets.Dataset
    label: str
    format: str
    task: str
    path: Path | None = None
    split: str | None = None


def is_saved_dataset(path: Path) -> bool:
    """Whether a folder was written by ``save_to_disk`` (a Dataset, or a DatasetDict of splits)."""
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def folder_name(path: Path) -> str:
    """A folder's own name, also for ``.`` or a trailing slash."""
    return Path(path).resolve().name


def choose_split(available: list[str], wanted: str | None, label: str, how: str = "--split") -> str:
    """`wanted`, else ``train``, else the only split; a `SplitError` naming the splits otherwise."""
    if wanted is not None:
        if wanted not in available:
            raise SplitError(f"{label}: no split {wanted!r}; it holds {', '.join(available)} "
                             f"(choose one with {how})")
        return wanted
    if TRAIN in available:
        return TRAIN
    if len(available) == 1:
        return available[0]
    raise SplitError(f"{label}: holds splits {', '.join(available)} and none is {TRAIN!r}; "
                     f"choose one with {how}")


def read_parts(path: Path, split: str | None = None, how: str = "--split") -> list[TablePart]:
    """The tables a mix path holds: a file's, a saved dataset's split, or a data folder's files.

    `how` says how a user chooses a split, for messages (``--split``, a spec's key).
    """
    path = Path(path)
    if not path.exists():
        raise UserInputError(f"{path}: no such file or directory")
    if not path.is_dir():
        if split is not None:
            raise SplitError(f"{path}: {how} applies to folders with splits and hub datasets; "
                             "this is one file")
        return [TablePart(load_table(path), str(path), SUFFIXES.get(path.suffix.lower(), "?"),
                          path.stem, path)]
    if is_saved_dataset(path):
        return [_saved_dataset_part(path, split, how)]
    return _data_folder_parts(path, split, how)


def _saved_dataset_part(path: Path, split: str | None, how: str) -> TablePart:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise UserInputError(f"{path}: cannot read this folder saved by datasets ({first_line(exc)})") from None
    if isinstance(loaded, datasets.DatasetDict):
        chosen = choose_split(list(loaded), split, str(path), how)
        return TablePart(loaded[chosen], f"{path}[{chosen}]", "datasets-dir", folder_name(path), path,
                         chosen)
    if split is not None:
        raise SplitError(f"{path}: {how} applies to folders with splits; this folder saved one "
                         "dataset")
    parent = path.resolve().parent
    if (parent / "dataset_dict.json").is_file():  # one split's folder: the task is the dataset
        return TablePart(loaded, str(path), "datasets-dir", parent.name, path, path.resolve().name)
    return TablePart(loaded, str(path), "datasets-dir", folder_name(path), path)


def split_files(path: Path) -> dict[str, list[Path]]:
    """A data folder's files by split, as ``datasets.load_dataset(folder)`` resolves them.

    Files of other types than gradprobe reads (a README, a .gitattributes) are left out.
    """
    from datasets.data_files import DataFilesDict, EmptyDatasetError, get_data_patterns

    try:
        resolved = DataFilesDict.from_patterns(get_data_patterns(str(path)), base_path=str(path))
    except EmptyDatasetError:
        resolved = {}
    base = path.resolve()  # datasets gives absolute paths; keep them under `path` as given
    by_split = {str(split): [path / Path(f).resolve().relative_to(base) for f in files
                             if Path(f).suffix.lower() in SUFFIXES]
                for split, files in resolved.items()}
    return {split: sorted(files) for split, files in by_split.items() if files}


def unsplit_notes(path: Path) -> list[str]:
    """A note naming a data folder's files in no split: once some names carry split words,
    datasets reads only files whose names do (``gsm8k_train.parquet``), leaving ``math.parquet``."""
    listed = {f for files in split_files(path).values() for f in files}
    left_out = sorted(f for f in path.rglob("*") if f.suffix.lower() in SUFFIXES and f not in listed
                      and not any(p.startswith((".", "_")) for p in f.relative_to(path).parts))
    if not left_out:
        return []
    names = ", ".join(str(f.relative_to(path)) for f in left_out[:5]) + (", ..." if len(left_out) > 5 else "")
    return [f"{path}: {len(left_out)} file(s) in no split, not read: {names} (datasets reads only "
            "files named by split, like train.parquet or gsm8k_train.parquet, once any is)"]


def _data_folder_parts(path: Path, split: str | None, how: str) -> list[TablePart]:
    by_split = split_files(path)
    if not by_split:
        raise UserInputError(
            f"{path}: a folder with no data files ({', '.join(SUFFIXES)}) that datasets did not "
            "save either; point MIX at a file, a folder of data files (verl's "
            "data/gsm8k/train.parquet), or a folder written by save_to_disk"
        )
    chosen = choose_split(list(by_split), split, str(path), how)
    return [TablePart(FORMATS.get(SUFFIXES[f.suffix.lower()])(f), str(f), SUFFIXES[f.suffix.lower()],
                      file_task(f, path, chosen), f, chosen)
            for f in by_split[chosen]]


def file_task(file: Path, folder: Path, split: str) -> str:
    """The task of a data folder file's rows when they carry none: its path in the folder without
    the suffix, split words, shard numbers and a leading ``data/`` (the hub's layout); the
    folder's name when nothing is left."""
    from datasets.data_files import SPLIT_KEYWORDS

    words = next((w for s, w in SPLIT_KEYWORDS.items() if str(s) == split), [split])
    relative = file.relative_to(folder)
    directories = list(relative.parent.parts)
    if directories[:1] == ["data"]:
        directories = directories[1:]
    parts = [_without_split(part, words) for part in [*directories, relative.stem]]
    return "/".join(p for p in parts if p) or folder_name(folder)


def _without_split(part: str, words: list[str]) -> str:
    part = _SHARD.sub("", part)
    for word in words:
        found = re.fullmatch(rf"(?:(.*)[-._ ])?{re.escape(word)}(?:[-._ 0-9]+(.*))?", part)
        if found:
            return "-".join(g for g in found.groups() if g)
    return part

