"""Arrow-backed vocabularies (``Ids``), their hash index (``Codes``) and ragged candidate
lists (``Candidates``): the catalog's structures at scale, checked against plain Python."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from genco.data.contract import Catalog, load_catalog
from genco.data.ids import Candidates, Codes, Ids
from genco.errors import ContractError, UnknownIdError
from genco.worlds.catalog import CatalogWorld, CatalogWorldConfig

IDS = ("b7", "a", "", "ü-1", "0", "00")


def test_ids_behave_as_a_sequence_of_str():
    ids = Ids(IDS)
    assert len(ids) == 6 and ids == IDS and ids == list(IDS) and tuple(ids) == IDS
    assert ids[0] == "b7" and ids[-1] == "00" and ids[1:3] == ("a", "")
    assert "ü-1" in ids and "zz" not in ids and 0 not in ids
    assert ids.index("0") == 4 and ids.code("00") == 5 and ids.code("000") == -1
    with pytest.raises(ValueError, match="not in the vocabulary"):
        ids.index("zz")
    with pytest.raises(IndexError):
        ids[6]
    assert ids.take(np.array([[5, 0], [3, 3]])).tolist() == [["00", "b7"], ["ü-1", "ü-1"]]
    assert np.asarray(ids, dtype=object).tolist() == list(IDS)
    assert ids != ("b7", "a") and ids != ("b7", "a", "", "ü-1", "0", "01")


def test_codes_of_an_arrow_column_and_of_str_objects():
    ids = Ids(IDS)
    col = pa.array(["a", None, "zz", "00", "a", "b7"])
    assert ids.codes(col).tolist() == [1, -1, -1, 5, 1, 0]
    assert ids.codes(pa.chunked_array([col[:2], col[2:]])).tolist() == [1, -1, -1, 5, 1, 0]
    assert ids.codes(np.array(["0", "x"], dtype=object)).tolist() == [4, -1]
    assert Ids([]).codes(["a"]).tolist() == [-1]


def test_colliding_hashes_never_pass_a_wrong_id():
    """Every id shares one hash: lookups walk the run and compare the ids themselves."""
    values = pa.array([f"id{i}" for i in range(50)])
    codes = Codes(values, hash_fn=lambda v: np.zeros(len(v), np.uint64))
    want = [49, 0, 17, -1, 17, -1]
    assert codes.lookup(["id49", "id0", "id17", "id50", "id17", ""]).tolist() == want
    assert [codes.lookup_one(v) for v in ("id49", "id0", "id17", "id50", "")] == [49, 0, 17, -1, -1]
    some = Codes(values, hash_fn=lambda v: np.array([len(s) % 2 for s in v], np.uint64))
    assert some.lookup(["id3", "id33", "nope"]).tolist() == [3, 33, -1]


def test_candidates_are_ragged_views_per_ad_and_component():
    nested = [([2, 0], [1]), ([1], [0, 3, 2])]
    cands = Candidates.from_nested(nested, 2)
    assert len(cands) == 2
    assert [c.tolist() for c in cands[1]] == [[1], [0, 2, 3]]  # sorted
    assert [c.tolist() for c in cands[-2]] == [[0, 2], [1]]
    assert cands.sizes(1).tolist() == [1, 3]
    ads, elems = cands.component(1)
    assert ads.tolist() == [0, 1, 1, 1] and elems.tolist() == [1, 0, 2, 3]
    with pytest.raises(IndexError):
        cands[2]


@pytest.fixture(scope="module")
def world_catalog(tmp_path_factory) -> tuple[str, pa.Table]:
    config = CatalogWorldConfig(n_ads=300, n_components=4, ad_block=300)
    world = CatalogWorld(config, seed=3)
    table = world.catalog_block(world.block(0))[0]
    path = str(tmp_path_factory.mktemp("cat") / "catalog.parquet")
    pq.write_table(table, path)
    return path, table


def test_arrow_load_matches_the_pandas_frame_and_round_trips(world_catalog):
    path, table = world_catalog
    cat = load_catalog(path)
    assert isinstance(cat.ads, Ids) and all(isinstance(e, Ids) for e in cat.elements)
    assert pa.types.is_string(cat.elements[0].array.type)
    df = table.to_pandas()
    assert cat == Catalog.from_frame(df)
    assert cat.ads == tuple(dict.fromkeys(df.ad_id))  # first appearance
    for k, comp in enumerate(cat.components):
        rows = df[df.component == comp]
        assert cat.elements[k] == tuple(dict.fromkeys(rows.element_id))
        first = rows.drop_duplicates("element_id")
        np.testing.assert_array_equal(cat.features[k], first.filter(like="feat_").to_numpy())
    a = 123
    mine = df[df.ad_id == cat.ads[a]]
    for k, comp in enumerate(cat.components):
        want = sorted(cat.elements[k].index(e) for e in mine[mine.component == comp].element_id)
        assert cat.candidates[a][k].tolist() == want
    assert Catalog.from_arrow(cat.to_arrow(), "again") == cat
    assert cat.to_frame().shape == df.shape
    assert cat.ad_code(cat.ads[a]) == a and cat.element_code(2, cat.elements[2][9]) == 9
    with pytest.raises(UnknownIdError, match="ad_id 'nope' is not in the catalog"):
        cat.ad_code("nope")
    assert cat.nbytes < 40 * len(df) * (1 + len(cat.feature_names))


@pytest.mark.parametrize(
    ("value", "ok"), [(" 1.5 ", True), ("1e3", True), ("-.5", True), ("inf", False), ("1,5", False)]
)
def test_csv_feature_values_parse_as_pandas_did(tmp_path, value, ok):
    path = tmp_path / "catalog.csv"
    path.write_text(f'ad_id,component,element_id,feat_x\n1,title,a,"{value}"\n')
    if ok:
        assert load_catalog(str(path)).features[0][0, 0] == float(value)
    else:
        with pytest.raises(ContractError, match=f"row 1: column 'feat_x' value '{value}'"):
            load_catalog(str(path))
