"""Model code: free of distributed code. Registers `llama_bidirec` with the Auto classes so that
embedtrain loads its own exported models without trust_remote_code."""

from transformers import AutoConfig, AutoModel

from embedtrain.model.bidirectional import LlamaBidirectionalConfig, LlamaBidirectionalModel
from embedtrain.model.encoder import Encoder, check_bidirectional, load_backbone

AutoConfig.register("llama_bidirec", LlamaBidirectionalConfig, exist_ok=True)
AutoModel.register(LlamaBidirectionalConfig, LlamaBidirectionalModel, exist_ok=True)

__all__ = ["Encoder", "LlamaBidirectionalConfig", "LlamaBidirectionalModel", "check_bidirectional", "load_backbone"]
