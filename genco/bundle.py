"""Model files: config + state_dict + vocabularies + sha256, rebuilt by one loader.

Nothing is pickled: weights load with ``torch.load(..., weights_only=True)`` and everything
else is JSON. Evaluate, deploy, the CLI and the serving handler all load through here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io

import torch

from genco import storage
from genco.reward import RewardModel, RewardModelConfig, Vocab

REWARD_WEIGHTS = "reward_model.pt"
REWARD_META = "reward_model.json"
FORMAT = "genco.reward_model/1"


class BundleError(ValueError):
    """A model directory that is missing, incomplete, tampered with or of another format."""


def _state_bytes(module: torch.nn.Module) -> bytes:
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    return buf.getvalue()


def save_reward_model(
    model: RewardModel, out_dir: str, extra: dict | None = None, client=None
) -> str:
    """Write weights then metadata (the metadata names the weights' sha256)."""
    data = _state_bytes(model)
    storage.write_bytes(storage.join(out_dir, REWARD_WEIGHTS), data, client=client)
    meta = {
        "format": FORMAT,
        "config": dataclasses.asdict(model.config),
        "vocab": model.vocab.to_dict(),
        "sha256": hashlib.sha256(data).hexdigest(),
        **(extra or {}),
    }
    path = storage.join(out_dir, REWARD_META)
    storage.write_json(path, meta, client=client)
    return path


def load_reward_model(model_dir: str, client=None) -> tuple[RewardModel, dict]:
    """Rebuild a reward model from its directory, checking format and checksum."""
    meta_path = storage.join(model_dir, REWARD_META)
    try:
        meta = storage.read_json(meta_path, client=client)
        data = storage.read_bytes(storage.join(model_dir, REWARD_WEIGHTS), client=client)
    except FileNotFoundError as exc:
        raise BundleError(f"{model_dir}: not a reward model directory ({exc})") from exc
    if meta.get("format") != FORMAT:
        raise BundleError(f"{meta_path}: format '{meta.get('format')}' is not '{FORMAT}'")
    digest = hashlib.sha256(data).hexdigest()
    if digest != meta.get("sha256"):
        raise BundleError(
            f"{model_dir}: {REWARD_WEIGHTS} sha256 {digest[:12]}... does not match the "
            f"recorded {str(meta.get('sha256'))[:12]}..."
        )
    model = RewardModel(Vocab.from_dict(meta["vocab"]), RewardModelConfig(**meta["config"]))
    model.load_state_dict(torch.load(io.BytesIO(data), weights_only=True))
    model.eval()
    return model, meta
