"""The embedding model (model.kind=embedding): a bi-encoder giving one vector per text, trained with
InfoNCE over the configured negative pool; under loss.distill a ProjectedEncoder (its projection to
the teacher's width) trained against the teacher cache."""

from embedtrain.data.collate import Collator
from embedtrain.kinds.base import ModelKind
from embedtrain.model import Encoder
from embedtrain.model.distill import ProjectedEncoder, new_projection
from embedtrain.train.evaluation import evaluate_in_training, load_sources
from embedtrain.train.step import micro_batch_backward


class DenseKind(ModelKind):
    name = "embedding"
    export_format = "sentence_transformer"
    length_keys = ("data.query_max_length", "data.passage_max_length")

    def build_module(self, config, backbone, dtype, teacher_dim=None):
        if config.loss.distill is not None:
            projection = new_projection(backbone.config.hidden_size, teacher_dim, config.train.seed)
            return ProjectedEncoder(backbone, config.model.pooling, config.model.normalize, projection)
        return Encoder(backbone, config.model.pooling, config.model.normalize)

    def make_collator(self, tokenizer, config, dataset_info, one_row, teacher=None):
        return Collator(tokenizer, config.data, dataset_info, config.train.grad_cache_chunk_size, teacher, one_row)

    def backward(self, engine, batch, config, divisor, group=None, boundary=None):
        grad_cache = self.grad_cache(config, batch)
        return micro_batch_backward(engine, batch, config.loss, divisor, grad_cache, group, boundary)

    def budget_chunks(self, config):
        return config.loss.negatives != "group"  # local/global: every query's loss needs the whole pool

    def eval_sources(self, config, collator):
        return load_sources(config.eval, collator.policy)

    def evaluate(self, engine, tokenizer, sources, config):
        return evaluate_in_training(engine, tokenizer, sources, config.eval.batch_size, config.data.passage_max_length)
