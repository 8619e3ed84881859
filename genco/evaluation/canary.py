"""A canary in the model store: a candidate served to a share of live traffic beside
production, then promoted or rolled back on the online A/B of the two arms' own clicks.

At a few percent of exploration the offline gate (``genco.evaluation.evaluate``) rarely has
the evidence to approve a candidate: it differs from production on combinations production
never shows. So a refused candidate can be *started as a canary* instead of being dropped::

    STORE/versions/<v>/        the canary's bundle (a version; production does not move)
    STORE/CANARY.json          {"version", "share", "production_version", "candidate_digest",
                                "started_at", "offline_gate"}: the one running canary
    STORE/kserve-canary/       its serving layout, when the store publishes for serving
    STORE/canaries/<v>.json    every canary's record once decided (kept for audit)

On a cluster KServe splits the traffic: ``genco canary manifest`` renders the
InferenceService with ``canaryTrafficPercent`` and the canary's layout as ``storageUri``
(``genco.serving.manifest``). Each served row names the ``model_version`` that served it,
so once the served log is joined to its clicks (``genco validate --served-log``),
``decide`` compares the two arms (``genco.evaluation.online.canary_gate``): the canary is
promoted through ``genco.store.promote`` with that online gate record, or rolled back
(CANARY.json removed; production never moved). While the canary arm has fewer than
``min_impressions`` rows the canary keeps running: a canary started an hour ago is not
judged on a hundred impressions.

``canary_ab="triggered"`` (``genco canary decide --canary-ab triggered``): the A/B counts
only the requests where the two bundles' greedy picks differ, scaled by their share
(``genco.evaluation.online``): the same decision on a fraction of the noise. It holds when
both arms serve their greedy pick with the same exploration floor (``beam``, or ``sample``
at temperature 0); a log with ``thompson`` rows is refused (those arms differ everywhere).
"""

from __future__ import annotations

import calendar
import hashlib
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from genco.data import storage
from genco.data.contract import AD, CLICK, MODEL_VERSION, SERVED_MODE, TIMESTAMP
from genco.data.readers import timestamps
from genco.data.served import IDS_FILE, JOINED_FILE
from genco.errors import ConfigError, ContractError, NotFoundError, StoreError
from genco.evaluation.online import canary_gate, policies_differ
from genco.inference.predictor import Predictor
from genco.models.checkpoint import read_manifest
from genco.store import OnPromote, add_version, current_version, promote, read_gate, version_dir

if TYPE_CHECKING:
    from google.cloud.storage import Client

CANARY = "CANARY.json"
HISTORY = "canaries"
MIN_IMPRESSIONS = 1000

# on_canary(version_dir, version): prepares the canary's serving (its layout) before the
# record is written; if it raises, no canary starts.
OnCanary = Any


