"""One micro-batch: encode queries and passages, then InfoNCE over the configured negative pool.

The pure losses live in embedtrain.losses; this module assembles the pool, which for `global`
means gathering across ranks with gradient (embedtrain.distributed)."""

import torch

from embedtrain import distributed
from embedtrain.losses import duplicate_positive_mask, group_accuracy, group_info_nce, pooled_info_nce, positive_targets
from embedtrain.model.pooling import truncate


def contrastive_loss(encoder, batch, loss_config, device, group=None):
    """Encode one micro-batch with a DeepSpeed engine or a plain BiEncoder; return (loss, stats)."""
    queries_QD = encoder(batch["query_ids"].to(device), batch["query_mask"].to(device))
    passages_PD = encoder(batch["passage_ids"].to(device), batch["passage_mask"].to(device))
    return negatives_loss(queries_QD, passages_PD, batch["positive_hash"].to(device),
                          batch["passage_hash"].to(device), loss_config, group)


def negatives_loss(queries_QD, passages_PD, positive_hash_Q, passage_hash_P, loss_config, group=None):
    """InfoNCE over the configured pool; with loss.matryoshka_dims, the weighted sum of the losses
    of the embeddings truncated to each dim and re-normalised (Kusupati et al., 2022)."""
    dims = loss_config.matryoshka_dims
    if not dims:
        return pool_loss(queries_QD, passages_PD, positive_hash_Q, passage_hash_P, loss_config, group)
    weights = loss_config.matryoshka_weights or [1.0] * len(dims)
    total, stats = 0.0, None
    for dim, weight in zip(dims, weights):
        loss, dim_stats = pool_loss(truncate(queries_QD, dim), truncate(passages_PD, dim), positive_hash_Q,
                                    passage_hash_P, loss_config, group)
        total = total + weight * loss
        stats = stats or dim_stats  # accuracy and similarities of the first (usually smallest) dim
        stats[f"loss_dim_{dim}"] = loss.detach()
    return total, stats


def pool_loss(queries_QD, passages_PD, positive_hash_Q, passage_hash_P, loss_config, group=None):
    """InfoNCE of this rank's queries against the pool that `loss_config.negatives` names.

    `global` pools the passages (and with `loss.query_negatives` the queries) of every rank of
    `group` (default: the world), gathered with gradient. Each rank's loss is its share of the
    mean over all pooled queries, so that DeepSpeed's average over ranks is that mean even when
    ranks hold different numbers of queries.
    """
    stats = group_accuracy(queries_QD, passages_PD)
    num_queries, per_query = queries_QD.shape[0], passages_PD.shape[0] // queries_QD.shape[0]
    if loss_config.negatives == "group":
        loss, _ = group_info_nce(queries_QD, passages_PD, loss_config.temperature)
        return loss, stats
    share = 1.0
    query_pool_MD, query_offset = queries_QD, 0
    if loss_config.negatives == "global":
        pool_ND, offset = distributed.gather_with_grad(passages_PD, group)
        pool_hash_N = distributed.gather_no_grad(passage_hash_P, group)
        total_queries = pool_ND.shape[0] // per_query
        share = num_queries * distributed.world_size(group) / total_queries
        if loss_config.query_negatives:
            query_pool_MD, query_offset = distributed.gather_with_grad(queries_QD, group)
    else:
        pool_ND, offset, pool_hash_N = passages_PD, 0, passage_hash_P
    targets_Q = positive_targets(num_queries, per_query, offset, queries_QD.device)
    masked_QN = duplicate_positive_mask(positive_hash_Q, pool_hash_N, targets_Q)
    if loss_config.query_negatives:
        # other queries join the pool; a query never counts itself as a negative
        self_QM = torch.zeros(num_queries, query_pool_MD.shape[0], dtype=torch.bool, device=queries_QD.device)
        self_QM[torch.arange(num_queries), query_offset + torch.arange(num_queries)] = True
        pool_ND = torch.cat([pool_ND, query_pool_MD])
        masked_QN = torch.cat([masked_QN, self_QM], dim=1)
    loss, _ = pooled_info_nce(queries_QD, pool_ND, targets_Q, loss_config.temperature, masked_QN)
    stats["masked_fraction"] = masked_QN.float().mean()
    stats["negatives_per_query"] = (~masked_QN).float().sum(-1).mean() - 1.0
    return loss * share, stats
