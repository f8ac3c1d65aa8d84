"""The stage entry points of dvc.yaml: `python -m stages.<name>`.

Python runs this file before the stage, so it is the one place that can quiet a notice
bitsandbytes logs at import (transformers' trainer imports PEFT, PEFT imports bitsandbytes):
its failed download of a CPU inference kernel from the Hub (stack_dpo.entrypoint.HubKernelNotice).
"""

import logging

from stack_dpo.entrypoint import HubKernelNotice

logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(HubKernelNotice())
