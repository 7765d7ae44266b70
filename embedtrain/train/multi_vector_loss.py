"""InfoNCE over MaxSim for multi-vector (ColBERT) models, over the configured negative pool: what
train/step.py's negatives_loss is for dense embeddings, on token embeddings.

The pure scores and losses live in embedtrain.losses (maxsim_scores and its InfoNCE); this module
assembles the pool, which for `global` means gathering every rank's passage token embeddings with
gradient, padded to a common token count (embedtrain.distributed.gather_tokens_with_grad). The
training wiring (model.kind: multi_vector) calls `maxsim_negatives_loss` with the TokenEmbeddings
of one micro-batch's queries and passages (embedtrain.model.multi_vector), the passages' masks
already without the skiplist (document_mask).
"""

from embedtrain import distributed
from embedtrain.errors import ConfigError
from embedtrain.losses import (
    duplicate_positive_mask,
    group_positive_mask,
    maxsim_group_accuracy,
    maxsim_group_info_nce,
    maxsim_pooled_info_nce,
    positive_targets,
)


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
