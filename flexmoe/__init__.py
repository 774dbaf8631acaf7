"""FlexMoE: dynamic expert placement for Mixture-of-Experts training.

This package holds the `flexmoe` command's thin glue, `rebalance_experts` (an EPLB-compatible
entry point) and, imported on first use, the public layer `FlexMoE` and its `FlexMoERuntime`
(`runtime.layer`); the work lives in `cost_models`, `planner`, `runtime` and `experiments`.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    """`flexmoe.FlexMoE` and `flexmoe.FlexMoERuntime`, loaded on first use: `import flexmoe` stays cheap."""
    if name in ("FlexMoE", "FlexMoERuntime"):
        from runtime import layer
        return getattr(layer, name)
    raise AttributeError(f"module 'flexmoe' has no attribute {name!r}")


def rebalance_experts(weight, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int):
    """DeepSeek EPLB's `rebalance_experts`, backed by FlexMoE's planner: a drop-in EPLB policy.

    `weight[layers, num_logical_experts]` (a tensor or an array) are the loads. Returns torch
    int64 tensors on the CPU, as EPLB does: `phy2log[layers, num_replicas]`,
    `log2phy[layers, num_logical_experts, X]` (-1 padded, X the largest replica count) and
    `logcnt[layers, num_logical_experts]`. Physical expert p lives on GPU
    `p // (num_replicas // num_gpus)`; the caller splits an expert's tokens evenly over its
    replicas, and the placement is searched for that (`planner.physical_map.rebalance`).
    Bad arguments raise `cost_models.files.InputError` (a ValueError). torch and the planner are
    imported here, so `import flexmoe` stays cheap."""
    import numpy as np
    import torch

    from planner.physical_map import log2phy_of, rebalance
    w = weight.detach().float().cpu().numpy() if isinstance(weight, torch.Tensor) else np.asarray(weight, float)
    phy2log = rebalance(w, num_replicas, num_groups, num_nodes, num_gpus)
    log2phy, logcnt = log2phy_of(phy2log, w.shape[1])
    return torch.from_numpy(phy2log), torch.from_numpy(log2phy), torch.from_numpy(logcnt)
