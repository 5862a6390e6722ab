"""``rglcd`` under accelerate's FSDP2 on the CPU, for tests: accelerate enables FSDP only on accelerator devices
(on a CPU it silently runs DDP), so this marks the gloo process group as a GPU group first; everything after that,
the sharding included, is accelerate's and torch's own FSDP code. Run it with 2 processes under
``accelerate launch --config_file docs/accelerate/fsdp.yaml``."""

import sys

from accelerate import PartialState
from accelerate.utils import DistributedType

from rglcd.cli import main

PartialState(cpu=True)._shared_state["distributed_type"] = DistributedType.MULTI_GPU
sys.exit(main(sys.argv[1:]))
