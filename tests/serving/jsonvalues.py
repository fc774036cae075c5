"""Comparing decoded JSON values with their types: 1, 1.0 and True are equal in Python."""

from __future__ import annotations


def typed(value: object) -> object:
    """A decoded value with every scalar's type kept beside it, for ``==`` that tells them apart."""
    if isinstance(value, dict):
        return {k: typed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [typed(v) for v in value]
    return (type(value).__name__, value)
