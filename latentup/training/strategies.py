"""Distributed strategies that need Python objects a YAML file cannot spell (FSDP's wrap policy)."""

from lightning.pytorch.strategies import FSDPStrategy

from latentup.nn.layers import KAttentionBlock, ResBlock


def fsdp_strategy(sharding_strategy: str = "FULL_SHARD", state_dict_type: str = "full", cpu_offload: bool = False,
                  **kwargs) -> FSDPStrategy:
    """FSDP with one unit per ResBlock / attention block (of the model and of its EMA copy alike, so that their
    local shards line up for the EMA update); ``use_orig_params`` lets frozen EMA and trainable weights share units."""
    return FSDPStrategy(auto_wrap_policy={ResBlock, KAttentionBlock}, sharding_strategy=sharding_strategy,
                        state_dict_type=state_dict_type, cpu_offload=cpu_offload, use_orig_params=True, **kwargs)
