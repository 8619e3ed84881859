"""The TorchServe handler and ``genco.serving.requests``, in process: a real TorchServe ``Context``
around the handler unpacked from a real ``.mar`` of a tiny bundle."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import math
import zipfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
from ts.context import Context, RequestProcessor

from genco.errors import RequestError
from genco.inference.predictor import Predictor
from genco.models.checkpoint import bundle_version, check_version
from genco.serving import archive, limits
from genco.serving import requests as rest
from genco.store import promote

VERSION = "v1"
AD0 = "ad_0000"


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Training and serving code sets no thread count; on a busy 2-core CI box two intra-op
    threads made the tiny training ~10x slower than one. Restored after, for other tests."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def tiny_bundle(factory: pytest.TempPathFactory) -> str:
    """The default world (seed 0) trained briefly; built once per session, shared by the
    serving test modules through the session's base temp dir."""
    root = factory.getbasetemp() / "serving_bundle"
    bundle = root / "bundle"
    if not (bundle / "manifest.json").exists():
        from genco.models.generator import GeneratorConfig
        from genco.models.reward import RewardModelConfig
        from genco.training.bundle import run_train
        from genco.worlds.simulate import simulate

        world = simulate("default", seed=0, out_dir=str(root / "world"), n_impressions=20_000)
        with one_torch_thread():
            run_train(
                world.catalog,
                world.impressions,
                str(bundle),
                constraints_path=world.constraints,
                reward_config=RewardModelConfig(epochs=3),
                generator_config=GeneratorConfig(rl_steps=30),
            )
    return str(bundle)


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return tiny_bundle(tmp_path_factory)


@pytest.fixture(scope="session")
def predictor(bundle_dir: str) -> Predictor:
    return rest.load_predictor(bundle_dir, threads=None)


