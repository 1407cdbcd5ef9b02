"""Run a training script under Accelerate's FSDP on CPU processes (gloo), for the tests.

Accelerate turns FSDP on only for accelerator devices: with ACCELERATE_USE_CPU it settles on MULTI_CPU (DDP)
even when ACCELERATE_USE_FSDP is set. This wrapper switches that state to FSDP once Accelerate has made it, so
`accelerator.prepare` shards the models with torch's fully_shard, as it does on GPUs.

    ACCELERATE_USE_CPU=1 ACCELERATE_USE_FSDP=true FSDP_VERSION=2 \
      torchrun --nproc_per_node 2 tests/fsdp_on_cpu.py train_scripts/train_dreambooth_lie_flux.py ...
"""

import runpy
import sys

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_init = AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    plugin = kwargs.get("fsdp_plugin")
    if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        # Both shared states: later AcceleratorState() calls copy PartialState's over their own.
        PartialState._shared_state["distributed_type"] = self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = plugin
        if self._mixed_precision != "no":
            plugin.set_mixed_precision(self._mixed_precision)


AcceleratorState.__init__ = _init_with_fsdp_on_cpu
script, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_path(script, run_name="__main__")
