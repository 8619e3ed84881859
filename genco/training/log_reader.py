"""Reading the impression log for the streamed fit: Parquet record batches (pyarrow
datasets, local or object store) turned into catalog codes chunk by chunk. ``open_log`` is
the one place that knows where the rows come from, so another reader can replace it."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from genco.data import fs
from genco.data.contract import AD, CLICK, PROPENSITY, TIMESTAMP, Catalog
from genco.data.ids import Ids
from genco.errors import ContractError
from genco.models.vocab import Encoded


def open_log(path: str) -> ds.Dataset:
    """The impression log as a pyarrow dataset: one Parquet file, or a directory of them
    (hive partitions such as ``date=2026-11-29/`` become columns), local or on an object
    store (``gs://``, ``s3://``: through the same fsspec filesystems as ``genco.data.fs``)."""
    if fs.is_remote(path):
        scheme = fs.url_scheme(path)
        return ds.dataset(
            path.removeprefix(f"{scheme}://"),
            format="parquet",
            partitioning="hive",
            filesystem=fs.filesystem(path),
        )
    return ds.dataset(path, format="parquet", partitioning="hive")


class ChunkEncoder:
    """Record batches -> catalog codes, with the id lookups built once for the whole log;
    errors name the row (counted from the start of the log), the column and the value."""

    def __init__(self, catalog: Catalog, context_columns: tuple[str, ...]) -> None:
        self.catalog, self.context_columns = catalog, context_columns
        # the catalog's own hash indexes: no Python string per id
        self.ads = catalog.ads
        self.elements = list(catalog.elements)

    def columns(self, schema: pa.Schema) -> list[str]:
        cols = [AD, *self.catalog.components, CLICK, *self.context_columns]
        missing = [c for c in cols if c not in schema.names]
        if missing:
            raise ContractError(f"impressions: missing column '{missing[0]}'")
        return cols + [c for c in (PROPENSITY, TIMESTAMP) if c in schema.names]

    def _codes(self, index: Ids, values: pa.Array, col: str, first_row: int) -> np.ndarray:
        # Ids are hashed by Arrow (dictionary encoding, in C++); only the chunk's distinct
        # ids go through the catalog's index.
        if not pa.types.is_dictionary(values.type):
            values = pc.dictionary_encode(values)
        dictionary = values.dictionary.to_numpy(zero_copy_only=False).astype(object)
        known = index.codes(dictionary)
        codes = known[values.indices.to_numpy(zero_copy_only=False)]
        if (codes < 0).any():
            i = int(np.flatnonzero(codes < 0)[0])
            raise ContractError(
                f"impressions row {first_row + i}: {col} '{values[i].as_py()}' is not in the "
                "catalog"
            )
        return codes.astype(np.int64)

    def __call__(self, batch: pa.RecordBatch, first_row: int) -> Encoded:
        n = batch.num_rows
        ads = self._codes(self.ads, batch.column(AD), AD, first_row)
        combos = np.zeros((n, self.catalog.n_components), np.int64)
        for k, comp in enumerate(self.catalog.components):
            combos[:, k] = self._codes(self.elements[k], batch.column(comp), comp, first_row)
        ctx = np.zeros((n, len(self.context_columns)), np.float32)
        for j, c in enumerate(self.context_columns):
            ctx[:, j] = batch.column(c).to_numpy(zero_copy_only=False)
        names = batch.schema.names

        def opt(c: str) -> np.ndarray | None:
            return batch.column(c).to_numpy(zero_copy_only=False) if c in names else None

        return Encoded(
            ads,
            combos,
            ctx,
            batch.column(CLICK).to_numpy(zero_copy_only=False).astype(np.float32),
            opt(PROPENSITY),
            opt(TIMESTAMP),
            self.context_columns,
        )


def concat(parts: list[Encoded]) -> Encoded:
    def cat(name: str):
        vals = [getattr(p, name) for p in parts]
        return None if vals[0] is None else np.concatenate(vals)

    return Encoded(
        cat("ads"), cat("combos"), cat("ctx"), cat("click"),
        cat("propensity"), cat("timestamp"), parts[0].context_columns,
    )  # fmt: skip
