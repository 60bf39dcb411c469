"""edgecv: from a trained image classifier to a measured INT8 model on an edge device."""

__version__ = "0.1.0"
