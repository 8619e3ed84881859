"""The served log joined to its clicks: what an ad server logs becomes an impression log.

An ad server that shows GenCO's recommendations writes one **served-log** row per impression,
copied from the recommend response (``Served.log_fields``: ``impression_id``,
``model_version``, ``ad_id``, one column per component, ``propensity``, optional ``mode``,
``timestamp``, ``ctx_*``), and a **clicks** file with one row per clicked impression
(``impression_id``, ``click``; ``click`` may be 0 to record a known non-click). The join is
a left join on ``impression_id``: a served impression without a clicks row was not clicked.

Rows the join cannot use are never dropped silently: they go to ``join_rejected.csv`` with
their file, 1-based data row, id and reason. The joined rows then go through the ordinary
validation (``genco.data.ingest.ingest``), so every contract check applies to them and their
problems land in ``quarantine.csv`` as usual (its ``row`` numbers are rows of
``served_joined.parquet``, whose ``served_ids.parquet`` sidecar gives each one's
``impression_id``, ``model_version`` and served-log row).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from genco.data import storage
from genco.data.contract import (
    AD,
    CLICK,
    CLICKS_COLUMNS,
    CONTEXT_PREFIX,
    IMPRESSION_ID,
    MODEL_VERSION,
    SERVED_MODE,
    SERVED_OPTIONAL,
    SERVED_REQUIRED,
    Catalog,
    Constraints,
)
from genco.data.ingest import SUMMARY_FILE, IngestConfig, ingest
from genco.errors import ContractError

JOINED_FILE = "served_joined.parquet"
IDS_FILE = "served_ids.parquet"
REJECTED_FILE = "join_rejected.csv"
JOIN_REASONS = (
    "missing_impression_id",
    "duplicate_impression",
    "unknown_impression",
    "duplicate_click",
    "bad_click",
)


@dataclass
class JoinSummary:
    served_rows: int = 0
    clicks_rows: int = 0
    joined_rows: int = 0
    clicked: int = 0
    rejected_by_reason: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(JOIN_REASONS, 0)
    )
    by_model_version: dict[str, int] = field(default_factory=dict)
    deterministic_rows: int = 0  # beam-mode impressions (propensity 1)


def _read(path: str, columns: tuple[str, ...], optional: tuple[str, ...], client) -> pd.DataFrame:
    """A table with string ids; missing or foreign columns fail the whole file."""
    frame = storage.read_table(path, client=client, dtype={c: "str" for c in columns})
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ContractError(f"{path}: missing required column '{missing[0]}'")
    foreign = [
        c
        for c in frame.columns
        if c not in columns and c not in optional and not str(c).startswith(CONTEXT_PREFIX)
    ]
    if foreign:
        raise ContractError(f"{path}: unknown column '{foreign[0]}'")
    return frame


def join_served_log(
    served_path: str,
    clicks_path: str,
    catalog: Catalog,
    constraints: Constraints,
    out_dir: str,
    config: IngestConfig | None = None,
    client=None,
    progress: bool = False,
) -> dict:
    """Join a served log and its clicks file, then validate the result like any impressions.

    Returns (and writes to ``OUT/summary.json``) the ingest summary with a ``join`` section.
    """
    comps = catalog.components
    served = _read(served_path, (*SERVED_REQUIRED, *comps), (*SERVED_OPTIONAL,), client).astype(
        {IMPRESSION_ID: "str", MODEL_VERSION: "str", AD: "str"}
    )
    clicks = _read(clicks_path, CLICKS_COLUMNS, (), client)
    summary = JoinSummary(served_rows=len(served), clicks_rows=len(clicks))
    rejected: list[dict] = []

    def reject(source: str, rows: np.ndarray, ids: pd.Series, code: str, why: str) -> None:
        summary.rejected_by_reason[code] += len(rows)
        rejected.extend(
            {
                "file": source,
                "row": int(r) + 1,
                IMPRESSION_ID: i,
                "reason_code": code,
                "reason": why,
            }
            for r, i in zip(rows, ids, strict=True)
        )

    sid = served[IMPRESSION_ID].fillna("").str.strip()
    empty = (sid == "").to_numpy()
    reject(
        "served",
        np.flatnonzero(empty),
        sid[empty],
        "missing_impression_id",
        "impression_id is empty",
    )
    dup = (sid.duplicated(keep="first") & ~empty).to_numpy()
    reject(
        "served",
        np.flatnonzero(dup),
        sid[dup],
        "duplicate_impression",
        "impression_id already served on an earlier row",
    )
    keep = ~(empty | dup)
    served_rows = np.flatnonzero(keep)
    served = served[keep].reset_index(drop=True)
    sid = sid[keep].reset_index(drop=True)

    cid = clicks[IMPRESSION_ID].fillna("").str.strip()
    raw_click = clicks[CLICK].astype("str").str.strip()
    ok_click = raw_click.isin(("0", "1")).to_numpy()
    reject("clicks", np.flatnonzero(~ok_click), cid[~ok_click], "bad_click", "click is not 0 or 1")
    unknown = (~cid.isin(set(sid)) & ok_click).to_numpy()
    reject(
        "clicks",
        np.flatnonzero(unknown),
        cid[unknown],
        "unknown_impression",
        "impression_id is not in the served log",
    )
    cdup = (cid.duplicated(keep="first") & ok_click & ~unknown).to_numpy()
    reject(
        "clicks",
        np.flatnonzero(cdup),
        cid[cdup],
        "duplicate_click",
        "impression_id already has a clicks row",
    )
    good = ok_click & ~unknown & ~cdup
    click_of = dict(zip(cid[good], raw_click[good].astype(int), strict=True))

    joined = served.drop(columns=[IMPRESSION_ID, MODEL_VERSION]).drop(
        columns=[SERVED_MODE], errors="ignore"
    )
    joined[CLICK] = sid.map(click_of).fillna(0).astype("int8").to_numpy()
    summary.joined_rows = len(joined)
    summary.clicked = int(joined[CLICK].sum())
    summary.by_model_version = {
        str(k): int(v) for k, v in served[MODEL_VERSION].value_counts().items()
    }
    if SERVED_MODE in served.columns:
        summary.deterministic_rows = int((served[SERVED_MODE] == "beam").sum())
    storage.makedirs(out_dir)
    joined_path = storage.join(out_dir, JOINED_FILE)
    storage.write_table(joined, joined_path, client=client)
    ids = pd.DataFrame(
        {IMPRESSION_ID: sid, MODEL_VERSION: served[MODEL_VERSION], "served_row": served_rows + 1}
    )
    if SERVED_MODE in served.columns:  # what the canary's triggered A/B checks
        ids[SERVED_MODE] = served[SERVED_MODE].to_numpy()
    storage.write_table(ids, storage.join(out_dir, IDS_FILE), client=client)
    cols = ["file", "row", IMPRESSION_ID, "reason_code", "reason"]
    storage.write_table(
        pd.DataFrame(rejected, columns=cols), storage.join(out_dir, REJECTED_FILE), client=client
    )
    if len(joined) == 0:
        raise ContractError(f"{served_path}: no served impression left after the join")
    result = ingest(
        joined_path, catalog, constraints, out_dir, config, client=client, progress=progress
    ).to_dict()
    result["join"] = {
        **asdict(summary),
        "served_log": served_path,
        "clicks": clicks_path,
        "rejected_path": storage.join(out_dir, REJECTED_FILE),
    }
    storage.write_json(storage.join(out_dir, SUMMARY_FILE), result, client=client)
    return result


__all__ = ["JOIN_REASONS", "JoinSummary", "join_served_log"]
