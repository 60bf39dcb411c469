"""Dataset registry: `fashion-mnist`, `imagefolder`, `synthetic`. Each builds a `DataBundle`."""

from edgecv.data.datasets import DATASETS, DataBundle, build_data

__all__ = ["DATASETS", "DataBundle", "build_data"]
