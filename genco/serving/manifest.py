"""The KServe InferenceService for a model store's state: production alone, or production
with a canary taking ``canaryTrafficPercent`` of the requests.

The template is ``serving/kserve.yaml``'s InferenceService (the ServingRuntime beside it is
applied once and does not change). Production serves from ``STORE/kserve``, a canary from
``STORE/kserve-canary`` (``genco.serving.archive.canary_hook`` publishes it). KServe's canary
rollout (serverless mode, Knative) routes ``canaryTrafficPercent`` of the traffic to the
latest revision and the rest to the last ready one, so applying the canary manifest over
the production one splits the traffic, and applying the production manifest again after
the canary was promoted or rolled back sends all of it to one revision (which loads
whatever ``STORE/kserve`` serves by then)::

    genco canary manifest --store gs://BUCKET/genco/store | kubectl apply -n NS -f -
"""

from __future__ import annotations

import copy
import math

import yaml

from genco.data import storage
from genco.errors import ConfigError
from genco.serving.archive import KSERVE_CANARY_DIR, KSERVE_DIR, SERVING_DIR

KIND = "InferenceService"


def template() -> dict:
    """The InferenceService document of ``serving/kserve.yaml``."""
    path = SERVING_DIR / "kserve.yaml"
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") == KIND]
    if len(docs) != 1:
        raise ConfigError(f"{path}: expected one {KIND} document, found {len(docs)}")
    return docs[0]


def inference_service(
    storage_uri: str, canary_share: float | None = None, name: str | None = None
) -> dict:
    """The InferenceService serving the store at ``storage_uri`` (as the cluster reaches it:
    gs://, s3://, pvc://...), with a canary on ``canary_share`` of the traffic when given."""
    doc = copy.deepcopy(template())
    if name:
        doc["metadata"]["name"] = name
    predictor = doc["spec"]["predictor"]
    if canary_share is None:
        predictor["model"]["storageUri"] = storage.join(storage_uri, KSERVE_DIR)
        predictor.pop("canaryTrafficPercent", None)
        return doc
    if not 0.0 < canary_share < 1.0:
        raise ConfigError(f"canary share must be in (0, 1), got {canary_share}")
    # KServe takes a whole percent; at least 1 so that a small share still gets traffic.
    predictor["canaryTrafficPercent"] = max(1, min(99, math.floor(canary_share * 100 + 0.5)))
    predictor["model"]["storageUri"] = storage.join(storage_uri, KSERVE_CANARY_DIR)
    return doc


def render(doc: dict) -> str:
    return yaml.safe_dump(doc, sort_keys=False)
