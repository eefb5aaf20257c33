"""fastpeft: the same PEFT adapters, computed by fused kernels.

    model = get_peft_model(base, LoraConfig(...))
    fastpeft.patch(model)          # same parameters, same checkpoints, same results
    print(fastpeft.report(model))  # what was fused, what keeps PEFT's forward and why
"""

from .patch import PatchReport, patch, report, unpatch

__all__ = ["PatchReport", "patch", "report", "unpatch"]
__version__ = "0.1.0"
