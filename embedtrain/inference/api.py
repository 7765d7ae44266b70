"""The user-facing models: `BiEncoder` (embeddings of texts) and `Reranker` (scores of (query,
passage) pairs), what `embedtrain.BiEncoder` / `embedtrain.Reranker` return.

Each is a thin object, not an nn.Module: it holds the eval-mode training module (`module`: an
Encoder or TeacherSpaceEncoder, or a PairScorer), its `tokenizer` and what the export recorded for
using it (a bi-encoder's prompt policy and max_seq_length, a reranker's pair template and pair max
length), so that the modules stay free of files, prompts and tokenizers.
"""

from embedtrain.inference.batching import encode_texts, prompt_text, score_pairs
from embedtrain.inference.loading import encoder_parts, reranker_parts


class EncoderModel:
    """What the models that encode texts share (BiEncoder, MultiVectorEncoder, SparseEncoder): the eval-mode
    `module` they hold (set by the subclass), its device and the width of the vectors it returns."""

    @property
    def device(self):
        return next(self.module.parameters()).device

    @property
    def width(self):
        """The width of the vectors `encode` returns (per text, or per token for a multi-vector model)
        without `dim`: the module's (a kept projection's output width, a multi-vector projection's dim,
        a sparse model's vocabulary size)."""
        return self.module.width


class QueryDocumentEncoder(EncoderModel):
    """The encoders that encode queries and documents differently (MultiVectorEncoder: query
    expansion, document skiplist; SparseEncoder: their lengths, an inference-free query table):
    `encode(texts, prompt=None, is_query=None, ...)`, and its two shorthands here."""

    def encode_query(self, texts, **options):
        return self.encode(texts, prompt="query", is_query=True, **options)

    def encode_document(self, texts, **options):
        return self.encode(texts, prompt="document", is_query=False, **options)


class BiEncoder(EncoderModel):
    """An embedding model ready for `encode`: `module` (eval mode), `tokenizer`, `prompt_policy`
    (embedtrain.prompts.PromptPolicy), `max_seq_length` (tokens per text by default) and
    `name_or_path` (the folder it was loaded from)."""

    def __init__(self, module, tokenizer, prompt_policy, max_seq_length=512, name_or_path=None):
        self.module = module
        self.tokenizer = tokenizer
        self.prompt_policy = prompt_policy
        self.max_seq_length = max_seq_length
        self.name_or_path = name_or_path

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None):
        """An exported model folder (`embedtrain export`) ready for `encode`, in eval mode.

        device: None/"auto" (CUDA when available, else CPU), "cpu", "cuda", "cuda:N" or a
        torch.device; dtype: None/"auto" (bfloat16 on CUDA, float32 on CPU), "float32", "bfloat16",
        "float16" or a torch.dtype. The tokenizer, prompts and max_seq_length travel with the model.
        A reranker folder is refused with a message naming its kind.
        """
        return cls(**encoder_parts(path, dtype=dtype, device=device))

    def encode(self, texts, prompt=None, batch_size=32, max_length=None, dim=None, normalize=True, progress=False):
        """Embeddings of `texts` as a float32 numpy array (N, D) on the host, in input order (one
        string gives one (D,) vector). prompt: "query" / "document" (the model's prompts,
        embedtrain.prompts), any other string put in front literally, or None. max_length: tokens
        per text (default the model's max_seq_length); dim: keep the first K dims (Matryoshka)."""
        single = isinstance(texts, str)
        vectors = encode_texts(
            self.module,
            self.tokenizer,
            [texts] if single else list(texts),
            batch_size,
            max_length or self.max_seq_length,
            dim,
            progress=progress,
            prompt=prompt_text(self.prompt_policy, prompt),
            normalize=normalize,
        )
        return vectors[0] if single else vectors

    def __repr__(self):
        return f"BiEncoder({self.name_or_path!r}, {type(self.module).__name__} on {self.device})"


class Reranker:
    """A reranker (cross-encoder) ready for `score` and `rank`: `module` (a PairScorer, eval mode),
    `tokenizer`, `pair_template` (how a pair becomes one sequence, as in training), `max_length`
    (tokens per pair by default) and `name_or_path`."""

    def __init__(self, module, tokenizer, pair_template, max_length=512, name_or_path=None):
        self.module = module
        self.tokenizer = tokenizer
        self.pair_template = pair_template
        self.max_length = max_length
        self.name_or_path = name_or_path

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None):
        """An exported reranker (`embedtrain export` of a model.kind=reranker run) ready for `score`,
        in eval mode; device and dtype as BiEncoder.from_pretrained's. An embedding model's folder
        is refused with a message naming its kind."""
        return cls(**reranker_parts(path, dtype=dtype, device=device))

    @property
    def device(self):
        return next(self.module.parameters()).device

    def score(self, query, passages, batch_size=32, max_length=None):
        """Relevance scores (float32 numpy, one per passage, in order) of `passages` for `query`:
        each pair rendered with the template the model was trained with."""
        single = isinstance(passages, str)
        passages = [passages] if single else list(passages)
        scores = score_pairs(self, [query] * len(passages), passages, batch_size, max_length)
        return scores[0] if single else scores

    def rank(self, query, passages, top_k=None, batch_size=32):
        """[(passage index, score)] of `passages` for `query`, best first (the first `top_k`)."""
        scores = self.score(query, list(passages), batch_size)
        order = sorted(range(len(scores)), key=lambda i: -scores[i])
        return [(i, float(scores[i])) for i in order[:top_k]]

    def encode(self, *args, **kwargs):
        raise ValueError(
            "this model is a reranker (cross-encoder): it scores pairs with .score / .rank, it does not encode"
        )

    def __repr__(self):
        return f"Reranker({self.name_or_path!r}, {type(self.module).__name__} on {self.device})"
