"""The reranker (model.kind=reranker): a cross-encoder scoring each (query, passage) pair, rendered
through data.pair_template, with cross-entropy over each query's group. Its in-training evaluation
reranks each held-out query's candidates; its export is a sentence-transformers CrossEncoder, whose
pair template and length base_model/reranker.json records."""

from embedtrain.data.collate import PairCollator
from embedtrain.errors import ConfigError
from embedtrain.kinds.base import ModelKind
from embedtrain.model.reranker import KIND_FILE, PairScorer, new_head
from embedtrain.train.evaluation import load_rerank_sources, rerank_in_training
from embedtrain.train.step import reranker_backward


class RerankerKind(ModelKind):
    name = "reranker"
    base_model_file = KIND_FILE
    export_format = "cross_encoder"
    length_keys = ("data.pair_max_length",)
    eval_note = "  (reranking each query's pos_doc + neg_doc)"

    def check_family(self, family, config):
        if not family.reranker:
            raise ConfigError(
                f"model.kind=reranker: not supported for the {family.name} family of {config.model.path} "
                "(its reranker export format is not built); supported for Llama"
            )

    def build_module(self, config, backbone, dtype, teacher_dim=None):
        head = new_head(config.model.path, backbone.config.hidden_size, dtype, config.train.seed)
        return PairScorer(backbone, config.model.pooling, config.loss.temperature, head)

    def make_collator(self, tokenizer, config, dataset_info, one_row, teacher=None):
        chunk, inbatch = config.train.grad_cache_chunk_size, config.loss.inbatch_negatives
        return PairCollator(tokenizer, config.data, dataset_info, chunk, one_row, inbatch_negatives=inbatch)

    def backward(self, engine, batch, config, divisor, group=None, boundary=None):
        return reranker_backward(engine, batch, divisor, boundary)

    def budget_chunks(self, config):
        return False  # each query's loss needs only its own pairs: any cut in whole queries is exact

    def eval_sources(self, config, collator):
        return load_rerank_sources(config.eval, config.data, config.eval.rerank_candidates)

    def evaluate(self, engine, tokenizer, sources, config):
        return rerank_in_training(engine, tokenizer, sources, config.eval.batch_size, config.data.pair_max_length)

    def base_model_files(self, config):
        settings = {"pair_template": config.data.pair_template, "pair_max_length": config.data.pair_max_length}
        return {KIND_FILE: {"kind": self.name, **settings}}
