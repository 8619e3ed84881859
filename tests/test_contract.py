"""The data contract: catalog and constraints, with a table of bad inputs and exact messages."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from genco.data.contract import Catalog, load_catalog, load_constraints
from genco.errors import ContractError

CATALOG_CSV = """ad_id,component,element_id,feat_x
0,title,0,1.0
0,title,1,2.0
0,image,a,0.5
0,image,b,0.25
7,title,1,2.0
7,title,2,3.0
7,image,b,0.25
"""


def write(tmp_path, name: str, text: str) -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_ids_stay_strings_and_codes_follow_first_appearance(tmp_path):
    cat = load_catalog(write(tmp_path, "catalog.csv", CATALOG_CSV))
    assert cat.ads == ("0", "7")
    assert cat.components == ("title", "image")
    assert cat.elements == (("0", "1", "2"), ("a", "b"))
    assert [c.tolist() for c in cat.candidates[1]] == [[1, 2], [1]]
    assert cat.feature_names == ("feat_x",)
    np.testing.assert_allclose(cat.features[0][:, 0], [1.0, 2.0, 3.0])
    assert cat.n_combinations(0) == 4


def test_catalog_round_trips_through_parquet(tmp_path):
    cat = load_catalog(write(tmp_path, "catalog.csv", CATALOG_CSV))
    path = str(tmp_path / "catalog.parquet")
    cat.to_frame().to_parquet(path)
    again = load_catalog(path)
    assert again.ads == cat.ads and again.elements == cat.elements
    assert [c.tolist() for c in again.candidates[0]] == [c.tolist() for c in cat.candidates[0]]


BAD_CATALOGS = [
    ("component,element_id\ntitle,a\n", "missing required column 'ad_id'"),
    ("ad_id,component,element_id\n", "file has no rows"),
    (
        "ad_id,component,element_id,colour\n1,title,a,red\n",
        "unexpected column 'colour' (allowed: ad_id, component, element_id, feat_*)",
    ),
    ("ad_id,component,element_id\n1,title,\n", "row 1: column 'element_id' is empty"),
    (
        "ad_id,component,element_id\n1,title,a\n1,title,a\n",
        "row 2: duplicate candidate (ad_id '1', component 'title', element_id 'a')",
    ),
    (
        "ad_id,component,element_id,feat_x\n1,title,a,1\n1,title,b,big\n",
        "row 2: column 'feat_x' value 'big' is not numeric",
    ),
    (
        "ad_id,component,element_id\n1,title,a\n1,image,b\n2,title,a\n",
        "ad_id '2' has no candidate for component 'image'",
    ),
    (
        "ad_id,component,element_id\n1,my title,a\n",
        "row 1: component 'my title' must be a column-safe name",
    ),
    ("ad_id,component,element_id\n1,click,a\n", "component 'click' clashes with a contract"),
    (
        "ad_id,component,element_id,feat_x\n1,title,a,1\n2,title,a,2\n",
        "row 2: element 'a' of component 'title' has features that differ from its earlier rows",
    ),
]


@pytest.mark.parametrize(("text", "message"), BAD_CATALOGS)
def test_bad_catalogs_fail_with_file_row_and_value(tmp_path, text, message):
    path = write(tmp_path, "catalog.csv", text)
    with pytest.raises(ContractError) as err:
        load_catalog(path)
    assert str(err.value).startswith(f"{path}: ")
    assert message in str(err.value)


def test_missing_and_unreadable_catalog_files(tmp_path):
    with pytest.raises(ContractError, match=r"catalog\.csv: file not found"):
        load_catalog(str(tmp_path / "catalog.csv"))
    bad = write(tmp_path, "catalog.json", "{}")
    with pytest.raises(ContractError, match=r"catalog\.json: cannot read"):
        load_catalog(bad)


HEADER = "ad_id,component_a,element_a,component_b,element_b\n"
BAD_CONSTRAINTS = [
    ("ad_id,component_a,element_a,component_b\n", "missing required column 'element_b'"),
    (HEADER + "9,title,0,image,a\n", "row 1: ad_id '9' is not in the catalog"),
    (HEADER + "*,colour,0,image,a\n", "row 1: component_a 'colour' is not a catalog component"),
    (
        HEADER + "*,title,0,image,zz\n",
        "row 1: element_b 'zz' is not an element of component 'image'",
    ),
    (HEADER + "*,title,0,title,1\n", "row 1: component_a and component_b are both 'title'"),
    (HEADER + "*,title,,image,a\n", "row 1: column 'element_a' is empty"),
]


@pytest.mark.parametrize(("text", "message"), BAD_CONSTRAINTS)
def test_bad_constraints_fail_with_row_and_value(tmp_path, text, message):
    cat = load_catalog(write(tmp_path, "catalog.csv", CATALOG_CSV))
    path = write(tmp_path, "constraints.csv", text)
    with pytest.raises(ContractError) as err:
        load_constraints(path, cat)
    assert str(err.value) == f"{path}: {message}"


def test_constraints_are_ordered_and_checked_both_ways(tmp_path):
    cat = load_catalog(write(tmp_path, "catalog.csv", CATALOG_CSV))
    # Written image-first: stored title-first so the later component carries the check.
    cons = load_constraints(
        write(tmp_path, "c.csv", HEADER + "*,image,b,title,0\n7,title,2,image,b\n"), cat
    )
    assert cons.comp_a.tolist() == [0, 0] and cons.comp_b.tolist() == [1, 1]
    combos = np.array([[0, 1], [0, 0], [2, 1], [2, 1]])
    ads = np.array([0, 0, 1, 0])
    assert cons.violations(ads, combos).tolist() == [0, -1, 1, -1]
    mask = cons.forbidden_after(1, 1, [2, -1], len(cat.elements[1]))
    assert mask.tolist() == [False, True]
    back = cons.to_frame(cat)
    assert back.iloc[0].tolist() == ["*", "title", "0", "image", "b"]


def test_catalog_from_frame_rejects_empty_ids():
    df = pd.DataFrame({"ad_id": ["1"], "component": ["title"], "element_id": [None]})
    with pytest.raises(ContractError, match="row 1: column 'element_id' is empty"):
        Catalog.from_frame(df)