@pytest.fixture(scope="session")
def mar(bundle_dir: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    return archive.build_mar(bundle_dir, str(tmp_path_factory.mktemp("mar")), VERSION)


@pytest.fixture(scope="session")
def model_dir(mar: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The archive unpacked as TorchServe unpacks it for a worker."""
    out = tmp_path_factory.mktemp("model_dir")
    with zipfile.ZipFile(mar) as z:
        z.extractall(out)
    return out


def _context(model_dir: Path, headers: list[dict[str, str]]) -> Context:
    manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
    ctx = Context("genco", str(model_dir), manifest, batch_size=8, gpu=None, mms_version="0.12.0")
    ctx.request_processor = [RequestProcessor(h) for h in headers]
    return ctx


@pytest.fixture(scope="session")
def handler(model_dir: Path) -> Any:
    """The archived handler module, imported from the unpacked archive and initialised."""
    spec = importlib.util.spec_from_file_location("genco_mar_handler", model_dir / "handler.py")
    assert spec is not None and spec.loader is not None
    module: ModuleType = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    h = module.GencoHandler()
    with one_torch_thread():  # initialize sets one thread, as a worker should; undo it here
        h.initialize(_context(model_dir, [{}]))
    return h


def _run(handler: Any, model_dir: Path, rows: list[Any], headers: list[dict] | None = None):
    ctx = _context(model_dir, headers or [{} for _ in rows])
    bodies = [json.loads(b) for b in handler.handle(rows, ctx)]  # compact JSON bytes
    statuses = [ctx.get_response_status(i)[0] for i in range(len(ctx.request_processor))]
    return statuses, bodies, ctx


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


# ------------------------------------------------------------------------- archive


def test_mar_holds_handler_config_and_versioned_bundle(mar: str) -> None:
    assert Path(mar).name == "genco-v1.mar"
    with zipfile.ZipFile(mar) as z:
        names = set(z.namelist())
        manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))
        bundle_manifest = json.loads(z.read("manifest.json"))
    assert {"handler.py", "model-config.yaml", *archive.REQUIRED_BUNDLE_FILES} <= names
    assert "constraints.csv" in names
    assert manifest["model"]["modelName"] == "genco"
    assert manifest["model"]["modelVersion"] == VERSION
    assert manifest["model"]["handler"] == "handler.py"
    assert bundle_manifest["version"] == VERSION  # what each response reports


def test_build_mar_refuses_what_is_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"not a bundle \(missing manifest.json\)"):
        archive.build_mar(str(tmp_path), str(tmp_path / "out"), VERSION)


@pytest.mark.parametrize("version", ["", "v 1", "-v1", "2026-11-28T14:10:38Z", "a/b"])
def test_versions_must_be_url_and_file_safe(version: str) -> None:
    with pytest.raises(ValueError, match="must be 1-128 letters, digits"):
        check_version(version)


def test_one_version_rule_for_store_archive_and_predictor(bundle_dir: str, tmp_path: Path) -> None:
    manifest = (Path(bundle_dir) / "manifest.json").read_bytes()
    created = json.loads(manifest)["created_at"]
    stamp = created.replace("-", "").replace(":", "")
    expected = f"{stamp}-{hashlib.sha256(manifest).hexdigest()[:8]}"
    assert bundle_version(bundle_dir) == expected
    assert promote(bundle_dir, str(tmp_path / "store")).version == expected
    assert Predictor.load(bundle_dir).version == expected


def test_kserve_layout_is_switched_by_its_config(mar: str, bundle_dir: str, tmp_path: Path):
    store = str(tmp_path / "store")
    layout = archive.write_kserve_layout(mar, store, VERSION)
    assert Path(layout.mar) == tmp_path / "store" / "model-store" / "genco-v1.mar"
    props = dict(
        line.split("=", 1) for line in Path(layout.config).read_text().splitlines() if line
    )
    snapshot = json.loads(props["model_snapshot"])
    assert snapshot["models"]["genco"][VERSION]["marName"] == "genco-v1.mar"
    assert snapshot["models"]["genco"][VERSION]["batchSize"] == 8  # rows answered one by one
    assert props["model_store"] == "/mnt/models/model-store"
    assert props["disable_token_authorization"] == "false"  # secure by default
    v2 = archive.build_mar(bundle_dir, str(tmp_path / "build"), "v2")
    archive.write_kserve_layout(v2, store, "v2")
    assert '"v2":' in Path(layout.config).read_text()
    archive.set_kserve_version(store, VERSION)  # rollback is a config rewrite
    assert '"v1":' in Path(layout.config).read_text()
    with pytest.raises(FileNotFoundError, match="no archive for version 'v9'"):
        archive.set_kserve_version(store, "v9")


def test_kserve_layout_on_gcs(mar: str, gcs: Any) -> None:
    from genco.data import storage

    store = gcs.url("kserve")
    layout = archive.write_kserve_layout(mar, store, VERSION, client=gcs.client)
    assert layout.mar == f"{store}/model-store/genco-v1.mar"
    assert storage.read_bytes(layout.mar, client=gcs.client) == Path(mar).read_bytes()
    assert "genco-v1.mar" in storage.read_text(layout.config, client=gcs.client)


def test_on_promote_archives_and_points_the_store(bundle_dir: str, tmp_path: Path) -> None:
    on_promote = archive.make_on_promote(str(tmp_path / "store"))
    switch = on_promote(bundle_dir, "20261128T000000Z-abcdef12")
    root = tmp_path / "store" / archive.KSERVE_DIR
    assert (root / "model-store" / "genco-20261128T000000Z-abcdef12.mar").is_file()
    assert not (root / "config").exists()  # switched only once the store's pointer moved
    switch()
    assert (
        "genco-20261128T000000Z-abcdef12.mar" in (root / "config" / "config.properties").read_text()
    )


def _cli(argv: list[str]) -> None:
    """``genco <verb>`` through the verbs' own parser registration."""
    import argparse

    from genco.cli.serve import add_commands

    parser = argparse.ArgumentParser(prog="genco")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.func(args)


def test_cli_archive_writes_the_layout(
    bundle_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _cli(["archive", "--model", bundle_dir, "--store", str(tmp_path), "--version", "v7"])
    out = json.loads(capsys.readouterr().out)
    assert out["version"] == "v7"
    assert Path(out["kserve"]["mar"]) == tmp_path / "model-store" / "genco-v7.mar"
    assert "torchserve" not in out


def test_cli_archive_names_an_unreachable_management_url(bundle_dir: str, tmp_path: Path):
    url = "http://127.0.0.1:9"  # discard port: nothing listens
    with pytest.raises(ValueError, match=r"^http://127.0.0.1:9: "):
        _cli(["archive", "--model", bundle_dir, "--store", str(tmp_path), "--management-url", url])
    # A failed registration leaves the layout as it was: no archive, no switch.
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------- handler


def test_initialize_loads_the_archived_version(handler: Any) -> None:
    assert handler.initialized
    assert handler.predictor.version == VERSION


def test_batch_answers_each_request_on_its_own(handler: Any, model_dir: Path) -> None:
    rows = [
        {"body": {"ad_id": AD0, "top_k": 2}},
        {"body": b'{"ad_id": '},  # TorchServe forwards raw bytes when JSON decoding failed
        {"body": {"ad_id": "ad_9999"}},
        {"body": json.dumps({"ad_id": "ad_0001", "top_k": 3}).encode()},
    ]
    statuses, bodies, ctx = _run(handler, model_dir, rows)
    assert statuses == [200, 400, 404, 200]
    assert ctx.get_response_status(1) == (400, "Bad Request")
    assert [len(bodies[i]["recommendations"]) for i in (0, 3)] == [2, 3]
    assert bodies[0]["model_version"] == VERSION
    assert bodies[1]["error"]["field"] == "body"
    assert bodies[2]["error"] == {
        "status": 404,
        "field": "ad_id",
        "message": "ad_id: 'ad_9999' is not in the model's catalog",
    }
    assert ctx.get_response_content_type(0) == "application/json"


def test_explanations_endpoint_header_adds_attributions(handler: Any, model_dir: Path) -> None:
    rows = [{"body": {"ad_id": AD0, "top_k": 2}}] * 2
    _, bodies, _ = _run(handler, model_dir, rows, [{"explain": "True"}, {}])
    assert all("attribution" in r for r in bodies[0]["recommendations"])
    assert all("attribution" not in r for r in bodies[1]["recommendations"])


# ---------------------------------------------------------------- request validation

BAD_REQUESTS: list[tuple[object, int, str]] = [
    (
        b"{",
        400,
        "body: not valid JSON (Expecting property name enclosed in double quotes: "
        "line 1 column 2 (char 1))",
    ),
    (b"", 400, "body: empty; send a JSON object"),
    (None, 400, "body: empty; send a JSON object"),
    (b"[1, 2]", 400, "body: must be a JSON object, got array"),
    (
        b"\xff\xfe",
        400,
        "body: not valid JSON ('utf-8' codec can't decode byte 0xff in "
        "position 0: invalid start byte)",
    ),
    (b" " * 70_000, 413, "body: 70000 bytes is over the limit of 65536"),
    ({"ad_id": "x" * 70_000}, 413, "body: 70012 bytes is over the limit of 65536"),
    ({}, 400, "ad_id: give either ad_id or candidates (exactly one)"),
    ({"ad_id": AD0, "candidates": {}}, 400, "ad_id: give either ad_id or candidates (exactly one)"),
    ({"ad_id": 7}, 400, "ad_id: must be a string, got number"),
    ({"ad_id": " "}, 400, "ad_id: must not be empty"),
    ({"ad_id": "ad_9999"}, 404, "ad_id: 'ad_9999' is not in the model's catalog"),
    (
        {"ad": AD0},
        400,
        "ad: unknown field (allowed: ad_id, candidates, constraints, top_k, "
        "mode, refine, explain, temperature, explore, seed, ctx_*)",
    ),
    ({"ad_id": AD0, "explore": 1.5}, 400, "explore: must be a number in [0, 1], got 1.5"),
    ({"ad_id": AD0, "explore": "all"}, 400, "explore: must be a number in [0, 1], got 'all'"),
    ({"ad_id": AD0, "top_k": 0}, 400, "top_k: must be an integer in [1, 100], got 0"),
    ({"ad_id": AD0, "top_k": 101}, 400, "top_k: must be an integer in [1, 100], got 101"),
    ({"ad_id": AD0, "top_k": "5"}, 400, "top_k: must be an integer in [1, 100], got '5'"),
    ({"ad_id": AD0, "top_k": True}, 400, "top_k: must be an integer in [1, 100], got True"),
    ({"ad_id": AD0, "top_k": 2.5}, 400, "top_k: must be an integer in [1, 100], got 2.5"),
    (
        {"ad_id": AD0, "mode": "greedy"},
        400,
        "mode: must be one of beam, sample, thompson, got 'greedy'",
    ),
    (
        {"ad_id": AD0, "refine": "all"},
        400,
        "refine: must be one of pairs, single, none, got 'all'",
    ),
    ({"ad_id": AD0, "explain": "yes"}, 400, "explain: must be true or false, got string"),
    ({"ad_id": AD0, "temperature": 0}, 400, "temperature: must be a number > 0, got 0"),
    ({"ad_id": AD0, "seed": -1}, 400, "seed: must be an integer in [0, 2^63), got -1"),
    ({"ad_id": AD0, "ctx_0": 1.0}, 400, "ctx_0: unknown context column (the model's: none)"),
    ({"candidates": []}, 400, "candidates: must be an object, got array"),
    (
        {"candidates": {"title": ["a"], "image": ["b"]}},
        400,
        "candidates.highlight: missing: every component needs candidates",
    ),
    (
        {"candidates": {"title": ["a"], "image": ["b"], "highlight": ["c"], "logo": ["d"]}},
        400,
        "candidates.logo: unknown component (the model's: title, image, highlight)",
    ),
    (
        {"candidates": {"title": [], "image": ["b"], "highlight": ["c"]}},
        400,
        "candidates.title: must not be empty: every component needs a candidate",
    ),
    (
        {"candidates": {"title": "a", "image": ["b"], "highlight": ["c"]}},
        400,
        "candidates.title: must be an array of element ids, got string",
    ),
    (
        {"candidates": {"title": [1], "image": ["b"], "highlight": ["c"]}},
        400,
        "candidates.title[0]: must be a string, got number",
    ),
    (
        {"candidates": {"title": ["a", "a"], "image": ["b"], "highlight": ["c"]}},
        400,
        "candidates.title[1]: duplicate element 'a'",
    ),
    (
        {"candidates": {"title": [{"name": "a"}], "image": ["b"], "highlight": ["c"]}},
        400,
        "candidates.title[0].id: must be a string, got null",
    ),
    (
        {"candidates": {"title": [{"id": "a", "feat_0": "x"}], "image": ["b"], "highlight": ["c"]}},
        400,
        "candidates.title[0].feat_0: must be a finite number, got string",
    ),
    (
        {"candidates": {"title": [{"id": "a", "feat_9": 1}], "image": ["b"], "highlight": ["c"]}},
        400,
        "candidates.title[0].feat_9: unknown feature (the model's features: feat_0, feat_1, "
        "feat_2, feat_3)",
    ),
    (
        {
            "candidates": {
                "title": [f"t{i}" for i in range(300)],
                "image": ["b"],
                "highlight": ["c"],
            }
        },
        413,
        "candidates.title: 300 candidates, at most 256",
    ),
    ({"ad_id": AD0, "constraints": {}}, 400, "constraints: must be an array, got object"),
    ({"ad_id": AD0, "constraints": ["x"]}, 400, "constraints[0]: must be an object, got string"),
    (
        {"ad_id": AD0, "constraints": [{"component_a": "title"}]},
        400,
        "constraints[0].element_a: must be a string, got null",
    ),
    (
        {
            "ad_id": AD0,
            "constraints": [
                {
                    "component_a": "logo",
                    "element_a": "x",
                    "component_b": "image",
                    "element_b": "ima_000",
                }
            ],
        },
        400,
        "constraints[0].component_a: unknown component 'logo' (the model's: title, image, "
        "highlight)",
    ),
    (
        {
            "ad_id": AD0,
            "constraints": [
                {
                    "component_a": "title",
                    "element_a": "tit_001",
                    "component_b": "image",
                    "element_b": "ima_000",
                }
            ],
        },
        400,
        "constraints[0].element_a: 'tit_001' is not a candidate of 'title'",
    ),
    (
        {
            "ad_id": AD0,
            "constraints": [
                {
                    "component_a": "title",
                    "element_a": "tit_000",
                    "component_b": "title",
                    "element_b": "tit_002",
                }
            ],
        },
        400,
        "constraints[0].component_b: must differ from component_a",
    ),
    (
        {
            "candidates": {"title": ["a"], "image": ["b"], "highlight": ["c"]},
            "constraints": [
                {"component_a": "title", "element_a": "a", "component_b": "image", "element_b": "b"}
            ],
        },
        400,
        "constraints: no legal element left for component 0 given the earlier picks: the "
        "constraints leave this ad without a legal completion",
    ),
]


@pytest.mark.parametrize(("body", "status", "message"), BAD_REQUESTS)
def test_bad_requests_name_the_field(
    predictor: Predictor, body: object, status: int, message: str
) -> None:
    [result] = rest.handle_batch(predictor, [body])
    assert isinstance(result, RequestError)
    assert (result.status, str(result)) == (status, message)
    assert message.startswith(f"{result.field}: ")


# ------------------------------------------------------------------------ invariants


def test_beam_is_ranked_legal_and_explained(predictor: Predictor) -> None:
    body = rest.predict(
        predictor, rest.parse_request({"ad_id": AD0, "top_k": 10, "explain": True}, predictor)
    )
    recs = body["recommendations"]
    assert [r["rank"] for r in recs] == list(range(1, 11))
    scores = [r["score"] for r in recs]
    assert scores == sorted(scores, reverse=True)
    combos = [tuple(r["elements"].values()) for r in recs]
    assert len(set(combos)) == len(combos)
    cat = predictor.catalog
    a = cat.ad_code(AD0)
    codes = np.array(
        [[cat.element_code(k, e) for k, e in enumerate(c)] for c in combos], dtype=np.int64
    )
    for k in range(cat.n_components):  # only the ad's own candidates
        assert np.isin(codes[:, k], cat.candidates[a][k]).all()
    assert (predictor.constraints.violations(np.full(len(codes), a), codes) < 0).all()
    reward, _ = predictor.bound()
    base, _ = reward.credit(np.full(len(codes), a), codes, None)
    for r, b in zip(recs, base):  # attributions + the ad's base logit = the model's logit
        assert sum(r["attribution"].values()) + float(b) == pytest.approx(
            _logit(r["score"]), abs=1e-4
        )
    assert body["model_version"] == predictor.version


def test_sample_gives_propensities_and_is_seeded(predictor: Predictor) -> None:
    req = {"ad_id": AD0, "top_k": 8, "mode": "sample", "seed": 3}
    first = rest.predict(predictor, rest.parse_request(req, predictor))
    again = rest.predict(predictor, rest.parse_request(req, predictor))
    # the same draws; each response is its own impression
    assert first.pop("impression_id") != again.pop("impression_id")
    assert first == again
    props = [r["propensity"] for r in first["recommendations"]]
    assert props and all(0.0 < p <= 1.0 for p in props)
    beam = rest.predict(predictor, rest.parse_request({"ad_id": AD0}, predictor))
    assert all("propensity" not in r for r in beam["recommendations"])
    # explore = 1: every draw is the exploration draw, uniform over the ad's combinations
    # (no forbidden pair touches this ad's candidates here, else forward-checked uniform).
    n_combos = predictor.catalog.n_combinations(predictor.catalog.ad_code(AD0))
    wide = rest.predict(predictor, rest.parse_request({**req, "explore": 1.0}, predictor))
    uniform = [r["propensity"] for r in wide["recommendations"]]
    if not len(predictor.constraints):
        assert uniform == pytest.approx([1.0 / n_combos] * len(uniform))
    assert all(p >= 1.0 / n_combos - 1e-12 for p in uniform)


def test_refine_levels_rank_by_the_reward_model(predictor: Predictor) -> None:
    """A deeper search never ranks a lower-scoring combination first."""
    best = {}
    for refine in ("none", "single", "pairs"):
        req = {"ad_id": AD0, "top_k": 3, "refine": refine}
        body = rest.predict(predictor, rest.parse_request(req, predictor))
        recs = body["recommendations"]
        assert len(recs) == 3 and [r["rank"] for r in recs] == [1, 2, 3]
        best[refine] = recs[0]["score"]
    assert best["none"] <= best["single"] + 1e-9 <= best["pairs"] + 2e-9


def test_request_constraints_remove_the_best_pair(predictor: Predictor) -> None:
    best = rest.predict(predictor, rest.parse_request({"ad_id": AD0, "top_k": 1}, predictor))
    top = best["recommendations"][0]["elements"]
    pair = {
        "component_a": "title",
        "element_a": top["title"],
        "component_b": "image",
        "element_b": top["image"],
    }
    body = rest.predict(
        predictor,
        rest.parse_request({"ad_id": AD0, "top_k": 20, "constraints": [pair]}, predictor),
    )
    recs = body["recommendations"]
    assert recs
    assert not any(
        r["elements"]["title"] == top["title"] and r["elements"]["image"] == top["image"]
        for r in recs
    )
    for r in recs:  # the bundle's own forbidden pairs still hold
        e = r["elements"]
        assert not (e["title"] == "tit_002" and e["highlight"] == "hig_006")
        assert not (e["title"] == "tit_003" and e["image"] == "ima_000")


def test_inline_candidates_choose_among_the_given_elements(predictor: Predictor) -> None:
    candidates = {
        "title": ["tit_000", {"id": "new_title", "feat_0": 0.5, "feat_3": -1.0}],
        "image": ["ima_004", "ima_007"],
        "highlight": ["hig_001", "hig_003", "hig_004"],
    }
    body = rest.predict(
        predictor,
        rest.parse_request({"candidates": candidates, "top_k": 12, "explain": True}, predictor),
    )
    recs = body["recommendations"]
    assert "ad_id" not in body
    assert len(recs) == 12  # 2 x 2 x 3 combinations, all legal
    for r in recs:
        for comp, elem in r["elements"].items():
            ids = [e if isinstance(e, str) else e["id"] for e in candidates[comp]]
            assert elem in ids
    assert {r["elements"]["title"] for r in recs} == {"tit_000", "new_title"}


def test_known_inline_elements_keep_their_catalog_features(predictor: Predictor) -> None:
    req = rest.parse_request(
        {"candidates": {"title": ["tit_000"], "image": ["ima_004"], "highlight": ["hig_001"]}},
        predictor,
    )
    assert req.candidates is not None
    assert req.candidates["title"][0] == {
        "id": "tit_000",
        "feat_0": 0.298,
        "feat_1": -1.5329,
        "feat_2": -0.1774,
        "feat_3": -2.5548,
    }


def test_respond_maps_errors_to_their_status() -> None:
    err = rest.RequestError("top_k", "too big", 400)
    assert rest.respond([{"ok": 1}, err]) == [(200, {"ok": 1}), (400, err.to_dict())]
    assert rest.reason_phrase(413) == "Request Entity Too Large"
    assert limits.request_body({"data": b"x", "body": b"y"}) == b"y"  # JSON bodies only
    assert limits.request_body({"ad_id": AD0}) == {"ad_id": AD0}
