"""The Pick-a-Pic v2 schema: exact column names and types, validation, and a writer for local datasets.

Pick-a-Pic v2 (Kirstain et al., 2023) stores one *ranking* per row: a caption, two JPEG-encoded images and their
labels (1/0 when one image won, 0.5/0.5 for a tie). The columns, in the order of the public Parquet files::

    are_different bool · best_image_uid string · caption string · created_at timestamp[ns] · has_label bool ·
    image_0_uid string · image_0_url string · image_1_uid string · image_1_url string · jpg_0 binary ·
    jpg_1 binary · label_0 float64 · label_1 float64 · model_0 string · model_1 string · ranking_id int64 ·
    user_id int64 · num_example_per_prompt int64

``created_at`` is written as ``timestamp[ns]`` (no time zone), the unit pandas uses and the one the public
Parquet files were written with; :func:`validate_table` accepts any timestamp unit because nothing in training
reads it.

Local layout written by :func:`write_pickapic_dataset` (verified with ``datasets`` 5.2: ``load_dataset(<dir>)``
returns the five splits (none of them empty) under their own names, ``validation_unique``/``test_unique`` are *not* merged into
``validation``/``test``, because the ``data/<split>-NNNNN-of-NNNNN`` pattern takes the split name verbatim)::

    <dir>/data/train-00000-of-00001.parquet
    <dir>/data/validation-00000-of-00001.parquet
    <dir>/data/test-00000-of-00001.parquet
    <dir>/data/validation_unique-00000-of-00001.parquet
    <dir>/data/test_unique-00000-of-00001.parquet

The public dataset uses the same pattern with more shards (``data/train-00000-of-00645-<hash>.parquet``), so a
local copy of (part of) it loads the same way.
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import ConfigError

PICKAPIC_COLUMNS: tuple[tuple[str, pa.DataType], ...] = (
    ("are_different", pa.bool_()),
    ("best_image_uid", pa.string()),
    ("caption", pa.string()),
    ("created_at", pa.timestamp("ns")),
    ("has_label", pa.bool_()),
    ("image_0_uid", pa.string()),
    ("image_0_url", pa.string()),
    ("image_1_uid", pa.string()),
    ("image_1_url", pa.string()),
    ("jpg_0", pa.binary()),
    ("jpg_1", pa.binary()),
    ("label_0", pa.float64()),
    ("label_1", pa.float64()),
    ("model_0", pa.string()),
    ("model_1", pa.string()),
    ("ranking_id", pa.int64()),
    ("user_id", pa.int64()),
    ("num_example_per_prompt", pa.int64()),
)
"""(name, pyarrow type) of every Pick-a-Pic v2 column, in file order."""

PICKAPIC_COLUMN_NAMES: tuple[str, ...] = tuple(name for name, _ in PICKAPIC_COLUMNS)
PICKAPIC_SCHEMA: pa.Schema = pa.schema(list(PICKAPIC_COLUMNS))
PICKAPIC_SPLITS: tuple[str, ...] = ("train", "validation", "test", "validation_unique", "test_unique")

PAIR_REQUIRED_COLUMNS: tuple[str, ...] = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")
"""The columns preference-pair training cannot do without. ``has_label``, ``ranking_id`` and ``user_id`` are
used when present (``has_label`` missing means every row counts as labelled; ids missing become -1)."""

_SCHEMA_HELP = (
    "Pick-a-Pic v2 files have the columns "
    + ", ".join(PICKAPIC_COLUMN_NAMES)
    + ". Rename the column in your data, or build the data with diffalign.data.write_pickapic_dataset."
)


class SchemaError(ConfigError):
    """A table does not have the Pick-a-Pic v2 columns (or their kinds) that the caller needs. A
    :class:`~diffalign.errors.ConfigError` (so a ``ValueError``): the scripts print it as one line."""


def _kind(dtype: pa.DataType) -> str:
    """Coarse kind of an Arrow type: string/large_string are both "string", any int width is "int", ..."""
    if pa.types.is_string(dtype) or pa.types.is_large_string(dtype) or pa.types.is_string_view(dtype):
        return "string"
    if pa.types.is_binary(dtype) or pa.types.is_large_binary(dtype) or pa.types.is_binary_view(dtype):
        return "binary"
    if pa.types.is_integer(dtype):
        return "int"
    if pa.types.is_floating(dtype):
        return "float"
    if pa.types.is_boolean(dtype):
        return "bool"
    if pa.types.is_timestamp(dtype) or pa.types.is_date(dtype):
        return "timestamp"
    if pa.types.is_null(dtype):
        return "null"
    return str(dtype)


_EXPECTED_KIND = {name: _kind(dtype) for name, dtype in PICKAPIC_COLUMNS}
# Labels are sometimes written as integers (1/0) by other tools; both are accepted.
_ACCEPTED_KINDS = {name: {kind, "null"} for name, kind in _EXPECTED_KIND.items()}
_ACCEPTED_KINDS["label_0"].add("int")
_ACCEPTED_KINDS["label_1"].add("int")


def validate_table(
    table: pa.Table | pa.Schema,
    source: str,
    required: Sequence[str] = PICKAPIC_COLUMN_NAMES,
) -> None:
    """Check that ``table`` (or a schema) has the ``required`` Pick-a-Pic columns with compatible types.

    Types are compared by kind (``string`` and ``large_string`` are the same kind; any timestamp unit is
    accepted; labels may be float or int). Extra columns are allowed.

    Raises:
        SchemaError: naming the first missing (or wrongly typed) column, the ``source`` (file or dataset name)
            and what to do.
    """
    schema = table if isinstance(table, pa.Schema) else table.schema
    present = set(schema.names)
    missing = [c for c in required if c not in present]
    if missing:
        raise SchemaError(
            f"{source}: missing column {missing[0]!r}"
            + (f" (and {len(missing) - 1} more: {', '.join(missing[1:])})" if len(missing) > 1 else "")
            + f". Columns found: {', '.join(schema.names) or '(none)'}. {_SCHEMA_HELP}"
        )
    for name in required:
        if name not in _ACCEPTED_KINDS:
            continue
        kind = _kind(schema.field(name).type)
        if kind not in _ACCEPTED_KINDS[name]:
            raise SchemaError(
                f"{source}: column {name!r} has type {schema.field(name).type}, expected "
                f"{dict(PICKAPIC_COLUMNS)[name]} (kind {_EXPECTED_KIND[name]!r}). {_SCHEMA_HELP}"
            )


def _coerce_created_at(value: object) -> object:
    """Accept datetime, integer nanoseconds since the epoch, or None for ``created_at``."""
    if value is None or isinstance(value, _dt.datetime):
        return value
    if isinstance(value, int):
        return value
    raise SchemaError(
        f"created_at must be a datetime, integer nanoseconds or None, got {type(value).__name__}: {value!r}"
    )


def rows_to_table(rows: Sequence[Mapping[str, object]], source: str = "rows") -> pa.Table:
    """Build a Pick-a-Pic v2 table (exact column order and types) from row dicts.

    Every row must have every column of :data:`PICKAPIC_COLUMNS` (values may be ``None``); a row lacking a
    key raises :class:`SchemaError` naming the key and the row index. Extra keys raise too (they would be
    dropped otherwise).
    """
    expected = set(PICKAPIC_COLUMN_NAMES)
    for i, row in enumerate(rows):
        keys = set(row)
        if keys != expected:
            lacking = sorted(expected - keys)
            extra = sorted(keys - expected)
            detail = []
            if lacking:
                detail.append(f"missing key(s) {', '.join(map(repr, lacking))}")
            if extra:
                detail.append(f"unknown key(s) {', '.join(map(repr, extra))}")
            raise SchemaError(f"{source}: row {i} has {' and '.join(detail)}. {_SCHEMA_HELP}")
    columns = {}
    for name, dtype in PICKAPIC_COLUMNS:
        values = [row[name] for row in rows]
        if name == "created_at":
            values = [_coerce_created_at(v) for v in values]
        if name in ("label_0", "label_1"):
            values = [None if v is None else float(v) for v in values]
        try:
            columns[name] = pa.array(values, type=dtype)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as err:
            raise SchemaError(f"{source}: column {name!r} cannot be stored as {dtype}: {err}") from err
    return pa.table(columns, schema=PICKAPIC_SCHEMA)


def split_path(out_dir: str | Path, split: str) -> Path:
    """``<out_dir>/data/<split>-00000-of-00001.parquet``: the single-shard file of ``split``."""
    return Path(out_dir) / "data" / f"{split}-00000-of-00001.parquet"


def write_pickapic_split(
    rows: Sequence[Mapping[str, object]],
    out_dir: str | Path,
    split: str,
    row_group_size: int = 256,
) -> Path:
    """Write ``rows`` as ``<out_dir>/data/<split>-00000-of-00001.parquet`` with the exact v2 schema.

    ``row_group_size`` rows per Parquet row group (small groups keep streaming reads cheap: one group holds
    that many image pairs). The file is written to a temporary name and renamed, so a crash never leaves a
    half-written split. Returns the file path.
    """
    if not split or "/" in split or "-" in split:
        raise ValueError(f"split name {split!r} must be non-empty and contain no '/' or '-' (e.g. 'train')")
    table = rows_to_table(rows, source=f"split {split!r}")
    path = split_path(out_dir, split)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if table.num_rows:
        pq.write_table(table, tmp, row_group_size=row_group_size)
    else:
        # No row group at all (write_table would write one of 0 rows, and datasets' Parquet reader then asks
        # for batches of 0 rows and fails, taking every other split of the directory down with it).
        pq.ParquetWriter(tmp, table.schema).close()
    tmp.replace(path)
    return path


def write_pickapic_dataset(
    splits: Mapping[str, Iterable[Mapping[str, object]]],
    out_dir: str | Path,
    row_group_size: int = 256,
) -> dict[str, Path]:
    """Write several splits (e.g. all of :data:`PICKAPIC_SPLITS`) in the layout ``datasets.load_dataset`` reads.

    Returns ``{split: path}``. Splits with zero rows are written too (a file with the schema and no row group),
    so that the split exists: :func:`~diffalign.data.pickapic.load_pickapic_split` loads it as an empty dataset,
    and ``datasets.load_dataset(<dir>, split=<another split>)`` is not disturbed by it (``datasets`` 5.2 itself
    refuses to build a split with no rows: ``load_dataset(<dir>)`` of all splits fails on it).
    """
    return {
        split: write_pickapic_split(list(rows), out_dir, split, row_group_size)
        for split, rows in splits.items()
    }


def is_missing_label(value: object) -> bool:
    """True for ``None`` and NaN labels."""
    return value is None or (isinstance(value, float) and math.isnan(value))
