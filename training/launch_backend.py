"""The sharded backend an `accelerate launch` config asks for, also when the processes run on CPU.

accelerate engages FSDP and DeepSpeed only on accelerator-type states: on CPU a launch with an FSDP or
DeepSpeed config becomes MULTI_CPU, plain DDP over gloo, without a word. Both backends run on CPU
(FSDP2's `fully_shard` and DeepSpeed's CPU accelerator work over gloo), so the process group is set up
as on CPU and the backend is put on top of it here, before any stage builds its Accelerator (the TRL
Trainer builds its own; both share accelerate's one process-wide state). On a GPU launch this does nothing:
accelerate already engages what the config names.
"""

from __future__ import annotations

import os
from contextlib import contextmanager


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() == "true"


def launched_backend() -> str | None:
    """The sharded backend the launch config names ("fsdp" or "deepspeed"), None for plain DDP or no launch."""
    if _flag("ACCELERATE_USE_FSDP"):
        return "fsdp"
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    return None


def engage_launch_backend() -> bool:
    """Set up accelerate's state for the launch's backend; returns the `cpu` flag the stage's Accelerator
    must be built with (True for DDP and FSDP on CPU, False on GPU and for DeepSpeed, whose state
    accelerate builds only with cpu=False). Safe to call more than once."""
    import torch
    from accelerate import PartialState
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, TorchDynamoPlugin

    on_cpu = not torch.cuda.is_available()
    backend = launched_backend()
    if not on_cpu:
        return False
    state = PartialState(cpu=True)
    if backend == "deepspeed":
        return False
    if backend != "fsdp" or state.distributed_type not in (DistributedType.MULTI_CPU, DistributedType.FSDP):
        return True
    if AcceleratorState._shared_state.get("fsdp_plugin") is None:
        # The plugin reads the launch's FSDP_* settings; AcceleratorState keeps it only on GPU-type states,
        # so the state is built as for CPU and then told it is FSDP. PartialState holds the type too: every
        # later AcceleratorState copies it from there.
        plugin = FullyShardedDataParallelPlugin()
        AcceleratorState(cpu=True, fsdp_plugin=plugin, dynamo_plugin=TorchDynamoPlugin(), _from_accelerator=True)
        AcceleratorState._shared_state["fsdp_plugin"] = plugin
        AcceleratorState._shared_state["distributed_type"] = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return True


def trainer_arguments() -> dict:
    """TrainingArguments that keep the state set up here: by default they reset accelerate's state, and a
    CPU launch would become DDP again."""
    import torch

    if launched_backend() == "fsdp" and not torch.cuda.is_available():
        return {"accelerator_config": {"use_configured_state": True}}
    return {}


@contextmanager
def unsharded_loading():
    """Models loaded inside are whole on every process, also under ZeRO-3 (transformers otherwise loads
    them partitioned, through deepspeed.zero.Init, once a ZeRO-3 config is active). For what is never
    handed to DeepSpeed: PPO's reference and reward model, a base to merge an adapter into."""
    import transformers.integrations.deepspeed as hf_deepspeed

    # transformers keeps the active config behind a module-level weak reference and has no getter for it.
    active = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = active


@contextmanager
def whole_weights(accelerator, model):
    """Every parameter of the prepared `model` whole on every process for the duration, with no collective
    in its forward passes.

    A rollout and an update's no-grad passes call the policy, the critic and the LoRA base directly (not
    through the wrapper), and each process plays its own dialogues, so processes make different numbers
    of forward calls: under ZeRO-3 or FSDP2, which gather weights inside every forward, they would wait
    for each other forever, and generation would gather every layer once per token. The weights are
    gathered once here (as TRL's unwrap_model_for_generation does) and sharded again on exit.
    """
    from accelerate.utils import DistributedType

    state = accelerator.state
    plugin = getattr(state, "deepspeed_plugin", None)
    if state.distributed_type == DistributedType.DEEPSPEED and plugin is not None and plugin.zero_stage == 3:
        from deepspeed.runtime.zero import unwrap_model_for_generation

        with unwrap_model_for_generation(model):  # gathers, and lifts ZeRO-3's per-module hooks meanwhile
            yield
        return
    if state.distributed_type != DistributedType.FSDP:
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    # FSDP2 takes the first module to run forward for its root; calling a sub-module first would break it.
    model._get_fsdp_state()._lazy_init()
    reshard = state.fsdp_plugin.reshard_after_forward
    for module in sharded:
        if module is not model:  # the root keeps its weights after forward anyway
            module.set_reshard_after_forward(False, recurse=False)
        module.unshard()
    try:
        yield
    finally:
        for module in sharded:
            if module is not model:
                module.set_reshard_after_forward(reshard, recurse=False)
            module.reshard()
