"""train.py under accelerate's FSDP2 plugin on CPU processes, for tests: accelerate ignores --use_fsdp with
ACCELERATE_USE_CPU (its state switches only GPU setups to FSDP), so this launcher sets the FSDP plugin and
distributed type by hand, as accelerate does on GPUs; the training code runs unchanged."""

import sys

from accelerate import Accelerator
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

import nanogpt_hf.training as training


class CpuFsdpAccelerator(Accelerator):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.state.fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
        self.state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # prepare() reads it from here


training.Accelerator = CpuFsdpAccelerator
if __name__ == "__main__":
    sys.exit(training.main(sys.argv[1:]))
