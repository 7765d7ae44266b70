"""The sparse lexical model (model.kind=sparse, SPLADE): the backbone's LM head gives each vocabulary
term a weight, log(1 + relu(logit)) max-pooled over the text's tokens (embedtrain/model/sparse.py);
queries and passages score by the dot product of their (vocab,) vectors.

Training is the dense bi-encoder's step with another loss (train/sparse_loss.py): InfoNCE over the
dot products with the same three pools, GradCache and token budget, plus the FLOPS regularisation of
queries and documents, whose weight warms up quadratically over model.sparse.flops_warmup_steps. The
step of the warm-up is DeepSpeed's count of optimizer steps (engine.global_steps), which is the
training loop's step: it counts every step, skipped or not, and a resume restores it (DeepSpeed's
load_checkpoint, and train/checkpoint.py's load_resharded).

With model.sparse.inference_free_queries the module has a query table (model/sparse.py's
StaticTermWeights, initialised to ones as sentence-transformers' SparseStaticEmbedding is without
weights) and the collator (InferenceFreeCollator) hands the queries to it apart from the passages,
tokenized as that module tokenizes at inference: the prompt and the text, no special tokens, cut
to data.query_max_length (the export's query tokenizer has that model_max_length). The table is a
parameter like the others: optimised, checkpointed, resumed and exported (export_sparse.py).
"""

from functools import partial

from embedtrain.data.collate import Collator
from embedtrain.errors import ConfigError
from embedtrain.kinds.base import ModelKind
from embedtrain.model.sparse import QUERY_TABLE_KEY, InferenceFreeInputs, SparseModel, StaticTermWeights, load_lm_head
from embedtrain.train.evaluation import evaluate_in_training, load_sources
from embedtrain.train.sparse_loss import sparse_loss_at
from embedtrain.train.step import micro_batch_backward

KIND_FILE = "sparse.json"  # in a run's base_model folder: what the export needs to write a sparse model


class SparseKind(ModelKind):
    name = "sparse"
    base_model_file = KIND_FILE
    export_format = "sparse"  # embedtrain/export_sparse.py: a sentence-transformers SparseEncoder folder
    model_keys = ("model.sparse.inference_free_queries",)
    length_keys = ("data.query_max_length", "data.passage_max_length")
    eval_note = "  (dot products of term weights)"

    def check_family(self, family, config):
        if family.stock_export:
            raise ConfigError(
                f"model.kind=sparse: not supported for the {family.name} family of {config.model.path} (the "
                "SparseEncoder export needs a fill-mask class, which only embedtrain's Llama modeling file has); "
                "supported for Llama"
            )

    def build_module(self, config, backbone, dtype, teacher_dim=None):
        head = load_lm_head(config.model.path, backbone, dtype)
        table = StaticTermWeights(head.out_features) if config.model.sparse["inference_free_queries"] else None
        return SparseModel(backbone, head, table)

    def make_collator(self, tokenizer, config, dataset_info, one_row, teacher=None):
        chunk_size = config.train.grad_cache_chunk_size
        if config.model.sparse["inference_free_queries"]:
            return InferenceFreeCollator(tokenizer, config.data, dataset_info, chunk_size, None, one_row)
        return Collator(tokenizer, config.data, dataset_info, chunk_size, None, one_row)

    def backward(self, engine, batch, config, divisor, group=None, boundary=None):
        grad_cache = self.grad_cache(config, batch)
        loss_fn = sparse_loss_at(config.model.sparse, engine.global_steps + 1)  # this step, 1-based
        return micro_batch_backward(engine, batch, config.loss, divisor, grad_cache, group, boundary, loss_fn)

    def budget_chunks(self, config):
        return True  # the FLOPS terms are over the whole micro-batch, under every pool

    def eval_sources(self, config, collator):
        return load_sources(config.eval, collator.policy)

    def evaluate(self, engine, tokenizer, sources, config):
        # the held-out corpus' (docs, vocab) weights are scored densely: exact, memory docs x vocab x 4 bytes
        queries = None
        if config.model.sparse["inference_free_queries"]:  # the table weighs the queries, tokenized without specials
            queries = (TableQueries(engine), partial(tokenizer, add_special_tokens=False))
        length = config.data.passage_max_length
        return evaluate_in_training(engine, tokenizer, sources, config.eval.batch_size, length, queries)

    def learning_rates(self, config):
        settings = config.model.sparse
        if not settings["inference_free_queries"]:
            return {}
        return {QUERY_TABLE_KEY.rsplit(".", 1)[0] + ".": settings["query_table_lr"]}

    def base_model_files(self, config):
        settings = config.model.sparse
        return {KIND_FILE: {"kind": self.name, **settings}}


class InferenceFreeCollator(Collator):
    """Collator's batches for inference-free queries: every encoder call's "inputs" is an
    InferenceFreeInputs (model/sparse.py), the queries padded apart (tokenized without special
    tokens, as sentence-transformers' SparseStaticEmbedding does) and the passages as Collator
    makes them (packed or padded). The token counts are the passages' (the backbone's work)."""

    def tokenize(self, examples):
        queries = [self.subset_prompts[e.subset][0] + e.query for e in examples]
        passages = [self.subset_prompts[e.subset][1] + p for e in examples for p in e.passages]
        return (
            self.tokenizer(queries, max_length=self.config.query_max_length, truncation=True, add_special_tokens=False)[
                "input_ids"
            ],
            self.tokenizer(passages, max_length=self.config.passage_max_length, truncation=True)["input_ids"],
        )

    def encoder_inputs(self, sequences, num_queries):
        part = super().encoder_inputs(sequences[num_queries:], 0)
        queries = self.tokenizer.pad({"input_ids": list(sequences[:num_queries])}, return_tensors="pt")
        part["inputs"] = InferenceFreeInputs(queries["input_ids"], queries["attention_mask"], part["inputs"])
        part["num_queries"] = num_queries
        return part


class TableQueries:
    """An engine called as train/evaluation.py's encode_sharded calls it, (ids, mask) -> vectors,
    weighing those texts as queries by the table (one forward of the module, as in training)."""

    def __init__(self, engine):
        self.engine = engine

    @property
    def device(self):
        return self.engine.device

    def __call__(self, input_ids, attention_mask):
        return self.engine(InferenceFreeInputs(input_ids, attention_mask))
