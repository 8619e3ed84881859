"""Catalog-scale id vocabularies and candidate lists, with no Python object per id.

``Ids``: a vocabulary of string ids in code order, held in one Arrow string array; code
lookups go through ``Codes``, a sorted 64-bit hash index built on first use. ``Candidates``:
each (ad, component)'s sorted element codes as one ragged int64 array (offsets + values).
At 15M catalog rows a tuple of Python strings costs ~70 bytes an id plus its dict entry;
these cost the id's UTF-8 bytes, its offset, and 16 bytes of index.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, overload

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

_BLOCK = 1 << 20  # ids turned into Python strings at a time (hashing, iteration)


def hash_ids(values: np.ndarray) -> np.ndarray:
    """(n,) uint64 hashes of (n,) str objects (``pandas.util.hash_array``)."""
    if not len(values):
        return np.zeros(0, np.uint64)
    return pd.util.hash_array(np.asarray(values, dtype=object), categorize=False)


def _as_strings(values: Any) -> pa.Array:
    """One contiguous Arrow string array of ``values`` (an Arrow array or chunked array, or a
    sequence of str)."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks() if values.num_chunks != 1 else values.chunk(0)
    if not isinstance(values, pa.Array):
        values = pa.array(list(values), pa.string())
    if pa.types.is_dictionary(values.type):
        values = values.dictionary_decode()
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        values = pc.cast(values, pa.string())
    return values


