"""One micro-batch: encode queries and passages, then InfoNCE over the configured negative pool.

The pure losses live in embedtrain.losses; this module assembles the pool, which for `global`
means gathering across ranks with gradient (embedtrain.distributed). `grad_cache_backward` is the
same step for micro-batches far larger than activation memory allows (GradCache,
embedtrain.train.grad_cache)."""

import torch

from embedtrain import distributed
from embedtrain.data.collate import encoder_parts
from embedtrain.losses import (
    duplicate_positive_mask,
    embedding_distance,
    group_accuracy,
    group_cross_entropy,
    group_info_nce,
    group_positive_mask,
    group_scores,
    inbatch_cross_entropy,
    matryoshka,
    pooled_info_nce,
    positive_targets,
    score_kl,
    scores,
)
from embedtrain.model.distill import split_projected
from embedtrain.model.pooling import truncate
from embedtrain.train.grad_cache import grad_cache_backward, set_boundary


def encoder_inputs(part, device):
    """One encoder call's EncoderInputs (data/collate.py) on `device`: one move of all its tensors,
    asynchronous from the DataLoader's pinned memory."""
    return part["inputs"].to(device, non_blocking=True)


def encode_part(encoder, part, device):
    """(queries_QD, passages_PD) of one encoder call: queries and passages in ONE forward (under
    ZeRO-3 one gather of each layer's weights, and one recompute under checkpointing)."""
    embeddings_SD = encoder(encoder_inputs(part, device))
    return embeddings_SD[: part["num_queries"]], embeddings_SD[part["num_queries"] :]


def encode_micro_batch(encoder, batch, device):
    """(queries_QD, passages_PD) of a micro-batch, chunk by chunk when it is cut for GradCache."""
    parts = [encode_part(encoder, part, device) for part in encoder_parts(batch)]
    if len(parts) == 1:
        return parts[0]
    return torch.cat([q for q, _ in parts]), torch.cat([p for _, p in parts])


def contrastive_loss(encoder, batch, loss_config, device, group=None, uniform=False, loss_fn=None):
    """Encode one micro-batch with a DeepSpeed engine or a plain Encoder; return (loss, stats).
    `uniform`: every rank's micro-batch has this one's size (the training loop's always do).
    `loss_fn`: the loss of the embeddings, embeddings_loss's signature (default embeddings_loss; a
    sparse model's adds its FLOPS terms, train/sparse_loss.py)."""
    queries_QD, passages_PD = encode_micro_batch(encoder, batch, device)
    return (loss_fn or embeddings_loss)(queries_QD, passages_PD, batch, loss_config, device, group, uniform)


def embeddings_loss(queries_QD, passages_PD, batch, loss_config, device, group=None, uniform=False):
    """The micro-batch's loss from its embeddings: InfoNCE over the configured pool, or with
    loss.distill the distillation loss (the embeddings then carry the student's projection)."""
    if loss_config.distill is not None:
        return distill_loss(queries_QD, passages_PD, batch, loss_config, device, group, uniform)
    return negatives_loss(
        queries_QD,
        passages_PD,
        batch["positive_hash"].to(device),
        batch["passage_hash"].to(device),
        loss_config,
        group,
        uniform,
    )


def micro_batch_queries(batch):
    """The queries of a collated micro-batch (Collator or PairCollator)."""
    if "group_size" in batch:
        return sum(part["num_pairs"] for part in encoder_parts(batch)) // batch["group_size"]
    return batch["positive_hash"].shape[0]


def micro_batch_backward(
    engine, batch, loss_config, accumulation, chunk_size=0, group=None, boundary=None, loss_fn=None
):
    """engine.backward for one micro-batch, plain or (chunk_size true: the chunk size, or any true
    value for chunks cut by train.micro_batch_tokens) through GradCache; returns (loss, stats).

    `accumulation`: the rank's queries in the optimizer step over this micro-batch's, the divisor of
    its loss (with equal micro-batches the accumulation steps; with a token budget S / q for a
    micro-step of q of the rank's S queries, so the step's gradient is the whole share's mean, as
    one large batch's). The loss is divided here (scale_wrt_gas=False), never by DeepSpeed's
    gradient_accumulation_steps. `boundary`: see grad_cache.set_boundary. `loss_fn`: as in
    contrastive_loss (under GradCache it runs once on the cached embeddings of the whole
    micro-batch). The caller calls engine.step() after it, as after engine.backward."""
    loss_fn = loss_fn or embeddings_loss
    if chunk_size:
        return grad_cache_backward(
            engine,
            encoder_parts(batch),
            lambda part: encode_part(engine, part, engine.device),
            lambda queries_QD, passages_PD: loss_fn(
                queries_QD, passages_PD, batch, loss_config, engine.device, group, uniform=True
            ),
            accumulation,
            boundary,
        )
    set_boundary(engine, boundary)
    loss, stats = contrastive_loss(engine, batch, loss_config, engine.device, group, uniform=True, loss_fn=loss_fn)
    engine.backward(loss / accumulation, scale_wrt_gas=False)
    return loss, stats


