"""embedtrain: train bidirectional Llama embedding models with DeepSpeed.

from embedtrain import BiEncoder
model = BiEncoder.from_pretrained("exported/tiny")          # CUDA + bf16 when available
vectors = model.encode(["Shilin Linlofo is a chemist."], prompt="query")

from embedtrain import Reranker
reranker = Reranker.from_pretrained("exported/tiny_reranker")
scores = reranker.score("Who is Shilin Linlofo?", ["Shilin Linlofo is a chemist.", "Paris is in France."])
"""

from embedtrain.version import __version__  # noqa: F401 (embedtrain.__version__)


def __getattr__(name):
    """`embedtrain.BiEncoder` / `embedtrain.Reranker` / `embedtrain.MultiVectorEncoder` / `embedtrain.SparseEncoder`
    (embedtrain.inference) on first use: `import embedtrain` stays cheap (no torch, no transformers)."""
    if name in ("BiEncoder", "Reranker", "MultiVectorEncoder", "SparseEncoder"):
        from embedtrain import inference

        return getattr(inference, name)
    raise AttributeError(f"module 'embedtrain' has no attribute {name!r}")
