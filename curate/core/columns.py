"""Canonical digests of Arrow columns: what a manifest id hashes, one column at a time.

A manifest's id used to hash every row's canonical JSON, so deriving a version in which one
column changed re-serialised every row (about 10 µs a row). Hashing column by column lets a
derived manifest reuse the digests of the columns it did not change, and a changed column is
hashed from its Arrow buffers without making a Python object per value.

The digest depends only on the values, never on how the array happens to be laid out in
memory (chunks, a slice's offset, the bytes behind a null slot): each array is reduced to its
logical content — null positions, then per type: the values of integers (nulls as 0), the
length of every string followed by the concatenated UTF-8 bytes, the length of every list
followed by the digest of its flattened values, the digest of every struct field. The byte
layout of those parts is fixed here (little-endian int64 lengths), so the same values give the
same digest with any pyarrow version.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def column_digest(column: pa.Array | pa.ChunkedArray) -> bytes:
    """sha256 of the logical content of ``column`` (see the module docstring)."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    h = hashlib.sha256()
    _update(h, array)
    return h.digest()


def _update(h, array: pa.Array) -> None:
    kind = array.type
    h.update(f"{_type_tag(kind)}:{len(array)}:{array.null_count}\n".encode())
    if array.null_count:
        nulls = array.is_null().to_numpy(zero_copy_only=False)
        h.update(np.packbits(nulls).tobytes())
    if pa.types.is_integer(kind):
        values = pc.fill_null(array, 0).to_numpy(zero_copy_only=False)
        h.update(values.astype(values.dtype.newbyteorder("<"), copy=False).tobytes())
    elif pa.types.is_string(kind) or pa.types.is_large_string(kind):
        lengths, data = _string_parts(array)
        h.update(lengths.tobytes())
        h.update(data)
    elif pa.types.is_list(kind) or pa.types.is_large_list(kind):
        lengths = pc.fill_null(pc.list_value_length(array), 0).to_numpy(zero_copy_only=False)
        h.update(lengths.astype("<i8").tobytes())
        _update(h, array.flatten())
    elif pa.types.is_struct(kind):
        for field in array.flatten():
            _update(h, field)
    else:
        raise TypeError(f"no canonical digest for Arrow type {kind}")


def _type_tag(kind: pa.DataType) -> str:
    """The type as content: not the name of a list's item field, which Parquet readers and
    writers rename ("item", "element")."""
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return "string"
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return "list"
    if pa.types.is_struct(kind):
        return f"struct<{','.join(kind.field(i).name for i in range(kind.num_fields))}>"
    return str(kind)


def _string_parts(array: pa.Array) -> tuple[np.ndarray, bytes | memoryview]:
    """(length of every value as little-endian int64, nulls 0; the valid values' bytes)."""
    if array.null_count:
        array = pc.fill_null(array, "")  # a null slot's bytes, if any, are not content
    offset_type = np.int64 if pa.types.is_large_string(array.type) else np.int32
    _, offsets_buffer, data_buffer = array.buffers()
    offsets = np.frombuffer(offsets_buffer, dtype=offset_type, count=len(array) + 1,
                            offset=array.offset * np.dtype(offset_type).itemsize)
    lengths = np.diff(offsets).astype("<i8")
    data = b"" if data_buffer is None else memoryview(data_buffer)[int(offsets[0]):int(offsets[-1])]
    return lengths, data