def reranker_logits(model, part, device):
    """(Q, G) pair logits of one encoder call of a reranker batch (PairCollator), G = group size."""
    return model(encoder_inputs(part, device))


def reranker_loss(model, batch, device):
    """A reranker micro-batch's loss and stats with a DeepSpeed engine or a plain PairScorer."""
    logits = torch.cat([reranker_logits(model, part, device) for part in encoder_parts(batch)])
    return pair_cross_entropy(logits.view(-1, batch["group_size"]), batch, reranker_mask(batch, device))


def pair_cross_entropy(logits_QG, batch, masked_QG=None):
    """The reranker loss of (Q, G) pair logits: over each query's group, its in-batch negatives
    included when the batch has them (loss.negatives=local: losses.inbatch_cross_entropy)."""
    inbatch = batch.get("inbatch_negatives", 0)
    if inbatch:
        return inbatch_cross_entropy(logits_QG, inbatch, masked_QG)
    return group_cross_entropy(logits_QG, masked_QG)


def reranker_mask(batch, device):
    """(Q, G) bool: the reranker batch's negatives that are one of their query's known positives (a
    pair identical to the positive's, or a sibling positive's, must not be scored down); None for
    a batch without hashes."""
    if "passage_hash" not in batch:
        return None
    hashes = (batch[key].to(device, non_blocking=True) for key in ("positive_hash", "passage_hash"))
    return group_positive_mask(*hashes)


def reranker_backward(engine, batch, accumulation, boundary=None):
    """engine.backward for one reranker micro-batch; returns (loss, stats). Each query's loss needs
    only its own pairs (with loss.negatives=local its in-batch negatives are pairs of its own group,
    drawn by the collator for the whole micro-batch before it is chunked), so a micro-batch cut into
    chunks (train.grad_cache_chunk_size) is exact without any cache: each chunk is one DeepSpeed
    micro-step whose loss is weighted by its share of the micro-batch's queries (the DeepSpeed config
    counts accumulation x chunks micro-steps, as for GradCache). For the same reason token-budget
    micro-steps (train.micro_batch_tokens) are exact (under local each micro-step is its own in-batch
    pool): `accumulation` is the divisor of micro_batch_backward (the rank's queries over this
    micro-batch's) and `boundary` as there. The caller calls engine.step() after it."""
    parts = encoder_parts(batch)
    if len(parts) == 1:
        set_boundary(engine, boundary)
        loss, stats = reranker_loss(engine, batch, engine.device)
        engine.backward(loss / accumulation, scale_wrt_gas=False)
        return loss.detach(), stats
    group, total = batch["group_size"], sum(part["num_pairs"] for part in parts)
    masked_QG, first = reranker_mask(batch, engine.device), 0
    loss_sum, stats_sum = 0.0, {}
    for index, part in enumerate(parts):
        set_boundary(engine, None if boundary is None else boundary and index == len(parts) - 1)
        queries = part["num_pairs"] // group  # chunks hold whole queries, in order
        chunk_mask = None if masked_QG is None else masked_QG[first : first + queries]
        first += queries
        logits_QG = reranker_logits(engine, part, engine.device).view(-1, group)
        loss, stats = pair_cross_entropy(logits_QG, batch, chunk_mask)
        pair_fraction = part["num_pairs"] / total  # the chunk's fraction of the micro-batch's pairs
        engine.backward(loss * pair_fraction / accumulation, scale_wrt_gas=False)
        if index < len(parts) - 1:
            engine.step()  # a DeepSpeed micro-step inside the accumulation window: no update
        loss_sum = loss_sum + loss.detach() * pair_fraction
        for key, value in stats.items():
            stats_sum[key] = stats_sum.get(key, 0.0) + value * pair_fraction
    return loss_sum, stats_sum


