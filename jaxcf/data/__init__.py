"""Ratings data: id maps (``ids``), tables (``ratings``), splits (``splits``), named datasets (``registry``),
implicit feedback (``implicit``)."""

from jaxcf.core.errors import DataError
from jaxcf.data.ids import IdMap
from jaxcf.data.implicit import interactions
from jaxcf.data.ratings import Ratings, load_csv, ratings_from_frame
from jaxcf.data.registry import DATASETS, Dataset, bundled_frame, from_frame, holdout, load
from jaxcf.data.splits import Split, holdout_split, random_split

__all__ = [
    "DATASETS",
    "DataError",
    "Dataset",
    "IdMap",
    "Ratings",
    "Split",
    "bundled_frame",
    "from_frame",
    "holdout",
    "holdout_split",
    "interactions",
    "load",
    "load_csv",
    "random_split",
    "ratings_from_frame",
]
