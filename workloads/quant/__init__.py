"""LSQ multi-bit quantizers, module swapping, policies, post-training quantization."""
from .lsq import LsqQuantizer, lsq_quantize
from .modules import QConv2d, QLinear, SwitchableBatchNorm2d
from .policy import Policy
from .swap import (indicator_records, quant_layers, quant_parameters, quantize_model, searchable_names,
                   set_full_precision, set_policy, set_random, set_uniform)
