"""Scale-out on torch.distributed, applied to a built model from outside dsv2.model (torchtitan style).

    model, ctx = dsv2.parallel.setup(model, mode="ddp" | "fsdp" | "none", expert_parallel=False)

See docs/distributed.md for the trainer hooks and the torchrun commands.
"""

from .data_parallel import MODES, DataParallel, clip_grad_norm_, is_expert_param, setup, unwrap
from .dist import (
    DistributedError,
    ParallelContext,
    failfast,
    init_distributed,
    launch,
    maybe_launch,
    strip_nproc,
    torchrun_command,
)
from .expert_parallel import ExpertParallelMoE, adjust_aux, all_to_all, apply_expert_parallel, gather_stats
from .state import (
    export_model,
    full_state_dict,
    load_optimizer_state_dict,
    optimizer_state_dict,
    save_pretrained,
)

__all__ = [
    "MODES", "DataParallel", "DistributedError", "ExpertParallelMoE", "ParallelContext", "adjust_aux",
    "all_to_all", "apply_expert_parallel", "clip_grad_norm_", "export_model", "failfast", "full_state_dict",
    "gather_stats", "init_distributed", "is_expert_param", "launch", "load_optimizer_state_dict",
    "maybe_launch", "optimizer_state_dict", "save_pretrained", "setup", "strip_nproc",
    "torchrun_command", "unwrap",
]
