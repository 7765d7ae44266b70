"""embedtrain: train bidirectional Llama embedding models with DeepSpeed.

from embedtrain import BiEncoder
model = BiEncoder.from_pretrained("exported/tiny")          # CUDA + bf16 when available
vectors = model.encode(["Shilin Linlofo is a chemist."], prompt="query")

from embedtrain import Reranker
reranker = Reranker.from_pretrained("exported/tiny_reranker")
scores = reranker.score("Who is Shilin Linlofo?", ["Shilin Linlofo is a chemist.", "Paris is in France."])
"""

__version__ = "0.1.0"


def __getattr__(name):
    """`embedtrain.BiEncoder` on first use: `import embedtrain` stays cheap (no torch, no transformers)."""
    if name == "BiEncoder":
        from embedtrain.model import BiEncoder

        return BiEncoder
    if name == "Reranker":
        from embedtrain.model.reranker import Reranker

        return Reranker
    raise AttributeError(f"module 'embedtrain' has no attribute {name!r}")
