"""InfoNCE over MaxSim for multi-vector (ColBERT) models, over the configured negative pool: what
train/step.py's negatives_loss is for dense embeddings, on token embeddings.

The pure scores and losses live in embedtrain.losses (maxsim_scores and its InfoNCE); this module
assembles the pool, which for `global` means gathering every rank's passage token embeddings with
gradient, padded to a common token count (embedtrain.distributed.gather_tokens_with_grad).

The training step of model.kind=multi_vector (embedtrain/kinds/multi_vector.py) is here too:
`multi_vector_backward` encodes a micro-batch's encoder calls (TokenParts: token embeddings padded
to one width, passages' masks without the skiplist, model/multi_vector.document_mask), takes
`maxsim_negatives_loss` over all of them, and backpropagates, plainly or through GradCache
(train/grad_cache.py) with the token embeddings as its cache.
"""

import torch
import torch.nn.functional as F

from embedtrain import distributed
from embedtrain.data.collate import encoder_parts
from embedtrain.errors import ConfigError
from embedtrain.losses import (
    duplicate_positive_mask,
    group_positive_mask,
    maxsim_group_accuracy,
    maxsim_group_info_nce,
    maxsim_pooled_info_nce,
    positive_targets,
)
from embedtrain.model.multi_vector import document_mask
from embedtrain.train.grad_cache import grad_cache_backward, set_boundary


def check_loss_config(loss_config):
    """Refuse the loss settings the MaxSim loss does not implement (yet), naming the key."""
    for key, value in (
        ("loss.query_negatives", loss_config.query_negatives),
        ("loss.matryoshka_dims", loss_config.matryoshka_dims),
        ("loss.distill", loss_config.distill),
    ):
        if value:
            raise ConfigError(f"{key} is not supported for multi-vector models (model.kind: multi_vector); unset it")


def maxsim_negatives_loss(
    q_QTD, q_mask_QT, d_PLD, d_mask_PL, positive_hash_QK, passage_hash_P, loss_config, group=None, uniform=False
):
    """InfoNCE over MaxSim / temperature of this rank's queries against the pool that
    `loss_config.negatives` names (group, local or global), known positives masked as for dense
    (group_positive_mask, duplicate_positive_mask). Returns (loss, stats).

    q_QTD / q_mask_QT: the queries' token embeddings and scored tokens; d_PLD / d_mask_PL: the
    passages', grouped per query, positive first. Under `global` each rank's loss is its mean
    weighted by its share of the pooled queries (rank_weight), so that DeepSpeed's average over ranks
    is the mean over all pooled queries, as for dense; the gradient then equals one process's on
    the whole global batch."""
    check_loss_config(loss_config)
    tau = loss_config.temperature
    stats = maxsim_group_accuracy(q_QTD, q_mask_QT, d_PLD, d_mask_PL)
    if loss_config.negatives == "group":
        masked_QG = group_positive_mask(positive_hash_QK, passage_hash_P)
        loss, _ = maxsim_group_info_nce(q_QTD, q_mask_QT, d_PLD, d_mask_PL, tau, masked_QG)
        return loss, stats
    pool_NLD, pool_mask_NL, targets_Q, masked_QN, rank_weight = assemble_token_pool(
        q_QTD, d_PLD, d_mask_PL, positive_hash_QK, passage_hash_P, loss_config, group, uniform
    )
    loss, _ = maxsim_pooled_info_nce(q_QTD, q_mask_QT, pool_NLD, pool_mask_NL, targets_Q, tau, masked_QN)
    stats["masked_fraction"] = masked_QN.float().mean()
    stats["negatives_per_query"] = (~masked_QN).float().sum(-1).mean() - 1.0
    return rank_weight * loss, stats


def assemble_token_pool(
    q_QTD, d_PLD, d_mask_PL, positive_hash_QK, passage_hash_P, loss_config, group=None, uniform=False
):
    """(pool_NLD, pool_mask_NL, targets_Q, masked_QN, rank_weight) of the `local` or `global` pool:
    train/step.py's assemble_pool for token embeddings (the rank's passages, or every rank's
    gathered with gradient and padded to the longest token count)."""
    num_queries, per_query = q_QTD.shape[0], d_PLD.shape[0] // q_QTD.shape[0]
    rank_weight = 1.0
    if loss_config.negatives == "global":
        pool_NLD, pool_mask_NL, offset = distributed.gather_tokens_with_grad(d_PLD, d_mask_PL, group, uniform)
        pool_hash_N = distributed.gather_no_grad(passage_hash_P, group, uniform)
        total_queries = pool_NLD.shape[0] // per_query
        rank_weight = num_queries * distributed.world_size(group) / total_queries
    else:
        pool_NLD, pool_mask_NL, offset, pool_hash_N = d_PLD, d_mask_PL, 0, passage_hash_P
    targets_Q = positive_targets(num_queries, per_query, offset, q_QTD.device)
    masked_QN = duplicate_positive_mask(positive_hash_QK, pool_hash_N, targets_Q)
    return pool_NLD, pool_mask_NL, targets_Q, masked_QN, rank_weight


