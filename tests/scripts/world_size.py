"""Prints this process's rank and the world size, the way dialogrl's stages build their Accelerator."""

import torch
from accelerate import Accelerator

accelerator = Accelerator(cpu=not torch.cuda.is_available())
print(f"rank={accelerator.process_index} world={accelerator.num_processes} type={accelerator.distributed_type.value}",
      flush=True)
