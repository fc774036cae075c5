"""Distribution profiles and drift statistics (PSI, KS, Jensen-Shannon) over Polars frames.

A reference batch is summarised once into a small JSON-serialisable ``Profile``; each new batch
is compared against it without the reference data. Everything is vectorised NumPy/Polars; SciPy
is only a test-time oracle.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from core.jsonutil import json_safe
from quality.schema import drift_columns, time_columns

OTHER = "__other__"
N_QUANTILES = 101
DEFAULT_PSI_THRESHOLD = 0.2
_KS_EXACT_MAX_N = 10_000


@dataclass(frozen=True)
class NumericProfile:
    """Summary of one numeric column: moments, quantiles, PSI bins and a KS sample."""

    count: int
    null_rate: float
    mean: float
    std: float
    min: float
    max: float
    quantiles: list[float]
    bin_edges: list[float]
    bin_fractions: list[float]
    sample: list[float]


@dataclass(frozen=True)
class CategoricalProfile:
    """Summary of one categorical column: category frequencies among non-null values."""

    count: int
    null_rate: float
    frequencies: dict[str, float]

    @property
    def truncated(self) -> bool:
        """True when rare categories were folded into ``__other__`` (vocabulary incomplete)."""
        return OTHER in self.frequencies


@dataclass(frozen=True)
class Profile:
    """Reference distribution of a batch: a few hundred KB of JSON instead of the batch itself."""

    row_count: int
    numeric: dict[str, NumericProfile] = field(default_factory=dict)
    categorical: dict[str, CategoricalProfile] = field(default_factory=dict)

    def to_dict(self, *, include_sample: bool = True) -> dict[str, Any]:
        """Plain JSON (NaN and infinities become null); without the KS samples for UI metadata."""
        data = json_safe(asdict(self))
        if not include_sample:
            for numeric in data["numeric"].values():
                numeric.pop("sample")
        return data

    def save(self, path: Path) -> Path:
        """Write the profile as JSON atomically (temporary name, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict()))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: Path) -> Profile:
        """Read a profile written by ``save``."""
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Profile:
        """Inverse of ``to_dict``."""
        return cls(
            row_count=int(data["row_count"]),
            numeric={
                name: NumericProfile(**{"sample": [], **{k: _from_json(v) for k, v in p.items()}})
                for name, p in data.get("numeric", {}).items()
            },
            categorical={
                name: CategoricalProfile(
                    count=int(p["count"]),
                    null_rate=float(p["null_rate"]),
                    frequencies={str(k): float(v) for k, v in p["frequencies"].items()},
                )
                for name, p in data.get("categorical", {}).items()
            },
        )


@dataclass(frozen=True)
class FeatureDrift:
    """Drift of one feature between the reference profile and a current batch.

    Statistics describe the values present; ``null_rate_current`` says how many were missing.
    A feature with no value present in the batch has no distribution to compare: PSI is NaN
    (it is reported as missing, never as drift).
    """

    feature: str
    kind: str
    psi: float
    ks: float | None
    js: float | None
    null_rate_reference: float
    null_rate_current: float
    new_categories: list[str]
    count: int

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON for metadata."""
        return json_safe(asdict(self))


@dataclass(frozen=True)
class DriftResult:
    """Per-feature drift of a batch, with the summary the retraining trigger reads."""

    features: list[FeatureDrift]
    row_count: int

    @property
    def max_psi(self) -> float:
        """Largest PSI over features (0.0 when there are none)."""
        return max((f.psi for f in self.features if math.isfinite(f.psi)), default=0.0)

    def drifted(self, threshold: float | Mapping[str, float] = DEFAULT_PSI_THRESHOLD) -> list[str]:
        """Features whose PSI exceeds the threshold (one for all, or one per feature)."""
        out = []
        for f in self.features:
            limit = threshold.get(f.feature) if isinstance(threshold, Mapping) else threshold
            if limit is not None and f.psi > limit:
                out.append(f.feature)
        return out

    def feature(self, name: str) -> FeatureDrift:
        """The drift of one feature by name."""
        for f in self.features:
            if f.feature == name:
                return f
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON for metadata."""
        return {
            "row_count": self.row_count,
            "max_psi": json_safe(self.max_psi),
            "drifted": self.drifted(),
            "features": [f.to_dict() for f in self.features],
        }


