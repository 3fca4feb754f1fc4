"""Evaluation data (npz arrays, torchvision CIFAR, image folders), noise batches, and the real
training batches of the real-data baseline."""

from texq.data.arrays import ArrayDataset, load_npz, npz_dataset
from texq.data.noise import gaussian_batches
from texq.data.real import real_batches
from texq.data.sets import class_names, load_eval_data

__all__ = ["ArrayDataset", "class_names", "gaussian_batches", "load_eval_data", "load_npz", "npz_dataset",
           "real_batches"]
