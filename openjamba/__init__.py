"""openjamba: Jamba (AI21's hybrid Transformer-Mamba mixture-of-experts LM) in plain PyTorch."""

from .config import PRESETS, JambaConfig, get_preset
from .model import JambaForCausalLM
from .tokenizer import load_tokenizer

__all__ = ["PRESETS", "JambaConfig", "JambaForCausalLM", "get_preset", "load_tokenizer"]
__version__ = "0.1.0"