def psi(expected_fracs: Sequence[float], actual_fracs: Sequence[float], eps: float = 1e-4) -> float:
    """Population stability index; fractions below ``eps`` are raised to it so empty bins stay finite."""
    e = np.clip(np.asarray(expected_fracs, dtype=np.float64), eps, None)
    a = np.clip(np.asarray(actual_fracs, dtype=np.float64), eps, None)
    if e.shape != a.shape:
        raise ValueError(f"bin counts differ: {e.shape} vs {a.shape}")
    return float(np.sum((a - e) * np.log(a / e)))


def ks_statistic(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic, equal to ``scipy.stats.ks_2samp(a, b).statistic``.

    The supremum of ``|F_a - F_b|`` is reached at the values of the smaller sample (from the
    right or from the left); see ``_ks_sorted``.
    """
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    if x.size == 0 or y.size == 0:
        raise ValueError("ks_statistic needs two non-empty samples")
    return _ks_sorted(np.sort(x), np.sort(y))


def js_distance(p: Sequence[float], q: Sequence[float]) -> float:
    """Jensen-Shannon distance in base 2, equal to ``scipy.spatial.distance.jensenshannon(p, q, base=2)``."""
    p_arr = np.asarray(p, dtype=np.float64)
    q_arr = np.asarray(q, dtype=np.float64)
    p_arr = p_arr / np.sum(p_arr)
    q_arr = q_arr / np.sum(q_arr)
    m = (p_arr + q_arr) / 2.0
    js = np.sum(_rel_entr(p_arr, m)) + np.sum(_rel_entr(q_arr, m))
    js /= np.log(2.0)
    return float(np.sqrt(js / 2.0))


def build_profile(
    df: pl.DataFrame,
    numeric: Sequence[str],
    categorical: Sequence[str],
    *,
    bins: int = 10,
    sample_size: int = 20_000,
    seed: int = 0,
    top_k: int = 100,
) -> Profile:
    """Summarise a reference frame so later batches can be compared without the data itself.

    PSI bin edges are the reference's own quantiles (equal-mass bins, outer bins open-ended);
    the KS sample is a seeded uniform sample, stored sorted. Categorical columns keep the
    ``top_k`` most frequent categories and fold the rest into ``__other__``.
    """
    columns = _Columns.extract(df, numeric, categorical)
    return _build(columns, bins=bins, sample_size=sample_size, seed=seed, top_k=top_k)


def compare(profile: Profile, df: pl.DataFrame) -> DriftResult:
    """Measure how far ``df`` has moved from the reference ``profile``, feature by feature."""
    columns = _Columns.extract(df, list(profile.numeric), list(profile.categorical))
    return _compare(profile, columns)


def profile_and_compare(
    reference: Profile,
    df: pl.DataFrame,
    *,
    bins: int = 10,
    sample_size: int = 20_000,
    seed: int = 0,
    top_k: int = 100,
) -> tuple[Profile, DriftResult]:
    """Profile a new batch and compare it with ``reference`` from one pass over its columns.

    Same results as ``build_profile`` then ``compare``; the batch's values are extracted,
    sorted and counted once instead of twice.
    """
    columns = _Columns.extract(df, list(reference.numeric), list(reference.categorical))
    profile = _build(columns, bins=bins, sample_size=sample_size, seed=seed, top_k=top_k)
    return profile, _compare(reference, columns)


@dataclass(frozen=True)
class _Columns:
    """A frame's drift columns reduced to what both profiling and comparing need."""

    n_rows: int
    numeric: dict[str, np.ndarray]
    categorical: dict[str, dict[str, int]]

    @classmethod
    def extract(
        cls, df: pl.DataFrame, numeric: Sequence[str], categorical: Sequence[str]
    ) -> _Columns:
        counts = pl.collect_all(
            [
                df.lazy()
                .select(pl.col(name).cast(pl.String))
                .drop_nulls()
                .group_by(name)
                .agg(pl.len().alias("__n__"))
                for name in categorical
            ]
        )
        return cls(
            n_rows=df.height,
            numeric={name: _sorted_values(df, name) for name in numeric},
            categorical={
                name: dict(zip(c[name].to_list(), c["__n__"].to_list(), strict=True))
                for name, c in zip(categorical, counts, strict=True)
            },
        )


def _build(columns: _Columns, *, bins: int, sample_size: int, seed: int, top_k: int) -> Profile:
    if bins < 2:
        raise ValueError("bins must be at least 2")
    numeric_profiles = {
        name: _profile_numeric(name, values, columns.n_rows, bins, sample_size, seed + i)
        for i, (name, values) in enumerate(columns.numeric.items())
    }
    categorical_profiles = {
        name: _profile_categorical(counts, columns.n_rows, top_k)
        for name, counts in columns.categorical.items()
    }
    return Profile(
        row_count=columns.n_rows, numeric=numeric_profiles, categorical=categorical_profiles
    )


def _compare(profile: Profile, columns: _Columns) -> DriftResult:
    n_rows = columns.n_rows
    features: list[FeatureDrift] = []
    for name, ref in profile.numeric.items():
        values = columns.numeric[name]
        fracs = _bin_fractions(values, np.asarray(ref.bin_edges, dtype=np.float64))
        sample = np.asarray(ref.sample, dtype=np.float64)
        features.append(
            FeatureDrift(
                feature=name,
                kind="numeric",
                psi=psi(ref.bin_fractions, fracs) if values.size else math.nan,
                ks=_ks_sorted(sample, values) if values.size and sample.size else None,
                js=None,
                null_rate_reference=ref.null_rate,
                null_rate_current=_null_rate(n_rows, values.size),
                new_categories=[],
                count=int(values.size),
            )
        )
    for name, ref in profile.categorical.items():
        features.append(_compare_categorical(name, ref, columns.categorical[name], n_rows))
    return DriftResult(features=features, row_count=n_rows)


def drift_frame(dataset: str, df: pl.DataFrame) -> pl.DataFrame:
    """The columns drift is measured on for ``dataset``, derived ones (``hour_of_day``) included."""
    numeric, categorical = drift_columns(dataset)
    columns = [*numeric, *categorical]
    if not columns:
        raise ValueError(f"no drift columns are defined for dataset {dataset!r}")
    derived: list[pl.Expr] = []
    if "hour_of_day" in columns and "hour_of_day" not in df.columns:
        time_column = time_columns()[dataset]
        derived.append(pl.col(time_column).dt.hour().alias("hour_of_day"))
    return df.with_columns(derived).select(columns) if derived else df.select(columns)


def _profile_numeric(
    name: str, ordered: np.ndarray, n_rows: int, bins: int, sample_size: int, seed: int
) -> NumericProfile:
    if ordered.size == 0:
        raise ValueError(f"cannot profile numeric column {name!r}: it has no non-null values")
    n = ordered.size
    quantiles = _sorted_quantiles(ordered, np.linspace(0.0, 1.0, N_QUANTILES))
    edges = np.unique(_sorted_quantiles(ordered, np.arange(1, bins) / bins))
    if n > sample_size:
        rng = np.random.default_rng(seed)
        idx = np.sort(rng.choice(n, size=sample_size, replace=False))
        sample = ordered[idx]
    else:
        sample = ordered
    return NumericProfile(
        count=int(n),
        null_rate=_null_rate(n_rows, n),
        mean=float(ordered.mean()),
        std=float(ordered.std(ddof=1)) if n > 1 else 0.0,
        min=float(ordered[0]),
        max=float(ordered[-1]),
        quantiles=quantiles.tolist(),
        bin_edges=edges.tolist(),
        bin_fractions=_bin_fractions(ordered, edges).tolist(),
        sample=sample.tolist(),
    )


def _profile_categorical(counts: dict[str, int], n_rows: int, top_k: int) -> CategoricalProfile:
    total = int(sum(counts.values()))
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    frequencies = {k: c / total for k, c in ranked[:top_k]} if total else {}
    rest = sum(c for _, c in ranked[top_k:])
    if rest:
        frequencies[OTHER] = rest / total
    return CategoricalProfile(
        count=total, null_rate=_null_rate(n_rows, total), frequencies=frequencies
    )


def _compare_categorical(
    name: str, ref: CategoricalProfile, counts: dict[str, int], n_rows: int
) -> FeatureDrift:
    total = int(sum(counts.values()))
    keys = [k for k in ref.frequencies if k != OTHER]
    known = set(keys)
    unseen = sorted(k for k in counts if k not in known)
    current = {k: float(counts.get(k, 0)) for k in keys}
    if ref.truncated:
        # The reference vocabulary is incomplete, so an unlisted category is not known to be new.
        current[OTHER] = float(sum(counts[k] for k in unseen))
        new_categories: list[str] = []
    else:
        current.update((k, float(counts[k])) for k in unseen)
        new_categories = unseen
    bins = list(current)
    expected = np.array([ref.frequencies.get(k, 0.0) for k in bins])
    actual = np.array([current[k] for k in bins]) / total if total else np.zeros(len(bins))
    return FeatureDrift(
        feature=name,
        kind="categorical",
        psi=psi(expected, actual) if total else math.nan,
        ks=None,
        js=js_distance(expected, actual) if total and expected.sum() > 0 else None,
        null_rate_reference=ref.null_rate,
        null_rate_current=_null_rate(n_rows, total),
        new_categories=new_categories,
        count=total,
    )


def _ks_sorted(a_sorted: np.ndarray, b_sorted: np.ndarray) -> float:
    """KS statistic of two sorted samples.

    ``|F_a - F_b|`` is a step function that only changes at sample values, and between two
    consecutive values of ``a`` it is extreme at the ends; so evaluating at the distinct values
    of the smaller sample, from the right and from the left, finds the supremum in
    O(m log n) instead of scipy's O((m + n) log(m + n)).
    """
    if a_sorted.size > b_sorted.size:
        a_sorted, b_sorted = b_sorted, a_sorted
    m = a_sorted.size
    n = b_sorted.size
    u = np.unique(a_sorted)
    a_le = np.searchsorted(a_sorted, u, side="right")
    a_lt = np.searchsorted(a_sorted, u, side="left")
    b_le = np.searchsorted(b_sorted, u, side="right")
    b_lt = np.searchsorted(b_sorted, u, side="left")
    if n <= _KS_EXACT_MAX_N:
        # scipy reports small-sample statistics as the exact lattice value h / lcm(m, n).
        numerator = max(
            int(np.abs(a_le * n - b_le * m).max()), int(np.abs(a_lt * n - b_lt * m).max())
        )
        g = math.gcd(m, n)
        return (numerator // g) / ((m // g) * n)
    at = np.abs(a_le / m - b_le / n)
    before = np.abs(a_lt / m - b_lt / n)
    return float(max(at.max(), before.max()))


def _bin_fractions(ordered: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Share of sorted values in the bins (-inf, e0], (e0, e1], ..., (e_last, inf)."""
    if ordered.size == 0:
        return np.zeros(edges.size + 1)
    cumulative = np.searchsorted(ordered, edges, side="right")
    counts = np.diff(np.concatenate(([0], cumulative, [ordered.size])))
    return counts / ordered.size


def _sorted_quantiles(ordered: np.ndarray, probs: np.ndarray) -> np.ndarray:
    position = probs * (ordered.size - 1)
    lo = np.floor(position).astype(np.int64)
    hi = np.minimum(lo + 1, ordered.size - 1)
    weight = position - lo
    return ordered[lo] + (ordered[hi] - ordered[lo]) * weight


def _sorted_values(df: pl.DataFrame, name: str) -> np.ndarray:
    """A column's non-null, non-NaN values as sorted float64.

    Polars sorts 1M floats in about half NumPy's time here, single-threaded too; the values are
    the same, only the order of -0.0 and 0.0 among themselves may differ.
    """
    series = df[name].cast(pl.Float64).fill_nan(None).drop_nulls()
    return series.sort().to_numpy()


def _rel_entr(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Elementwise ``x log(x/y)`` the way ``scipy.special.rel_entr`` computes it, bit for bit."""
    return np.array([_rel_entr_scalar(float(a), float(b)) for a, b in zip(x, y, strict=True)])


def _rel_entr_scalar(x: float, y: float) -> float:
    if math.isnan(x) or math.isnan(y):
        return math.nan
    if x <= 0 or y <= 0:
        return 0.0 if x == 0 and y >= 0 else math.inf
    ratio = x / y
    if 0.5 < ratio < 2:
        return x * math.log1p((x - y) / y)
    if sys.float_info.min < ratio < math.inf:
        return x * math.log(ratio)
    return x * (math.log(x) - math.log(y))


def _null_rate(n_rows: int, n_present: int) -> float:
    return (n_rows - n_present) / n_rows if n_rows else 0.0


def _from_json(value: Any) -> Any:
    if value is None:
        return math.nan
    return value
