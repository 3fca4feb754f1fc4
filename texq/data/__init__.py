"""Evaluation data (npz arrays, torchvision CIFAR, image folders) and noise batches."""

from texq.data.arrays import ArrayDataset, load_npz, npz_dataset
from texq.data.noise import gaussian_batches
from texq.data.sets import class_names, load_eval_data

__all__ = ["ArrayDataset", "class_names", "gaussian_batches", "load_eval_data", "load_npz", "npz_dataset"]
