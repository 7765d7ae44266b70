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
    """InfoNCE of this rank's queries against the pool that `loss_config.negatives` names; with
    loss.matryoshka_dims, the weighted sum over the embeddings truncated to each dim and
    re-normalised (Kusupati et al., 2022). The pool is assembled (and gathered) once for all dims.

    `global` pools the passages (and with `loss.query_negatives` the queries) of every rank of
    `group` (default: the world), gathered with gradient. Each rank's loss is its share of the
    mean over all pooled queries, so that DeepSpeed's average over ranks is that mean even when
    ranks hold different numbers of queries.
    """
    dims = loss_config.matryoshka_dims or [None]
    weights = loss_config.matryoshka_weights or [1.0] * len(dims)
    stats = group_accuracy(queries_QD, passages_PD)
    if loss_config.negatives == "group":
        losses = [group_info_nce(truncate_to(queries_QD, d), truncate_to(passages_PD, d), loss_config.temperature)[0]
                  for d in dims]
    else:
        pool_ND, targets_Q, masked_QN, share = assemble_pool(queries_QD, passages_PD, positive_hash_Q, passage_hash_P,
                                                             loss_config, group)
        losses = [share * pooled_info_nce(truncate_to(queries_QD, d), truncate_to(pool_ND, d), targets_Q,
                                          loss_config.temperature, masked_QN)[0] for d in dims]
        stats["masked_fraction"] = masked_QN.float().mean()
        stats["negatives_per_query"] = (~masked_QN).float().sum(-1).mean() - 1.0
    if loss_config.matryoshka_dims:
        stats.update({f"loss_dim_{d}": loss.detach() for d, loss in zip(dims, losses)})
    return sum(w * loss for w, loss in zip(weights, losses)), stats


def truncate_to(embeddings, dim):
    return embeddings if dim is None else truncate(embeddings, dim)


def assemble_pool(queries_QD, passages_PD, positive_hash_Q, passage_hash_P, loss_config, group=None):
    """(pool_ND, targets_Q, masked_QN, share) for the `local` or `global` pool."""
    num_queries, per_query = queries_QD.shape[0], passages_PD.shape[0] // queries_QD.shape[0]
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
    return pool_ND, targets_Q, masked_QN, share
