"""train.py as every rank of tests/test_distributed.py runs it (python tests/launch_train.py ARGS;
Lightning's launcher and torchrun start the other ranks with the same command), with two changes:

- `--trainer.strategy fsdp` runs on CPUs. Lightning allows its FSDPStrategy on GPUs only, and
  torch's FSDP on CPUs needs device_id=cpu and full state dicts without offload_to_cpu
  (offloading a CPU tensor copies nothing, and FSDP then frees the storage the state dict points
  to). CPUFSDP is bytelm's FSDP strategy (distributed.fsdp_strategy) with just these changes.
- BYTELM_TEST_NAN_STEP=k: at step k the last rank's loss is NaN while its gradients stay finite,
  so only the ranks agreeing on the loss check can make every rank skip that step.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lightning.fabric.strategies.model_parallel as lightning_load  # noqa: E402
import lightning.pytorch.strategies.fsdp as lightning_fsdp  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.strategies import FSDPStrategy  # noqa: E402
from torch.distributed.fsdp import FullStateDictConfig, StateDictType  # noqa: E402
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP  # noqa: E402
from torch.distributed.fsdp.api import FullOptimStateDictConfig  # noqa: E402

import train  # noqa: E402
from bytelm.training import distributed  # noqa: E402
from bytelm.training.lm_module import LMTask  # noqa: E402


class CPUFSDP(FSDPStrategy):
    def _setup_model(self, model):
        if any(isinstance(m, FSDP) for m in model.modules()):  # as Lightning's: wrapped already
            self.kwargs.pop("auto_wrap_policy", None)
        wrapped = FSDP(model, device_id=torch.device("cpu"), sharding_strategy=self.sharding_strategy,
                       mixed_precision=self.mixed_precision_config, **self.kwargs)
        if self.global_rank == 0:
            print(f"FSDP units: {sum(isinstance(m, FSDP) for m in wrapped.modules())}", flush=True)
        return wrapped


def full_state_dict_without_offload(module, world_size, rank0_only=True):
    return FSDP.state_dict_type(module, StateDictType.FULL_STATE_DICT,
                                FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
                                FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only))


lightning_fsdp._get_full_state_dict_context = full_state_dict_without_offload  # saving
lightning_load._get_full_state_dict_context = full_state_dict_without_offload  # loading
make_strategy = distributed.make_strategy  # ddp: train.py's own DDP strategy, on gloo here
distributed.make_strategy = lambda s: distributed.fsdp_strategy(CPUFSDP) if s == "fsdp" else make_strategy(s)

if "BYTELM_TEST_NAN_STEP" in os.environ:
    nan_step = int(os.environ["BYTELM_TEST_NAN_STEP"])
    training_step = LMTask.training_step

    def training_step_nan_on_last_rank(self, batch, batch_idx):
        loss = training_step(self, batch, batch_idx)
        if self.global_step == nan_step and self.global_rank == self.trainer.world_size - 1:
            loss = loss + float("nan")  # a constant: the gradients stay finite
        return loss

    LMTask.training_step = training_step_nan_on_last_rank

if __name__ == "__main__":
    sys.exit(train.main(sys.argv[1:]))
