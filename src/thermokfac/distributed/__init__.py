"""K-FAC on torch.distributed: factor averaging, work assignment over ranks, launching."""

from .assignment import Assignment, Strategy, WorkItem, cubic_cost, hardware_cost, work_items
from .data_parallel import DataParallel, KAISAAssignment, ProcessGroupCommunicator
from .launch import run_workers
from .preconditioner import DistributedKFACPreconditioner

__all__ = ["Assignment", "DataParallel", "DistributedKFACPreconditioner", "KAISAAssignment",
           "ProcessGroupCommunicator", "Strategy", "WorkItem", "cubic_cost", "hardware_cost",
           "run_workers", "work_items"]