@dataclass(frozen=True)
class CanaryResult:
    """What ``start`` or ``decide`` did. ``action``: started, running, refused, promoted,
    rolled_back or continue."""

    action: str
    version: str | None
    production_version: str | None
    reason: str
    gate: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def arms(
    data_dir: str, client: Client | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(model_version, click, timestamp in epoch seconds or None) per impression of a joined
    served log (the directory ``genco validate --served-log ... --clicks ...`` wrote): what
    ``decide`` compares."""
    for name in (IDS_FILE, JOINED_FILE):
        if not storage.exists(storage.join(data_dir, name), client=client):
            raise NotFoundError(
                f"{data_dir}: no {name}, so not a joined served log (write one with genco "
                "validate --served-log SERVED --clicks CLICKS --out DIR)"
            )
    ids = storage.read_table(storage.join(data_dir, IDS_FILE), client=client)
    joined = storage.read_table(storage.join(data_dir, JOINED_FILE), client=client)
    if len(ids) != len(joined):
        raise StoreError(
            f"{data_dir}: {IDS_FILE} has {len(ids)} rows, {JOINED_FILE} {len(joined)}; "
            "join the served log again"
        )
    when = None
    if TIMESTAMP in joined.columns:
        when = timestamps(pa.array(joined[TIMESTAMP]))
    return ids[MODEL_VERSION].astype(str).to_numpy(), joined[CLICK].to_numpy(), when


def read_canary(store: str, client: Client | None = None) -> dict | None:
    """The running canary's record, or None."""
    path = storage.join(store, CANARY)
    if not storage.exists(path, client=client):
        return None
    record = storage.read_json(path, client=client)
    if not isinstance(record, dict) or not isinstance(record.get("version"), str):
        raise StoreError(f"{path}: not a canary record (no 'version')")
    return record


def start(
    bundle_dir: str,
    store: str,
    share: float,
    gate: dict,
    on_canary: OnCanary | None = None,
    client: Client | None = None,
) -> CanaryResult:
    """Start ``bundle_dir`` as the store's canary, served to ``share`` of requests.

    gate: the offline gate record of this bundle against the current production (the
    evaluate step's ``gate.json``); it must have refused (a passing gate deploys) and name
    this bundle and the production that is current now. One canary at a time: while one
    runs, a new candidate is refused (``action`` "refused"), not queued.
    """
    if not 0.0 < share < 1.0:
        raise ConfigError(f"canary share must be in (0, 1), got {share}")
    production = current_version(store, client=client)
    if production is None:
        raise StoreError(f"{store}: no production model to run a canary beside; deploy one first")
    digest = hashlib.sha256(read_manifest(bundle_dir, client)[1]).hexdigest()
    problem = _gate_problem(gate, digest, production)
    if problem:
        raise StoreError(f"gate: {problem}")
    running = read_canary(store, client=client)
    if running is not None:
        if running.get("candidate_digest") == digest:
            return CanaryResult("running", running["version"], production, "already the canary")
        return CanaryResult(
            "refused",
            None,
            production,
            f"canary '{running['version']}' is running since {running.get('started_at')}: "
            "decide it first (genco canary decide) or stop it (genco canary stop)",
        )
    version = add_version(bundle_dir, store, client=client)
    if on_canary is not None:
        on_canary(version_dir(store, version), version)
    record = {
        "version": version,
        "path": f"versions/{version}",
        "share": share,
        "production_version": production,
        "candidate_digest": digest,
        "started_at": _now(),
        "offline_gate": {k: gate.get(k) for k in ("passed", "reason", "rule") if k in gate},
    }
    storage.write_json(storage.join(store, CANARY), record, client=client)
    return CanaryResult(
        "started", version, production, f"serving {share:.0%} of requests beside {production}"
    )


def decide(
    store: str,
    model_version: np.ndarray,
    click: np.ndarray,
    margin: float = 0.0,
    confidence: float = 0.95,
    min_impressions: int = MIN_IMPRESSIONS,
    on_promote: OnPromote | None = None,
    client: Client | None = None,
    timestamp: np.ndarray | None = None,
    triggered: np.ndarray | None = None,
) -> CanaryResult:
    """Promote the running canary or roll it back on its online A/B against production.

    model_version, click (n,): the served log joined to its clicks (other versions' rows are
    not counted). timestamp (n,) epoch seconds, when the log has them: rows from before the
    canary started are not counted either, so both arms are compared over the same hours
    (production's older traffic would otherwise weigh in another day's CTR). Fewer than
    ``min_impressions`` canary rows: it keeps running. triggered (n,): where the two
    policies serve differently (``canary_ab`` "triggered", module docstring)."""
    record = read_canary(store, client=client)
    if record is None:
        raise StoreError(f"{store}: no canary is running ({CANARY} is missing)")
    if timestamp is not None:
        since = _epoch(record["started_at"])
        keep = ~(np.asarray(timestamp, np.float64) < since)  # NaN (no time): kept
        model_version, click = np.asarray(model_version)[keep], np.asarray(click)[keep]
        triggered = None if triggered is None else np.asarray(triggered)[keep]
    version = record["version"]
    production = current_version(store, client=client)
    n = int((np.asarray(model_version) == version).sum())
    if n < min_impressions:
        return CanaryResult(
            "continue",
            version,
            production,
            f"{n} impressions of canary '{version}' in the log, fewer than {min_impressions}: "
            "keep serving it",
        )
    gate = canary_gate(
        model_version,
        click,
        version,
        production,
        record["candidate_digest"],
        margin,
        confidence,
        triggered,
    )
    if gate["passed"]:
        result = promote(
            version_dir(store, version), store, version, gate, on_promote, client=client
        )
        if not result.deployed:  # e.g. production moved meanwhile: the canary keeps running
            raise StoreError(f"canary '{version}' not promoted: {result.reason}")
        action = "promoted"
    else:
        action = "rolled_back"
    _close(store, record, action, gate, client)
    return CanaryResult(action, version, production, gate["reason"], gate)


def run_start(
    bundle_dir: str,
    store: str,
    share: float,
    gate_path: str,
    on_canary: OnCanary | None = None,
    client: Client | None = None,
) -> CanaryResult:
    """``genco canary start`` and the pipeline's start-canary step: ``start`` with the gate
    read from the evaluate step's file."""
    return start(bundle_dir, store, share, read_gate(gate_path, client), on_canary, client)


def run_decide(
    store: str,
    data_dir: str,
    margin: float = 0.0,
    confidence: float = 0.95,
    min_impressions: int = MIN_IMPRESSIONS,
    on_promote: OnPromote | None = None,
    client: Client | None = None,
    canary_ab: str = "all",
) -> CanaryResult:
    """``genco canary decide`` and the pipeline's decide-canary step: ``decide`` on the
    joined served log at ``data_dir`` (read only once a canary is known to run); with
    ``canary_ab`` "triggered", on the requests where the two bundles' greedy picks differ."""
    if canary_ab not in ("all", "triggered"):
        raise ConfigError(f"canary_ab must be 'all' or 'triggered', got '{canary_ab}'")
    record = read_canary(store, client=client)
    if record is None:
        raise StoreError(f"{store}: no canary is running (start one: genco canary start)")
    version, click, when = arms(data_dir, client)
    triggered = None
    if canary_ab == "triggered":
        triggered = triggered_rows(store, record["version"], data_dir, client)
    return decide(
        store, version, click, margin, confidence, min_impressions, on_promote, client, when,
        triggered,
    )  # fmt: skip


def triggered_rows(
    store: str, canary_version: str, data_dir: str, client: Client | None = None
) -> np.ndarray:
    """Per row of the joined served log at ``data_dir``: True where production's and the
    canary's greedy picks differ for the row's ad and context (``policies_differ``)."""
    ids = storage.read_table(storage.join(data_dir, IDS_FILE), client=client)
    if SERVED_MODE in ids.columns:
        bad = np.flatnonzero(ids[SERVED_MODE].astype(str).to_numpy() == "thompson")
        if len(bad):
            raise ContractError(
                f"{data_dir}: served-log row {ids['served_row'].iloc[bad[0]]} has mode "
                "'thompson': posterior draws differ on every request, so the triggered A/B "
                "does not apply (use canary_ab 'all')"
            )
    production = current_version(store, client=client)
    prod = Predictor.load(version_dir(store, production), client=client)
    canary = Predictor.load(version_dir(store, canary_version), client=client)
    joined = storage.read_table(storage.join(data_dir, JOINED_FILE), client=client)
    ads = prod.catalog.ads.codes(joined[AD].astype(str).to_numpy())
    if np.any(ads < 0):
        row = int(np.flatnonzero(ads < 0)[0])
        raise ContractError(
            f"{data_dir}: {JOINED_FILE} row {row + 1}: ad_id '{joined[AD].iloc[row]}' is not "
            f"in production's catalog ({production})"
        )
    cols = list(prod.context_columns)
    missing = [c for c in cols if c not in joined.columns]
    if missing:
        raise ContractError(f"{data_dir}: {JOINED_FILE} has no context column '{missing[0]}'")
    ctx = joined[cols].to_numpy(np.float32) if cols else None
    return policies_differ(prod, canary, ads, ctx)


def stop(store: str, reason: str, client: Client | None = None) -> CanaryResult:
    """Roll the running canary back by hand (production never moved)."""
    record = read_canary(store, client=client)
    if record is None:
        raise StoreError(f"{store}: no canary is running ({CANARY} is missing)")
    _close(store, record, "stopped", None, client, reason)
    production = current_version(store, client=client)
    return CanaryResult("rolled_back", record["version"], production, f"stopped: {reason}")


def _close(store, record, action, gate, client, reason: str | None = None) -> None:
    """Keep the decided canary's record under ``canaries/``, then remove CANARY.json."""
    closed = {**record, "decision": action, "decided_at": _now(), "reason": reason}
    if gate is not None:
        closed["online_gate"] = gate
    history = storage.join(store, HISTORY, f"{record['version']}.json")
    storage.write_json(history, closed, client=client)
    storage.remove(storage.join(store, CANARY), client=client)


def _gate_problem(gate: dict, digest: str, production: str) -> str | None:
    if not isinstance(gate, dict) or not isinstance(gate.get("passed"), bool):
        return "not a gate record ('passed' must be true or false)"
    if gate["passed"]:
        return "the offline gate passed: deploy the candidate (genco deploy), no canary needed"
    if gate.get("candidate_digest") != digest:
        return (
            f"the gate was computed for another bundle (candidate_digest "
            f"'{str(gate.get('candidate_digest'))[:16]}', this bundle's is '{digest[:16]}')"
        )
    if gate.get("production_version") != production:
        return (
            f"production changed since the evaluation (evaluated against "
            f"{gate.get('production_version')}, now {production}); evaluate again"
        )
    return None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _epoch(iso: str) -> float:
    return float(calendar.timegm(time.strptime(iso, "%Y-%m-%dT%H:%M:%SZ")))