def negatives_loss(
    queries_QD, passages_PD, positive_hash_QK, passage_hash_P, loss_config, group=None, uniform=False, pool=None
):
    """InfoNCE of this rank's queries against the pool that `loss_config.negatives` names; with
    loss.matryoshka_dims, the weighted sum over the embeddings truncated to each dim and
    re-normalised (Kusupati et al., 2022). The pool is assembled (and gathered) once for all dims.

    `global` pools the passages (and with `loss.query_negatives` the queries) of every rank of
    `group` (default: the world), gathered with gradient. Each rank's loss is its mean weighted by
    assemble_pool's rank_weight, so that DeepSpeed's average over ranks is the mean over all pooled
    queries even when ranks hold different numbers of queries. `pool`: assemble_pool's result when
    the caller has it.
    """
    tau = loss_config.temperature
    stats = group_accuracy(queries_QD, passages_PD)
    if loss_config.negatives == "group":
        masked_QG = group_positive_mask(positive_hash_QK, passage_hash_P)  # as assemble_pool's mask

        def info_nce_at_dim(d):
            return group_info_nce(truncate_to(queries_QD, d), truncate_to(passages_PD, d), tau, masked_QG)[0]
    else:
        pool_ND, targets_Q, masked_QN, rank_weight = pool or assemble_pool(
            queries_QD, passages_PD, positive_hash_QK, passage_hash_P, loss_config, group, uniform
        )

        def info_nce_at_dim(d):
            queries, candidates = truncate_to(queries_QD, d), truncate_to(pool_ND, d)
            return rank_weight * pooled_info_nce(queries, candidates, targets_Q, tau, masked_QN)[0]

        stats["masked_fraction"] = masked_QN.float().mean()
        stats["negatives_per_query"] = (~masked_QN).float().sum(-1).mean() - 1.0
    loss, losses = matryoshka(info_nce_at_dim, loss_config.matryoshka_dims, loss_config.matryoshka_weights)
    if loss_config.matryoshka_dims:
        stats.update({f"loss_dim_{d}": term.detach() for d, term in zip(loss_config.matryoshka_dims, losses)})
    return loss, stats


def truncate_to(embeddings, dim):
    return embeddings if dim is None else truncate(embeddings, dim)


def assemble_pool(queries_QD, passages_PD, positive_hash_QK, passage_hash_P, loss_config, group=None, uniform=False):
    """(pool_ND, targets_Q, masked_QN, rank_weight) for the `local` or `global` pool. masked_QN drops
    every known positive of a query (positive_hash_QK: its K known positives' content hashes) from
    its negatives, wherever in the pool (any rank) it sits, except its target. rank_weight: this
    rank's queries over the mean per rank of the pool (1 for `local`), the factor on this rank's mean
    loss that makes DeepSpeed's average over ranks the mean over all pooled queries."""
    num_queries, per_query = queries_QD.shape[0], passages_PD.shape[0] // queries_QD.shape[0]
    rank_weight = 1.0
    query_pool_MD, query_offset = queries_QD, 0
    if loss_config.negatives == "global":
        pool_ND, offset = distributed.gather_with_grad(passages_PD, group, uniform)
        pool_hash_N = distributed.gather_no_grad(passage_hash_P, group, uniform)
        total_queries = pool_ND.shape[0] // per_query
        rank_weight = num_queries * distributed.world_size(group) / total_queries
        if loss_config.query_negatives:
            query_pool_MD, query_offset = distributed.gather_with_grad(queries_QD, group, uniform)
    else:
        pool_ND, offset, pool_hash_N = passages_PD, 0, passage_hash_P
    targets_Q = positive_targets(num_queries, per_query, offset, queries_QD.device)
    masked_QN = duplicate_positive_mask(positive_hash_QK, pool_hash_N, targets_Q)
    if loss_config.query_negatives:
        # other queries join the pool; a query never counts itself as a negative
        self_QM = torch.zeros(num_queries, query_pool_MD.shape[0], dtype=torch.bool, device=queries_QD.device)
        self_QM[torch.arange(num_queries), query_offset + torch.arange(num_queries)] = True
        pool_ND = torch.cat([pool_ND, query_pool_MD])
        masked_QN = torch.cat([masked_QN, self_QM], dim=1)
    return pool_ND, targets_Q, masked_QN, rank_weight


