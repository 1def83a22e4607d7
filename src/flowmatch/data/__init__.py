"""Data sources sharing the ``Dataset`` protocol: 2-D toy distributions and user arrays."""

from flowmatch.data.arrays import (
    ArrayDataset,
    ArraySplit,
    load_array,
    load_array_dataset,
    split_rows,
)
from flowmatch.data.base import Dataset
from flowmatch.data.fetch import FETCHABLE
from flowmatch.data.images import (
    IMAGE_SETS,
    ImageData,
    ImageDataset,
    StreamingImageFolder,
    load_image_set,
    split_images,
    to_model_space,
    to_pixels,
)
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
    "FETCHABLE",
    "IMAGE_SETS",
    "TOY_DATASETS",
    "ArrayDataset",
    "ArraySplit",
    "Checkerboard",
    "ConcentricRings",
    "Dataset",
    "EightGaussians",
    "GaussianMixture2D",
    "ImageData",
    "ImageDataset",
    "Spirals",
    "StreamingImageFolder",
    "Toy2D",
    "TwoMoons",
    "load_array",
    "load_array_dataset",
    "load_image_set",
    "split_images",
    "split_rows",
    "to_model_space",
    "to_pixels",
]
