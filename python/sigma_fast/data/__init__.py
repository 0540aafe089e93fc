"""Datasets and item text features."""

from .recbole import AtomicTable, builtin_dataset_dir, read_atomic_file

__all__ = ["AtomicTable", "builtin_dataset_dir", "read_atomic_file"]
