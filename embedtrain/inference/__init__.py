"""The inference layer: exported folders loaded onto a device (loading.py), batched encoding and
pair scoring (batching.py) and the user-facing objects that hold a module with its tokenizer and
prompts (api.py). Above the model package (which knows nothing of files, prompts or tokenizers at
inference), below retrieval, the commands and training's evaluation."""

from embedtrain.inference.api import BiEncoder, Reranker
from embedtrain.inference.multi_vector import MultiVectorEncoder
from embedtrain.inference.sparse import SparseEncoder

__all__ = ["BiEncoder", "MultiVectorEncoder", "Reranker", "SparseEncoder"]
