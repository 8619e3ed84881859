"""The true CTR of any combination in a simulated world (``GroundTruth``).

    logit = base + appeal[a] + ctx_appeal . x
          + sum_k  main[k][e_k] * (1 + flip * s(x))          # s(x) = +1/-1 from ctx_0
          + sum_{k<l} style[k][e_k] . W[k,l] . style[l][e_l]  # pairwise, through styles
          + sum_{k<l<m} W3[k,l,m] . (style_k x style_l x style_m)   # three-way, if any

clipped to CTR in [CTR_MIN, CTR_MAX].
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field

import numpy as np

from genco.data import storage
from genco.data.contract import Catalog, code_maps
from genco.worlds.config import WorldConfig

CTR_MIN, CTR_MAX = 0.005, 0.15
_LOGIT_MIN, _LOGIT_MAX = (
    float(np.log(CTR_MIN / (1 - CTR_MIN))),
    float(np.log(CTR_MAX / (1 - CTR_MAX))),
)


@dataclass
class GroundTruth:
    """True CTR of any combination, in the world's own (catalog) codes.

    Arrays: appeal (n_ads,), ctx_appeal (n_ctx,), main[k] (n_elements_k,),
    style[k] (n_elements_k, rank), inter[(k, l)] (rank, rank).
    """

    config: WorldConfig
    ads: tuple[str, ...]
    components: tuple[str, ...]
    elements: tuple[tuple[str, ...], ...]
    appeal: np.ndarray
    ctx_appeal: np.ndarray
    main: list[np.ndarray]
    style: list[np.ndarray]
    inter: dict[tuple[int, int], np.ndarray]
    cold: list[np.ndarray]  # boolean (n_elements_k,) never logged
    # (k, l, m) -> (rank, rank, rank): three-way terms over styles; empty in most worlds
    inter3: dict[tuple[int, int, int], np.ndarray] = field(default_factory=dict)

    @property
    def n_context(self) -> int:
        return len(self.ctx_appeal)

    def logit(
        self, ads: np.ndarray, combos: np.ndarray, ctx: np.ndarray | None = None
    ) -> np.ndarray:
        """True logits. ads (n,), combos (n, K) element codes, ctx (n, n_ctx) or None."""
        z = self.config.base_logit + self.appeal[ads]
        sign = np.ones(len(ads))
        if self.n_context:
            if ctx is None:
                raise ValueError(f"world '{self.config.name}' needs context columns")
            z = z + ctx @ self.ctx_appeal
            sign = np.where(ctx[:, 0] > 0.5, 1.0, -1.0)
        flip = 1.0 + self.config.context_flip * sign
        for k in range(len(self.components)):
            z = z + self.main[k][combos[:, k]] * flip
        for (k, m), w in self.inter.items():
            z = z + np.einsum(
                "nr,rs,ns->n", self.style[k][combos[:, k]], w, self.style[m][combos[:, m]]
            )
        for (k, m, j), w in self.inter3.items():
            z = z + np.einsum(
                "nr,rst,ns,nt->n",
                self.style[k][combos[:, k]],
                w,
                self.style[m][combos[:, m]],
                self.style[j][combos[:, j]],
            )
        return np.clip(z, _LOGIT_MIN, _LOGIT_MAX)

    def element_effects(self) -> list[np.ndarray]:
        """Each element's average marginal effect on the logit, centred per component.

        E[logit | e_k = e] - E[logit] with every other component drawn uniformly from its
        catalog elements and ctx_0 a fair coin (so the flip averages out): the main effect
        plus each pairwise term averaged over the partner component. Unlike a split of the
        pairwise terms, this is identified from clicks, so models can be compared on it.
        """
        out = [m.copy() for m in self.main]
        for (k, m), w in self.inter.items():
            out[k] += self.style[k] @ w @ self.style[m].mean(0)
            out[m] += self.style[m] @ w.T @ self.style[k].mean(0)
        for (k, m, j), w in self.inter3.items():
            mk, mm, mj = (self.style[c].mean(0) for c in (k, m, j))
            out[k] += np.einsum("nr,rst,s,t->n", self.style[k], w, mm, mj)
            out[m] += np.einsum("ns,rst,r,t->n", self.style[m], w, mk, mj)
            out[j] += np.einsum("nt,rst,r,s->n", self.style[j], w, mk, mm)
        return [o - o.mean() for o in out]

    def ctr(self, ads: np.ndarray, combos: np.ndarray, ctx: np.ndarray | None = None) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-self.logit(ads, combos, ctx)))

    def aligned(self, catalog: Catalog) -> tuple[np.ndarray, list[np.ndarray]]:
        """Maps from another catalog's codes (same ids) to this world's codes."""
        return code_maps(self.ads, self.components, self.elements, catalog)

    # Persistence: plain arrays + JSON, nothing pickled.
    def save(self, path: str, client=None) -> None:
        arrays: dict[str, np.ndarray] = {
            "appeal": self.appeal,
            "ctx_appeal": self.ctx_appeal,
        }
        for k in range(len(self.components)):
            arrays[f"main_{k}"] = self.main[k]
            arrays[f"style_{k}"] = self.style[k]
            arrays[f"cold_{k}"] = self.cold[k]
        for (k, m), w in self.inter.items():
            arrays[f"inter_{k}_{m}"] = w
        for (k, m, j), w in self.inter3.items():
            arrays[f"inter3_{k}_{m}_{j}"] = w
        meta = {
            "config": asdict(self.config),
            "ads": list(self.ads),
            "components": list(self.components),
            "elements": [list(e) for e in self.elements],
        }

        buf = io.BytesIO()
        np.savez(buf, meta=np.array(json.dumps(meta)), **arrays)
        storage.write_bytes(path, buf.getvalue(), client=client)

    @staticmethod
    def load(path: str, client=None) -> GroundTruth:

        with np.load(io.BytesIO(storage.read_bytes(path, client=client)), allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            n_comp = len(meta["components"])
            inter, inter3 = {}, {}
            for name in z.files:
                if name.startswith("inter_"):
                    _, k, m = name.split("_")
                    inter[(int(k), int(m))] = z[name]
                elif name.startswith("inter3_"):
                    _, k, m, j = name.split("_")
                    inter3[(int(k), int(m), int(j))] = z[name]
            return GroundTruth(
                config=WorldConfig(**meta["config"]),
                ads=tuple(meta["ads"]),
                components=tuple(meta["components"]),
                elements=tuple(tuple(e) for e in meta["elements"]),
                appeal=z["appeal"],
                ctx_appeal=z["ctx_appeal"],
                main=[z[f"main_{k}"] for k in range(n_comp)],
                style=[z[f"style_{k}"] for k in range(n_comp)],
                inter=inter,
                cold=[z[f"cold_{k}"] for k in range(n_comp)],
                inter3=inter3,
            )
