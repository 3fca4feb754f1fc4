"""Evaluation data (npz arrays, torchvision CIFAR, image folders) and noise batches."""

from texq.data.arrays import ArrayDataset, load_npz, npz_dataset
from texq.data.noise import gaussian_batches
from texq.data.sets import load_eval_data

__all__ = ["ArrayDataset", "gaussian_batches", "load_eval_data", "load_npz", "npz_dataset"]