class Codes:
    """Codes of ids in a vocabulary (-1 where absent): each id's 64-bit hash in one sorted
    array, looked up by binary search and checked against the id itself, so a hash collision
    can never pass a wrong id (colliding ids are walked in hash order). A chunk's distinct
    values are hashed once each (Arrow dictionary encoding). ``pc.index_in`` rebuilt its hash
    table for every chunk; a pandas Index costs ~10 us a row at millions of elements; this,
    ~0.7 us, and 16 bytes per id beside the ids' own Arrow array.

    hash_fn: str objects -> uint64 hashes; the default is ``hash_ids`` (tests pass a weak one
    to force collisions)."""

    def __init__(
        self, values: pa.Array, hash_fn: Callable[[np.ndarray], np.ndarray] = hash_ids
    ) -> None:
        self.values = _as_strings(values)
        self.hash_fn = hash_fn
        n = len(self.values)
        h = np.empty(n, np.uint64)
        for i in range(0, n, _BLOCK):  # Python strings only a block at a time
            block = self.values.slice(i, _BLOCK).to_numpy(zero_copy_only=False)
            h[i : i + len(block)] = hash_fn(block)
        self.order = np.argsort(h, kind="stable")
        self.hashes = h[self.order]

    @property
    def nbytes(self) -> int:
        return self.order.nbytes + self.hashes.nbytes

    def lookup(self, values: np.ndarray | Sequence[str]) -> np.ndarray:
        """(n,) int64 codes of (n,) str values, -1 where absent."""
        values = np.asarray(values, dtype=object)
        out = np.full(len(values), -1, np.int64)
        if not len(values) or not len(self.hashes):
            return out
        h = np.asarray(self.hash_fn(values), np.uint64)
        sort = np.argsort(h)  # sorted needles: binary search ~3x faster
        at = np.empty(len(h), np.int64)
        at[sort] = np.searchsorted(self.hashes, h[sort])
        rows = np.arange(len(h))
        needles = pa.array(values, pa.string())
        while len(rows):  # more than one pass only where ids share a hash
            live = at[rows] < len(self.hashes)
            rows = rows[live]
            live = self.hashes[at[rows]] == h[rows]
            rows = rows[live]
            if not len(rows):
                break
            code = self.order[at[rows]]
            same = pc.equal(self.values.take(pa.array(code)), needles.take(pa.array(rows)))
            same = same.to_numpy(zero_copy_only=False)
            out[rows[same]] = code[same]
            rows = rows[~same]
            at[rows] += 1
        return out

    def lookup_one(self, value: str) -> int:
        """Code of one str value, -1 when absent (a request's id: no Arrow call per lookup)."""
        h = np.asarray(self.hash_fn(np.array([value], dtype=object)), np.uint64)[0]
        at = int(np.searchsorted(self.hashes, h))
        while at < len(self.hashes) and self.hashes[at] == h:
            code = int(self.order[at])
            if self.values[code].as_py() == value:
                return code
            at += 1
        return -1

    def __call__(self, col: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """(n,) int64 codes of an Arrow string column, -1 where absent or null."""
        enc = pc.dictionary_encode(col)
        if isinstance(enc, pa.ChunkedArray):
            enc = enc.combine_chunks()
        values = enc.dictionary.to_numpy(zero_copy_only=False).astype(object)
        codes = np.append(self.lookup(values), -1)  # -1: null
        idx = pc.fill_null(enc.indices, len(values)).to_numpy(zero_copy_only=False)
        return codes[idx]


class Ids(Sequence[str]):
    """A vocabulary of distinct string ids in code order (id ``i`` has code ``i``), held in
    one Arrow string array. Behaves as a read-only sequence of str (``len``, indexing,
    iteration, ``in``, equality with a tuple or list of str); ``take`` and ``codes`` work on
    whole arrays of codes or ids at once."""

    __slots__ = ("_index", "array")

    def __init__(self, values: pa.Array | pa.ChunkedArray | Iterable[str] = ()) -> None:
        self.array: pa.Array = _as_strings(values)
        self._index: Codes | None = None

    @property
    def hash_index(self) -> Codes:
        """The hash index, built on first use (millions of ids: a few seconds)."""
        if self._index is None:
            self._index = Codes(self.array)
        return self._index

    @property
    def nbytes(self) -> int:
        """Bytes held: the Arrow array and, once built, the index."""
        return self.array.nbytes + (self._index.nbytes if self._index is not None else 0)

    def __len__(self) -> int:
        return len(self.array)

    @overload
    def __getitem__(self, i: int) -> str: ...

    @overload
    def __getitem__(self, i: slice) -> Ids: ...

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Ids(self.array[i])
        if isinstance(i, (int, np.integer)):
            n = len(self.array)
            if not -n <= i < n:
                raise IndexError(f"id code {int(i)} out of range ({n} ids)")
            return self.array[int(i) % n].as_py()
        return self.take(i)

    def take(self, codes: Any) -> np.ndarray:
        """(n,) object array of the ids of (n,) codes."""
        codes = np.asarray(codes, np.int64)
        return (
            self.array.take(pa.array(codes.ravel()))
            .to_numpy(zero_copy_only=False)
            .reshape(codes.shape)
        )

    def __iter__(self) -> Iterator[str]:
        for i in range(0, len(self.array), _BLOCK):
            yield from self.array.slice(i, _BLOCK).to_pylist()

    def __contains__(self, x: object) -> bool:
        return isinstance(x, str) and self.code(x) >= 0

    def code(self, x: str) -> int:
        """Code of one id, -1 when absent."""
        return self.hash_index.lookup_one(x)

    def index(self, x: object, start: int = 0, stop: int | None = None) -> int:
        """Code of one id (``Sequence.index``); ValueError when absent."""
        code = self.code(x) if isinstance(x, str) else -1
        if code < 0 or code < start or (stop is not None and code >= stop):
            raise ValueError(f"{x!r} is not in the vocabulary")
        return code

    def codes(self, values: pa.Array | pa.ChunkedArray | Sequence[str] | np.ndarray) -> np.ndarray:
        """(n,) int64 codes of n ids (an Arrow column, or str objects), -1 where absent."""
        if isinstance(values, (pa.Array, pa.ChunkedArray)):
            return self.hash_index(values)
        return self.hash_index.lookup(np.asarray(values, dtype=object))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self.array.to_numpy(zero_copy_only=False)
        return out if dtype is None else out.astype(dtype)

    def tolist(self) -> list[str]:
        return self.array.to_pylist()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Ids):
            if len(self) != len(other):
                return False
            a, b = self.array, other.array
            if a.type != b.type:  # string vs large_string: compare the text
                a, b = a.cast(pa.large_string()), b.cast(pa.large_string())
            return a.equals(b)
        if isinstance(other, (tuple, list)):
            if len(other) != len(self) or not all(isinstance(x, str) for x in other):
                return False
            return self == Ids(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        head = ", ".join(repr(x) for x in self.array.slice(0, 3).to_pylist())
        return f"Ids([{head}{', ...' if len(self) > 3 else ''}], n={len(self)})"


class Candidates(Sequence[tuple[np.ndarray, ...]]):
    """Per ad, per component, the sorted int64 element codes the ad may show, ragged: the
    codes of (ad a, component k) are ``values[offsets[a * K + k] : offsets[a * K + k + 1]]``.
    ``candidates[a]`` is a tuple of K views, as the nested tuples it replaces."""

    __slots__ = ("n_components", "offsets", "values")

    def __init__(self, offsets: np.ndarray, values: np.ndarray, n_components: int) -> None:
        self.offsets = np.asarray(offsets, np.int64)  # (n_ads * K + 1,)
        self.values = np.asarray(values, np.int64)  # (n_rows,)
        self.n_components = n_components

    @staticmethod
    def from_nested(nested: Sequence[Sequence[Any]], n_components: int) -> Candidates:
        """From per-ad tuples of per-component code arrays (each is sorted here)."""
        parts = [np.sort(np.asarray(c, np.int64)) for per_ad in nested for c in per_ad]
        sizes = np.array([len(p) for p in parts], np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        values = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        return Candidates(offsets, values, n_components)

    @property
    def nbytes(self) -> int:
        return self.offsets.nbytes + self.values.nbytes

    def __len__(self) -> int:
        return (len(self.offsets) - 1) // self.n_components if self.n_components else 0

    def of(self, ad: int, k: int) -> np.ndarray:
        i = ad * self.n_components + k
        return self.values[self.offsets[i] : self.offsets[i + 1]]

    def __getitem__(self, ad):
        if not isinstance(ad, (int, np.integer)):
            return [self[a] for a in range(len(self))[ad]]
        n = len(self)
        if not -n <= ad < n:
            raise IndexError(f"ad code {int(ad)} out of range ({n} ads)")
        a = int(ad) % n
        return tuple(self.of(a, k) for k in range(self.n_components))

    def __iter__(self) -> Iterator[tuple[np.ndarray, ...]]:
        for a in range(len(self)):
            yield self[a]

    def sizes(self, k: int) -> np.ndarray:
        """(n_ads,) number of candidates of component k per ad."""
        return np.diff(self.offsets)[k :: self.n_components]

    def component(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Every (ad, element) candidate pair of component k, ad-major with elements sorted
        within an ad: (n,) ad codes and (n,) element codes."""
        sizes = self.sizes(k)
        starts = self.offsets[:-1][k :: self.n_components]
        ads = np.repeat(np.arange(len(sizes), dtype=np.int64), sizes)
        first = np.cumsum(sizes) - sizes  # where each ad's run starts in the output
        pos = np.arange(len(ads), dtype=np.int64) - np.repeat(first - starts, sizes)
        return ads, self.values[pos]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Candidates):
            return NotImplemented
        return (
            self.n_components == other.n_components
            and np.array_equal(self.offsets, other.offsets)
            and np.array_equal(self.values, other.values)
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        n, k = len(self), self.n_components
        return f"Candidates(n_ads={n}, n_components={k}, rows={len(self.values)})"
