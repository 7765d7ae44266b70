"""embedtrain: train bidirectional Llama embedding models with DeepSpeed."""

__version__ = "0.1.0"