def distill_loss(queries_QX, passages_PX, batch, loss_config, device, group=None, uniform=False):
    """Embedding distillation from the teacher's cached embeddings (batch teacher_query (Q, T) and
    teacher_passage (Q*G, T)); the embeddings are the student's training output [D dims | T projected].

        loss = contrastive x InfoNCE(student)                      (the run's pool and Matryoshka dims)
             + cosine x mean(1 - cos(projected, teacher))          (queries and passages)
             + mse x mean((projected - teacher)^2)
             + kl x KL(teacher || student) over the pool's scores at kl_temperature

    The KL's candidates are the contrastive pool's (group: each query's own passages; local/global:
    the pool with its masks); under `global` the student's pool is gathered with gradient and the
    teacher's without, and the KL, like InfoNCE, is this rank's share of the mean over all pooled
    queries. With Matryoshka dims the student's InfoNCE and KL are summed over its truncations with
    their weights; the projection reads the full embedding.
    """
    weights = loss_config.distill
    teacher_QT = batch["teacher_query"].to(device, non_blocking=True)
    teacher_PT = batch["teacher_passage"].to(device, non_blocking=True)
    student_dim = queries_QX.shape[-1] - teacher_QT.shape[-1]
    queries_QD, projected_QT = split_projected(queries_QX, student_dim)
    passages_PD, projected_PT = split_projected(passages_PX, student_dim)
    positive_hash_QK, passage_hash_P = batch["positive_hash"].to(device), batch["passage_hash"].to(device)

    pool = None  # the student's pool, gathered once for InfoNCE and the KL
    if loss_config.negatives != "group" and (weights["contrastive"] or weights["kl"]):
        pool = assemble_pool(queries_QD, passages_PD, positive_hash_QK, passage_hash_P, loss_config, group, uniform)
    total = 0.0
    if weights["contrastive"]:
        contrastive, stats = negatives_loss(
            queries_QD, passages_PD, positive_hash_QK, passage_hash_P, loss_config, group, uniform, pool
        )
        total = total + weights["contrastive"] * contrastive
        stats["loss_contrastive"] = contrastive.detach()
    else:
        stats = group_accuracy(queries_QD, passages_PD)
    cosine, mse = embedding_distance(torch.cat([projected_QT, projected_PT]), torch.cat([teacher_QT, teacher_PT]))
    total = total + weights["cosine"] * cosine + weights["mse"] * mse
    stats["distill_cosine"], stats["distill_mse"] = cosine.detach(), mse.detach()
    if weights["kl"]:
        masked_QG = group_positive_mask(positive_hash_QK, passage_hash_P) if pool is None else None
        kl = pool_kl(queries_QD, passages_PD, teacher_QT, teacher_PT, pool, loss_config, group, uniform, masked_QG)
        total = total + weights["kl"] * kl
        stats["distill_kl"] = kl.detach()
    return total, stats


def pool_kl(
    queries_QD, passages_PD, teacher_QT, teacher_PT, pool, loss_config, group=None, uniform=False, masked_QG=None
):
    """KL(teacher || student) over the contrastive pool's candidates (`pool`: assemble_pool's result;
    None under `group`, where masked_QG, group_positive_mask, drops the known positives), summed over
    the Matryoshka truncations of the student with their weights (the teacher's scores use its full
    embedding)."""
    tau = loss_config.distill["kl_temperature"]
    if pool is None:
        teacher_QG = group_scores(teacher_QT, teacher_PT, tau)

        def kl_at_dim(d):
            student_QG = group_scores(truncate_to(queries_QD, d), truncate_to(passages_PD, d), tau)
            return score_kl(student_QG, teacher_QG, masked_QG)
    else:
        pool_ND, _, masked_QN, rank_weight = pool
        teacher_QN = scores(teacher_QT, teacher_pool(teacher_QT, teacher_PT, loss_config, group, uniform), tau)

        def kl_at_dim(d):
            student_QN = scores(truncate_to(queries_QD, d), truncate_to(pool_ND, d), tau)
            return rank_weight * score_kl(student_QN, teacher_QN, masked_QN)

    return matryoshka(kl_at_dim, loss_config.matryoshka_dims, loss_config.matryoshka_weights)[0]


def teacher_pool(teacher_QT, teacher_PT, loss_config, group=None, uniform=False):
    """The teacher's embeddings laid out as assemble_pool lays out the student's (passages of every
    rank under `global`, then the queries with loss.query_negatives), gathered without gradient."""
    if loss_config.negatives == "global":
        pool_NT = distributed.gather_no_grad(teacher_PT, group, uniform)
        queries_MT = distributed.gather_no_grad(teacher_QT, group, uniform) if loss_config.query_negatives else None
    else:
        pool_NT, queries_MT = teacher_PT, teacher_QT if loss_config.query_negatives else None
    return pool_NT if queries_MT is None else torch.cat([pool_NT, queries_MT])
