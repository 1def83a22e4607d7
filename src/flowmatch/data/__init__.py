"""Data sources sharing the ``Dataset`` protocol: 2-D toy distributions and user arrays."""

from flowmatch.data.arrays import (
    ArrayDataset,
    ArraySplit,
    load_array,
    load_array_dataset,
    split_rows,
)
from flowmatch.data.base import Dataset
from flowmatch.data.toy import (
    TOY_DATASETS,
    Checkerboard,
    ConcentricRings,
    EightGaussians,
    GaussianMixture2D,
    Spirals,
    Toy2D,
    TwoMoons,
)

__all__ = [
    "TOY_DATASETS",
    "ArrayDataset",
    "ArraySplit",
    "Checkerboard",
    "ConcentricRings",
    "Dataset",
    "EightGaussians",
    "GaussianMixture2D",
    "Spirals",
    "Toy2D",
    "TwoMoons",
    "load_array",
    "load_array_dataset",
    "split_rows",
]