# --- the training step of model.kind=multi_vector: encode, MaxSim InfoNCE, backward --------------


def part_width(part):
    """The token width of one encoder call's TokenEmbeddings, known on the host (no device read): a
    packed call's longest sequence (repad_packed's width), a padded call's row width."""
    inputs = part["inputs"]
    return inputs.max_length if inputs.packed else inputs.input_ids.shape[1]


class TokenParts:
    """A micro-batch's encoder calls (its GradCache chunks, or the one call) as token embeddings
    padded to ONE width, the longest call's, so that chunks concatenate along the sequence axis.

    `encode(module, part)` -> (queries_QWD, passages_PWD) embeddings, the GradCache interface
    (train/grad_cache.py concatenates and slices them as it does dense embeddings); the scored-token
    masks, which carry no gradient and are the same in both GradCache passes, are kept from the
    first encoding of each part (`masks()`), the passages' without the skiplist's tokens
    (model/multi_vector.document_mask with the batch's skip_ids)."""

    def __init__(self, batch, device):
        self.parts = encoder_parts(batch)
        self.width = max(part_width(part) for part in self.parts)
        self.device = device
        self.skip_ids = batch["skip_ids"].tolist() if "skip_ids" in batch else []  # a host tensor: no sync
        self.recorded = {}

    def encode(self, module, part):
        inputs = part["inputs"].to(self.device, non_blocking=True)
        score_mask = part.get("score_mask")
        score_mask = None if score_mask is None else score_mask.to(self.device, non_blocking=True)
        tokens = module(inputs, None, score_mask)
        queries, passages = tokens.split(part["num_queries"])
        if id(part) not in self.recorded:
            passage_mask = document_mask(passages.input_ids, passages.mask, self.skip_ids)
            self.recorded[id(part)] = (self.pad(queries.mask), self.pad(passage_mask))
        return self.pad(queries.embeddings), self.pad(passages.embeddings)

    def pad(self, tensor):
        """(S, L, ...) -> (S, width, ...) with zeros (False) after column L; differentiable."""
        missing = self.width - tensor.shape[1]
        if not missing:
            return tensor
        return F.pad(tensor, (0, 0, 0, missing) if tensor.dim() == 3 else (0, missing))

    def masks(self):
        """(query_mask_QW, passage_mask_PW) of every part, in part order."""
        pairs = [self.recorded[id(part)] for part in self.parts]
        return torch.cat([q for q, _ in pairs]), torch.cat([p for _, p in pairs])


def token_embeddings_loss(tokens, queries_QWD, passages_PWD, batch, loss_config, group=None, uniform=False):
    """The micro-batch's MaxSim InfoNCE from its (concatenated) token embeddings and TokenParts'
    masks: maxsim_negatives_loss over the configured pool."""
    q_mask_QW, d_mask_PW = tokens.masks()
    device = queries_QWD.device
    return maxsim_negatives_loss(
        queries_QWD,
        q_mask_QW,
        passages_PWD,
        d_mask_PW,
        batch["positive_hash"].to(device),
        batch["passage_hash"].to(device),
        loss_config,
        group,
        uniform,
    )


def multi_vector_loss(module, batch, loss_config, device, group=None, uniform=False):
    """(loss, stats) of one micro-batch with a DeepSpeed engine or a plain MultiVectorEncoder: every
    encoder call with gradient, then the loss over all of them (the parity tests' reference)."""
    tokens = TokenParts(batch, device)
    encoded = [tokens.encode(module, part) for part in tokens.parts]
    queries_QWD, passages_PWD = torch.cat([q for q, _ in encoded]), torch.cat([p for _, p in encoded])
    return token_embeddings_loss(tokens, queries_QWD, passages_PWD, batch, loss_config, group, uniform)


def multi_vector_backward(engine, batch, loss_config, accumulation, grad_cache=False, group=None, boundary=None):
    """engine.backward for one multi-vector micro-batch; returns (loss, stats). As
    train/step.micro_batch_backward for dense embeddings: the loss divided by `accumulation` here,
    `boundary` as there; with `grad_cache` (train.grad_cache_chunk_size, or the chunks cut by
    train.micro_batch_tokens) through GradCache, whose cache holds every chunk's token embeddings
    (queries Q x W x D and passages P x W x D fp32, W the longest chunk's token width): the exact
    gradient of the whole micro-batch's loss, with activations of one chunk at a time."""
    tokens = TokenParts(batch, engine.device)
    if grad_cache:
        return grad_cache_backward(
            engine,
            tokens.parts,
            lambda part: tokens.encode(engine, part),
            lambda queries, passages: token_embeddings_loss(
                tokens, queries, passages, batch, loss_config, group, uniform=True
            ),
            accumulation,
            boundary,
        )
    set_boundary(engine, boundary)
    loss, stats = multi_vector_loss(engine, batch, loss_config, engine.device, group, uniform=True)
    engine.backward(loss / accumulation, scale_wrt_gas=False)
    return loss, stats
