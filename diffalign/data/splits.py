"""Opening one split of Pick-a-Pic-format data (:func:`load_pickapic_split`): a ``datasets`` object, a local
directory in the Hub layout, Parquet files, or a hub name; how a source is named in messages
(:func:`describe_source`); and the captions of a split, for prompt sets (:func:`split_captions`).
"""

from __future__ import annotations

import glob as _glob
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError


def is_glob(text: str) -> bool:
    """A file pattern (``*``, ``?`` or ``[``) rather than one path."""
    return any(ch in text for ch in "*?[")


def _split_files(directory: Path, split: str) -> list[str] | None:
    """The Parquet files of ``split`` in a local directory in the Hub layout, or None when ``datasets`` must resolve
    the files itself (a README declaring ``configs:``, or data that is not Parquet)."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    readme = directory / "README.md"
    if readme.is_file() and "configs:" in readme.read_text(errors="ignore"):
        return None
    try:
        files = DataFilesDict.from_patterns(get_data_patterns(str(directory)), base_path=str(directory))
    except FileNotFoundError:  # no data files found: let datasets say so in its own words
        return None
    if split not in files:
        raise ConfigError(
            f"{directory}: split {split!r} not found (splits found: {', '.join(files) or 'none'}). A local "
            f"directory needs files named data/{split}-00000-of-00001.parquet "
            "(see diffalign.data.write_pickapic_dataset)."
        )
    names = [str(f) for f in files[split]]
    return names if all(n.endswith(".parquet") for n in names) else None


def check_pair_source(source: str, split: str, required: Sequence[str]) -> int | None:
    """Check a local Pick-a-Pic-format source before any model loads: the split's Parquet files exist and each has
    the ``required`` columns (only their schemas are read). Returns the number of files checked, or None when the
    source is not local Parquet (a hub name, or a directory that ``datasets`` resolves itself).

    Raises:
        ConfigError: the split is missing (naming the splits found) or no file matches.
        SchemaError: a file lacks a column or has a wrong type (naming the file and the column).
    """
    import pyarrow.parquet as pq

    from .schema import validate_table

    text = os.path.expanduser(str(source))
    path = Path(text)
    if path.is_dir():
        files = _split_files(path, split)
    elif is_glob(text) or path.suffix == ".parquet":
        files = sorted(_glob.glob(text)) if is_glob(text) else [text]
        if not files or not all(Path(f).is_file() for f in files):
            raise ConfigError(f"config field dataset={text!r}: no Parquet file matches it")
    else:
        return None
    if files is None:
        return None
    for f in files:
        validate_table(pq.read_schema(f), f"{f} [{split}]", required)
    return len(files)


def _no_rows() -> Iterator[dict[str, Any]]:
    yield from ()


def _load_parquet_files(files: Sequence[str], split: str, kwargs: Mapping[str, Any]) -> Any:
    """``files`` as one split. Files with zero rows are left out (datasets' Parquet reader fails on them: it asks
    for batches of 0 rows); a split with no rows at all is an empty dataset with the files' schema."""
    import datasets
    import pyarrow.parquet as pq

    nonempty = [f for f in files if pq.ParquetFile(f).metadata.num_rows > 0]
    if nonempty:
        return datasets.load_dataset("parquet", data_files={split: nonempty}, split=split, **kwargs)
    schema = pq.read_schema(files[0])
    if kwargs.get("streaming"):
        features = datasets.Features.from_arrow_schema(schema)
        return datasets.IterableDataset.from_generator(_no_rows, features=features)
    return datasets.Dataset(schema.empty_table())


def load_pickapic_split(
    source: Any,
    split: str = "train",
    streaming: bool = False,
    cache_dir: str | None = None,
    **load_kwargs: Any,
) -> Any:
    """Open one split of Pick-a-Pic-format data as a ``datasets.Dataset`` (or ``IterableDataset`` if streaming).

    ``source`` may be:

    * a ``datasets.Dataset`` / ``IterableDataset`` (returned unchanged; ``split`` is ignored);
    * a local directory in the Hub layout (``<dir>/data/<split>-NNNNN-of-NNNNN*.parquet``, as written by
      :func:`~diffalign.data.schema.write_pickapic_dataset`, or a local copy of the public files): only the files
      of ``split`` are read, so another split (an empty or a broken one) never stands in the way;
    * a ``.parquet`` file or a glob of them (e.g. ``/data/pap/train-*.parquet``): all matching files are ``split``;
    * any other string: a dataset name for ``datasets.load_dataset(name, split=split, streaming=streaming)``.

    A split with zero rows loads as an empty dataset (``datasets`` itself refuses such a split). Non-streaming
    sources are converted once to Arrow files in the ``datasets`` cache (``cache_dir``) and memory-mapped: random
    access without loading images into RAM.
    """
    import datasets

    if isinstance(source, (datasets.Dataset, datasets.IterableDataset)):
        return source
    text = str(source)
    path = Path(text)
    kwargs = dict(load_kwargs, cache_dir=cache_dir, streaming=streaming)
    if path.is_dir():
        files = _split_files(path, split)
        if files is None:
            try:
                return datasets.load_dataset(str(path), split=split, **kwargs)
            except ValueError as err:
                if "split" in str(err).lower():
                    raise ValueError(f"{text}: split {split!r} not found ({err})") from err
                raise
        return _load_parquet_files(files, split, kwargs)
    if is_glob(text) or path.suffix == ".parquet":
        files = sorted(_glob.glob(text)) if is_glob(text) else [text]
        if not files or not all(Path(f).is_file() for f in files):
            raise FileNotFoundError(f"no Parquet file matches {text!r}")
        return _load_parquet_files(files, split, kwargs)
    return datasets.load_dataset(text, split=split, **kwargs)


def describe_source(source: Any, split: str) -> str:
    """``"<file or name> [<split>]"``: how error messages and stats name a source."""
    import datasets

    if isinstance(source, (datasets.Dataset, datasets.IterableDataset)):
        files = getattr(source, "cache_files", None) or []
        name = (
            files[0]["filename"]
            if files
            else (getattr(source.info, "dataset_name", None) or "in-memory dataset")
        )
        return f"{name} [{source.split or split}]"
    return f"{source} [{split}]"


def split_captions(source: Any, split: str, name: str | None = None) -> list[Any]:
    """The ``caption`` column of one split (what prompt sets are read from), opened by :func:`load_pickapic_split`,
    so an empty or broken *other* split of a local directory does not stand in the way.

    ``name`` is how messages call the dataset (e.g. ``"sandbox"``; default: ``source``).

    Raises:
        ValueError: the split does not exist, has no rows, or has no ``caption`` column (naming the dataset and
            the split).
    """
    name = str(source) if name is None else name
    ds = load_pickapic_split(source, split)
    if ds.num_rows == 0:
        raise ValueError(
            f"dataset {name!r} split {split!r} has no rows, so it has no prompts: choose another split, or rebuild "
            f"the dataset with rows in {split!r}"
        )
    if "caption" not in ds.column_names:
        raise ValueError(
            f"dataset {name!r} split {split!r} has no 'caption' column (columns: {ds.column_names})"
        )
    return ds["caption"]
