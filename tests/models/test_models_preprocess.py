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


VARIED = FeatureSpec(numeric=("x", "count", "flag", "ratio"), categorical=("country", "channel"))
EXTREMES = [0.0, -0.0, 1e-300, -1e-300, 1e308, -1e308, np.inf, -np.inf, np.nan, 2.0**53 + 1]
VARIED_SCHEMA = {
    "x": pl.Float64,
    "count": pl.Int64,
    "flag": pl.Boolean,
    "ratio": pl.Float64,
    "country": pl.String,
    "channel": pl.String,
    "label": pl.Int8,
}


def _varied_frame(n: int, seed: int) -> pl.DataFrame:
    """Nulls, NaN, infinities, float64's extremes, ints beyond 2**53, booleans, categories
    unseen in training (and "", a case variant), every column null somewhere."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n) * 10.0 ** rng.integers(-30, 30, n)
    extreme = rng.random(n) < 0.2
    x[extreme] = rng.choice(EXTREMES, int(extreme.sum()))
    small = rng.random(n) < 0.5
    count = np.where(small, rng.integers(0, 40, n), rng.integers(-(2**62), 2**62, n))
    columns = {
        "x": x.tolist(),
        "count": count.tolist(),
        "flag": (rng.random(n) < 0.5).tolist(),
        "ratio": rng.gamma(2.0, 3.0, n).tolist(),
        "country": rng.choice(["DE", "FR", "US", "ZZ", "", "de"], n).tolist(),
        "channel": rng.choice(["web", "pos", "app", "atm"], n).tolist(),
    }
    rows = {
        name: [None if rng.random() < (0.5 if name == "ratio" else 0.1) else v for v in values]
        for name, values in columns.items()
    }
    rows["label"] = rng.integers(0, 2, n).tolist()
    return pl.DataFrame(rows, schema=VARIED_SCHEMA)


@pytest.mark.parametrize("n", [0, 1, 2, 3, 32, 1000])
def test_the_columns_path_equals_the_frame_path_bit_for_bit(n: int) -> None:
    """Serving's ``transform_columns`` (Python values, NumPy on a block of columns) against
    training's ``transform`` of the same rows as a frame."""
    train = _varied_frame(400, seed=1).filter(pl.col("country") != "ZZ")
    pre = Preprocessor.fit(train, VARIED)
    assert "ZZ" not in pre.vocab["country"] and "atm" in pre.vocab["channel"]
    frame = _varied_frame(n, seed=n + 7)
    by_frame = pre.transform(frame)
    by_columns = pre.transform_columns(frame.to_dict(as_series=False))
    assert by_columns.numeric.dtype == by_frame.numeric.dtype == torch.float32
    assert by_columns.categorical.dtype == by_frame.categorical.dtype == torch.int64
    assert torch.equal(by_columns.numeric, by_frame.numeric)
    assert torch.equal(by_columns.categorical, by_frame.categorical)
    if n >= 32:  # the frame exercised every branch
        codes = set(by_frame.categorical.flatten().tolist())
        assert {MISSING_INDEX, OOV_INDEX} <= codes
        assert by_frame.numeric[:, len(VARIED.numeric) :].sum() > 0  # missing indicators


def test_the_columns_path_is_built_once_per_preprocessor() -> None:
    pre = Preprocessor.fit(_varied_frame(50, seed=2), VARIED)
    assert pre._compiled is pre._compiled
    again = Preprocessor.from_dict(pre.to_dict())
    assert again == pre  # the compiled state is not part of equality or the JSON
    rows = _varied_frame(5, seed=3)
    assert torch.equal(
        again.transform_columns(rows.to_dict(as_series=False)).numeric, pre.transform(rows).numeric
    )


def test_the_columns_path_refuses_missing_columns() -> None:
    pre = Preprocessor.fit(_frame(), SMALL)
    with pytest.raises(KeyError, match="country"):
        pre.transform_columns({"x": [1.0], "y": [2.0]})


@pytest.mark.parametrize("n", [0, 1, 32, 1000])
def test_missing_flags_are_the_nulls_and_nans_of_the_inputs(n: int) -> None:
    """What serving reports as ``missing_features``: a null in any input, or NaN in a number,
    from either path's batch."""
    pre = Preprocessor.fit(_varied_frame(400, seed=1), VARIED)
    frame = _varied_frame(n, seed=n + 11)
    expected = np.zeros((n, len(VARIED.columns)), dtype=bool)
    for j, name in enumerate(VARIED.columns):
        column = frame.get_column(name)
        expected[:, j] = column.is_null().to_numpy()
        if column.dtype.is_float():
            expected[:, j] |= column.is_nan().fill_null(False).to_numpy()
    by_frame = pre.missing(pre.transform(frame))
    by_columns = pre.missing(pre.transform_columns(frame.to_dict(as_series=False)))
    assert by_frame.shape == (n, len(VARIED.columns)) and by_frame.dtype == bool
    assert np.array_equal(by_frame, expected)
    assert np.array_equal(by_columns, expected)
    if n >= 32:
        assert expected.any(axis=0).sum() >= 2  # nulls in several columns were exercised


def test_category_indices_of_python_values_match_the_vocabulary_as_text() -> None:
    from models.preprocess import _category_indices

    mapping = {"US": 2, "DE": 3, "5": 4, "nan": 5}
    values = ["US", None, "FR", 5, "DE", float("nan"), 7]
    assert _category_indices(values, mapping) == [2, MISSING_INDEX, OOV_INDEX, 4, 3, 5, OOV_INDEX]
    assert _category_indices([["US"], "DE", None], mapping) == [OOV_INDEX, 3, MISSING_INDEX]
    assert _category_indices(["US", "DE"], mapping) == [2, 3]
