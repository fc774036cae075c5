from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch

from models.preprocess import Preprocessor, signed_log1p
from models.spec import MISSING_INDEX, OOV_INDEX, FeatureSpec
from tests.models.testkit import SPEC

SMALL = FeatureSpec(numeric=("x", "y"), categorical=("country",))


def _frame() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "x": [1.0, None, 3.0, 5.0],
            "y": [10.0, 20.0, None, 40.0],
            "country": ["DE", "FR", "DE", None],
            "label": [0, 1, 0, 1],
        }
    )


def test_nulls_are_imputed_with_train_median_and_flagged():
    pre = Preprocessor.fit(_frame(), SMALL)
    assert pre.impute == {"x": 3.0, "y": 20.0}
    batch = pre.transform(_frame())
    numeric = batch.numeric.numpy()
    # Columns: transformed x, y, then the missing indicators of x, y.
    assert numeric.shape == (4, 4)
    assert numeric[1, 0] == pytest.approx(np.log1p(3.0))
    assert numeric[2, 1] == pytest.approx(np.log1p(20.0))
    np.testing.assert_array_equal(numeric[:, 2], [0, 1, 0, 0])
    np.testing.assert_array_equal(numeric[:, 3], [0, 0, 1, 0])


def test_unknown_and_missing_categories_get_their_own_indices():
    pre = Preprocessor.fit(_frame(), SMALL)
    assert pre.vocab["country"] == ("DE", "FR")
    assert pre.cardinalities == (4,)
    batch = pre.transform([{"country": "DE"}, {"country": "ZZ"}, {"country": None}, {}])
    assert batch.categorical[:, 0].tolist() == [2, OOV_INDEX, MISSING_INDEX, MISSING_INDEX]


def test_frame_and_records_give_identical_tensors(training_set):
    pre = Preprocessor.fit(training_set, SPEC)
    rows = training_set.head(50)
    from_frame = pre.transform(rows)
    from_records = pre.transform(rows.to_dicts())
    assert torch.equal(from_frame.numeric, from_records.numeric)
    assert torch.equal(from_frame.categorical, from_records.categorical)


def test_extreme_values_stay_finite():
    pre = Preprocessor.fit(_frame(), SMALL)
    batch = pre.transform(
        [
            {"x": 1e308, "y": -1e308, "country": "DE"},
            {"x": float("inf"), "y": float("-inf"), "country": "FR"},
            {"x": float("nan"), "y": 0.0, "country": "DE"},
        ]
    )
    assert torch.isfinite(batch.numeric).all()
    assert batch.numeric[2, 2] == 1.0  # NaN counts as missing
    assert signed_log1p(np.array([-9.0]))[0] == pytest.approx(-np.log1p(9.0))


def test_round_trips_through_json():
    pre = Preprocessor.fit(_frame(), SMALL)
    again = Preprocessor.from_dict(json.loads(json.dumps(pre.to_dict())))
    assert again == pre
    assert torch.equal(again.transform(_frame()).numeric, pre.transform(_frame()).numeric)


def test_vocabulary_is_capped_to_most_frequent():
    frame = pl.DataFrame(
        {"x": [1.0] * 6, "y": [1.0] * 6, "country": ["A", "A", "A", "B", "B", "C"]}
    )
    pre = Preprocessor.fit(frame, SMALL, max_categories=2)
    assert pre.vocab["country"] == ("A", "B")
    assert pre.transform(frame).categorical[-1, 0] == OOV_INDEX


def test_missing_column_and_bad_labels_fail_clearly():
    pre = Preprocessor.fit(_frame(), SMALL)
    with pytest.raises(KeyError, match="country"):
        pre.transform(_frame().drop("country"))
    with pytest.raises(ValueError, match="0/1"):
        pre.labels(_frame().with_columns(label=pl.lit(2)))
    with pytest.raises(ValueError, match="null"):
        pre.labels(_frame().with_columns(label=pl.lit(None, dtype=pl.Int8)))
