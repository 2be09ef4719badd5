"""Ratings data: tables and id maps (``ratings``), named datasets (``registry``)."""

from jaxcf.data.ratings import DataError, IdMap, Ratings, Split, load_csv, random_split
from jaxcf.data.registry import DATASETS, Dataset, load

__all__ = [
    "DATASETS",
    "DataError",
    "Dataset",
    "IdMap",
    "Ratings",
    "Split",
    "load",
    "load_csv",
    "random_split",
]
