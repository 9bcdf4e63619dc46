"""Weight-only int8 / int4 for CPU inference: quantised modules, the module-swap pass, streaming fill.

    from dsv2 import DeepseekV2
    model = DeepseekV2.from_pretrained("DeepSeek-V2-Lite", weights="int4")   # quantised while loading
    model.save_pretrained("lite-int4")                                     # a quantised folder
    model = DeepseekV2.from_pretrained("lite-int4")                        # mapped, loads in seconds

or, on a model already in memory: `dsv2.quant.quantize_model(model, "int8")`. Opt-in, faster on AVX2 CPUs and
not exact: `dsv2.quant.set_int8_activations(model)` (activations rounded to int8 per 32 values before each
quantised product; `EngineConfig(int8_activations=True)`, `--int8-activations` on the CLI).
"""

from dsv2.quant.kernels import GROUP_SIZES, QuantError
from dsv2.quant.modules import WEIGHT_FORMATS, QuantExperts, QuantLinear
from dsv2.quant.swap import QuantConfig, quantize_model, set_int8_activations

__all__ = ["GROUP_SIZES", "WEIGHT_FORMATS", "QuantConfig", "QuantError", "QuantExperts", "QuantLinear",
           "quantize_model", "set_int8_activations"]
