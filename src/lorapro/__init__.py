"""lorapro — LoRA-Pro (arXiv 2407.18242) as drop-in PyTorch optimizers for LoRA models.

>>> from lorapro import LoRAProAdamW, LoRAProSGD, lora_pairs
>>> opt = LoRAProAdamW(peft_model, lr=2e-5, mode="full", x_solution="sylvester")  # doctest: +SKIP

The core (this package's top level) depends on torch only.
"""

from .optim import MODES, LoRAProAdamW, LoRAProSGD, build_param_groups
from .pairing import LoRAPair, lora_pairs

__version__ = "0.1.0"

__all__ = ["LoRAProAdamW", "LoRAProSGD", "LoRAPair", "lora_pairs", "build_param_groups", "MODES", "__version__"]
