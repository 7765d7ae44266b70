"""Every parquet read of embedtrain goes through here, so that a file pyarrow cannot read (cut off
by an interrupted download or copy, or damaged) is one line naming the file instead of a long
pyarrow traceback that never names it.

A parquet file ends with its footer (the schema and the row-group offsets), so a truncated file
fails when it is opened ("Parquet magic bytes not found in footer"); damage inside a data page
fails only when that page is decoded (e.g. "Corrupt snappy compressed data"). Both are reported
with `unreadable`, wherever the read happens: opening, reading whole, or iterating row groups.
"""

from contextlib import contextmanager

import pyarrow as pa
import pyarrow.parquet as pq

from embedtrain.errors import DataError


def unreadable(path, err):
    """The DataError for a parquet file pyarrow could not read: the file, why, and the fix."""
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return DataError(
        f"{path}: not a readable parquet file, it is truncated or corrupt ({reason}); "
        "replace it with a complete copy (download or write it again)"
    )


@contextmanager
def reading(path):
    """Any pyarrow or I/O error inside the block becomes `unreadable(path)` (a DataError passes)."""
    try:
        yield
    except DataError:
        raise
    except FileNotFoundError as err:
        raise DataError(f"missing {path}") from err
    except (pa.ArrowException, OSError) as err:  # ArrowInvalid on the footer, OSError on a damaged page
        raise unreadable(path, err) from err


def read_table(path, columns=None):
    """pq.read_table, with a file that cannot be read reported by `reading`."""
    with reading(path):
        return pq.read_table(path, columns=None if columns is None else list(columns))


def read_schema(path):
    """The Arrow schema of a parquet file (its footer only)."""
    with reading(path):
        return pq.read_schema(path)


def open_file(path):
    """A pq.ParquetFile (its footer checked); wrap later reads of row groups in `reading(path)`."""
    with reading(path):
        return pq.ParquetFile(path)


def iter_batches(file, path, **options):
    """file.iter_batches(**options) of an `open_file`, a damaged page reported by `reading`."""
    with reading(path):
        yield from file.iter_batches(**options)
