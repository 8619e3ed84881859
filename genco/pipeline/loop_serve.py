"""Serving one round of the closed loop (``genco.pipeline.loop``): the policies' draws with
their exact propensities, the served log, the exploration floor, the canary's early stop.

The canary round is served in ``checks`` consecutive parts. After each part the two arms'
clicks so far are compared (``genco.evaluation.online.canary_clearly_worse``); once the
canary is worse than production beyond doubt (the upper ``stop_confidence`` bound of its CTR
gain below zero) it stops: the rest of the round goes to production alone, which then logs
every remaining row with its own propensity. The stop only ever removes the canary, so it
cannot deploy anything. Symmetrically, once the canary is better beyond doubt (the lower
``stop_confidence`` bound of its gain above ``margin`` x production: the end-of-round gate's
rule at a stricter confidence, for the repeated looks) it is promoted there and serves the
rest of the round as production.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from genco.data.contract import AD, CLICK, IMPRESSION_ID, MODEL_VERSION, PROPENSITY, TIMESTAMP
from genco.errors import ConfigError
from genco.evaluation.bandits import ComboThompson, ElementThompson, UniformPeer
from genco.evaluation.online import canary_clearly_better, canary_clearly_worse, greedy_picks
from genco.inference.predictor import Predictor
from genco.worlds.simulate import T0
from genco.worlds.traffic import Traffic

DAY = 86_400.0


def serve(
    pred: Predictor, ads: np.ndarray, ctx: np.ndarray | None, rng, explore: float,
    temperature: float, thompson: bool = False,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """The bundle's policy on each request: codes (n, K) and exact propensities (n,)."""
    kw = {"explore": explore, "temperature": temperature, "thompson": thompson}
    combos = np.zeros((len(ads), pred.catalog.n_components), dtype=np.int64)
    prop = np.zeros(len(ads))
    if ctx is None:
        for a in np.unique(ads):
            rows = np.flatnonzero(ads == a)
            combos[rows], prop[rows] = pred.draw(int(a), None, len(rows), rng, **kw)
    else:
        for i in range(len(ads)):
            x = pred.context_vector(ctx[i])
            c, p = pred.draw(int(ads[i]), x, 1, rng, **kw)
            combos[i], prop[i] = c[0], p[0]
    return combos, prop


def serve_split(
    t: Traffic, pred: Predictor, canary: Predictor | None, ads, ctx, u, rng, explore: float,
    temperature: float, share: float, checks: int, stop_confidence: float, margin: float = 0.0,
    thompson: bool = False, triggered: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int | None, int | None]:  # fmt: skip
    """Production (and a canary on a random ``share`` of requests until it is stopped or
    promoted): codes (n, K), propensities (n,), model versions (n,), and the rows where the
    canary stopped and where it was promoted (None: it ran the whole round). triggered (n,):
    where the two serve differently; the mid-round looks then count only those requests."""
    n = len(ads)
    version = np.full(n, pred.version, dtype=object)
    arm = np.zeros(n, dtype=bool)
    if canary is not None:  # a random share of requests, as a traffic split
        arm = rng.random(n) < share
    combos = np.zeros((n, t.catalog.n_components), dtype=np.int64)
    prop = np.zeros(n)
    clicks = np.zeros(n, dtype=np.int8)
    stopped: int | None = None
    promoted: int | None = None
    prod = pred
    for part in np.array_split(np.arange(n), checks if canary is not None else 1):
        if stopped is not None or promoted is not None:
            arm[part] = False
        version[part] = prod.version
        if canary is not None:
            version[part[arm[part]]] = canary.version
        for who, rows_of in ((prod, part[~arm[part]]), (canary, part[arm[part]])):
            if len(rows_of):
                combos[rows_of], prop[rows_of] = serve(
                    who, ads[rows_of], None if ctx is None else ctx[rows_of], rng, explore,
                    temperature, thompson,
                )  # fmt: skip
        pc = None if ctx is None else ctx[part]
        clicks[part] = u[part] < t.ctr(ads[part], combos[part], pc)
        if canary is not None and stopped is None and promoted is None and part[-1] < n - 1:
            seen = slice(0, part[-1] + 1)
            on, c = arm[seen], clicks[seen]
            tc = tp = None
            if triggered is not None:
                tc, tp = triggered[seen][on], triggered[seen][~on]
            if canary_clearly_worse(c[on], c[~on], stop_confidence, tc, tp):
                stopped = int(part[-1] + 1)
            elif canary_clearly_better(c[on], c[~on], margin, stop_confidence, tc, tp):
                promoted, prod = int(part[-1] + 1), canary
    return combos, prop, version, stopped, promoted


def greedy_ctr(pred: Predictor, t: Traffic, ads: np.ndarray, ctx: np.ndarray | None) -> float:
    """True CTR of the bundle's greedy pick (beam top-1, what the gate judges) on requests."""
    return float(t.ctr(ads, greedy_picks(pred, ads, ctx), ctx).mean())


def served_frames(
    t: Traffic, r: int, ads, ctx, combos, prop, clicks, version, start: int = 0,
    total: int | None = None, mode: str = "sample",
) -> tuple[pd.DataFrame, pd.DataFrame]:  # fmt: skip
    """The served log (README "Served log") and the clicks file of rows ``start`` ..
    ``start + len(ads)`` of round ``r`` (``total`` rows in the round: ids and timestamps are
    the round's own, so a part of a round logs exactly the rows of the whole)."""
    cat, n = t.catalog, len(ads)
    total = n if total is None else total
    idx = np.arange(start, start + n)
    ids = np.array([f"r{r}-{i}" for i in idx], dtype=object)
    data: dict = {IMPRESSION_ID: ids, MODEL_VERSION: version}
    data[AD] = cat.ads.take(ads)
    for k, comp in enumerate(cat.components):
        data[comp] = cat.elements[k].take(combos[:, k])
    data[PROPENSITY] = prop
    data["mode"] = mode
    data[TIMESTAMP] = T0 + r * DAY + idx * (DAY / total)
    for j, col in enumerate(t.context_columns):
        data[col] = ctx[:, j]
    served = pd.DataFrame(data)
    clicked = pd.DataFrame({IMPRESSION_ID: ids[clicks == 1], CLICK: 1})
    return served, clicked


def floor_ratio(t: Traffic, ads: np.ndarray, prop: np.ndarray, explore: np.ndarray) -> float:
    """min over shown combinations of propensity / (explore / prod(candidates of the ad)),
    ``explore`` per row: the exploration floor holds when this is >= 1."""
    sizes = np.array([math.prod(len(c) for c in t.catalog.candidates[a]) for a in ads])
    return float(np.min(prop * sizes / explore))


def make_peers(names: tuple[str, ...], t: Traffic) -> dict:
    """The peers named (``genco.pipeline.loop.PEERS``), each a fresh bandit on ``t``."""
    out: dict = {}
    for name in names:
        if name == "uniform":
            out[name] = UniformPeer(t.legal)
        elif name.startswith("element_ts"):
            out[name] = ElementThompson(t.catalog, t.constraints, t.legal)
        elif name.startswith("combo_ts"):
            out[name] = ComboThompson(t.legal)
        else:
            try:
                from genco.evaluation.bandits_vw import VWOnline
            except ModuleNotFoundError as exc:
                raise ConfigError(
                    f"peer '{name}' needs {exc.name}: pip install 'genco[bench]', or leave it "
                    "out of --peers"
                ) from None
            out[name] = VWOnline(t.catalog, t.legal, len(t.context_columns))
    return out
