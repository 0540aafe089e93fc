"""Datasets (RecBole atomic files, leave-one-out splits) and the seven-task instruction samples."""

from .dataset import RecDataset, load_dataset
from .recbole import AtomicTable, builtin_dataset_dir, read_atomic_file
from .tasks import (TASKS, TaskSample, build_task_samples, exclude_seen, iter_task_samples,
                    render_prompt, task_statistics)

__all__ = [
    "TASKS", "AtomicTable", "RecDataset", "TaskSample", "build_task_samples",
    "builtin_dataset_dir", "exclude_seen", "iter_task_samples", "load_dataset", "read_atomic_file",
    "render_prompt", "task_statistics",
]
