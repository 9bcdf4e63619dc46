"""dsv2: DeepSeek-V2 (Multi-head Latent Attention + DeepSeekMoE) in PyTorch."""

from dsv2.checkpoint import install as _install_checkpoint_io
from dsv2.config import ConfigError, ModelConfig
from dsv2.model import DeepseekV2

_install_checkpoint_io()  # DeepseekV2.from_pretrained / save_pretrained (model/ never imports checkpoint)

__version__ = "0.1.0"
__all__ = ["ModelConfig", "ConfigError", "DeepseekV2", "__version__"]
