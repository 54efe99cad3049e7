"""K-FAC on torch.distributed: factor averaging (DDP) or owner-rank blocks (FSDP2), work
assignment over ranks, launching."""

from .assignment import Assignment, Strategy, WorkItem, cubic_cost, hardware_cost, work_items
from .checkpoint import KFACState
from .data_parallel import DataParallel, KAISAAssignment, ProcessGroupCommunicator
from .fully_shard import FullyShard, OwnerAssignment, OwnerCommunicator, ShardedGradients
from .launch import run_workers
from .preconditioner import DistributedKFACPreconditioner

__all__ = ["Assignment", "DataParallel", "DistributedKFACPreconditioner", "FullyShard",
           "KAISAAssignment", "KFACState", "OwnerAssignment", "OwnerCommunicator",
           "ProcessGroupCommunicator", "ShardedGradients", "Strategy", "WorkItem",
           "cubic_cost", "hardware_cost", "run_workers", "work_items"]
