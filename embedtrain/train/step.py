"""One micro-batch: encode queries and passages, then InfoNCE over the configured negative pool.

The pure losses live in embedtrain.losses; this module assembles the pool, which for `global`
means gathering across ranks with gradient (embedtrain.distributed). `grad_cache_backward` is the
same step for micro-batches far larger than activation memory allows (GradCache)."""

import torch

from embedtrain import distributed
from embedtrain.data.collate import encoder_parts
from embedtrain.losses import (
    duplicate_positive_mask,
    embedding_distance,
    group_accuracy,
    group_cross_entropy,
    group_info_nce,
    group_scores,
    pooled_info_nce,
    positive_targets,
    score_kl,
    scores,
)
from embedtrain.model.distill import split_projected
from embedtrain.model.pooling import truncate

ENCODER_KEYS = ("input_ids", "attention_mask", "sequence_index", "sequence_mask")


def encode_part(encoder, part, device):
    """(queries_QD, passages_PD) of one encoder call: queries and passages in ONE forward (under
    ZeRO-3 one gather of each layer's weights, and one recompute under checkpointing)."""
    inputs = {key: part[key].to(device, non_blocking=True) for key in ENCODER_KEYS if key in part}
    embeddings_SD = encoder(**inputs)
    return embeddings_SD[: part["num_queries"]], embeddings_SD[part["num_queries"] :]


def encode_micro_batch(encoder, batch, device):
    """(queries_QD, passages_PD) of a micro-batch, chunk by chunk when it is cut for GradCache."""
    parts = [encode_part(encoder, part, device) for part in encoder_parts(batch)]
    if len(parts) == 1:
        return parts[0]
    return torch.cat([q for q, _ in parts]), torch.cat([p for _, p in parts])


def contrastive_loss(encoder, batch, loss_config, device, group=None, uniform=False):
    """Encode one micro-batch with a DeepSpeed engine or a plain BiEncoder; return (loss, stats).
    `uniform`: every rank's micro-batch has this one's size (the training loop's always do)."""
    queries_QD, passages_PD = encode_micro_batch(encoder, batch, device)
    return embeddings_loss(queries_QD, passages_PD, batch, loss_config, device, group, uniform)


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


def micro_batch_backward(engine, batch, loss_config, accumulation, chunk_size=0, group=None):
    """engine.backward for one micro-batch, plain or (chunk_size > 0) through GradCache; returns
    (loss, stats). The caller calls engine.step() after it, as after engine.backward."""
    if chunk_size:
        return grad_cache_backward(engine, batch, loss_config, accumulation, group)
    loss, stats = contrastive_loss(engine, batch, loss_config, engine.device, group, uniform=True)
    engine.backward(loss)
    return loss, stats


def grad_cache_backward(engine, batch, loss_config, accumulation, group=None):
    """GradCache (Gao et al., 2021): the gradient of the whole micro-batch's loss, with activation
    memory for only one chunk of queries (and their passages) at a time. The collator cut the
    micro-batch into chunks (train.grad_cache_chunk_size), each one encoder call.

    1. Encode every chunk without grad, saving the RNG state before each.
    2. The loss over all embeddings (the pool gathered across ranks as usual), and its gradient
       with respect to this rank's embeddings: a plain autograd pass, which runs the gather's
       backward (an all-reduce) on every rank, no parameter gradients.
    3. Re-encode chunk by chunk with grad, RNG replayed, and backpropagate the cached embedding
       gradients: engine.backward(sum(embeddings * cached_grad)).

    DeepSpeed sees each chunk as one micro-step: the run's DeepSpeed config has
    gradient_accumulation_steps = accumulation x chunks (config.deepspeed_micro_steps), and
    engine.step() follows every chunk but the last, so ZeRO-2/3 reduce gradients each chunk and
    step the optimizer only at the accumulation boundary. No `no_sync` is needed. Gradients are
    scaled by 1/accumulation here (scale_wrt_gas=False), as the plain step's engine.backward does.
    The caller calls engine.step() after the last chunk. Returns (loss, stats) like
    contrastive_loss; stats["grad_cache_replay_error"] is the largest difference between an
    embedding re-encoded with grad and its cached value (0 unless the forward is not
    deterministic given the RNG state).
    """
    device = engine.device
    parts = encoder_parts(batch)
    rng_states, cached = [], []
    with torch.no_grad():
        for part in parts:
            rng_states.append(RngState(device))
            cached.append(encode_part(engine, part, device))
    queries_QD = torch.cat([q for q, _ in cached]).requires_grad_()
    passages_PD = torch.cat([p for _, p in cached]).requires_grad_()
    loss, stats = embeddings_loss(queries_QD, passages_PD, batch, loss_config, device, group, uniform=True)
    query_grad_QD, passage_grad_PD = torch.autograd.grad(loss, [queries_QD, passages_PD])

    replay_error = torch.zeros((), device=device)
    after = RngState(device)
    query_start = passage_start = 0
    for index, (part, rng, (cached_q, cached_p)) in enumerate(zip(parts, rng_states, cached)):
        rng.restore()
        query_emb, passage_emb = encode_part(engine, part, device)
        queries = slice(query_start, query_start + cached_q.shape[0])
        passages = slice(passage_start, passage_start + cached_p.shape[0])
        query_start, passage_start = queries.stop, passages.stop
        surrogate = (query_emb * query_grad_QD[queries]).sum() + (passage_emb * passage_grad_PD[passages]).sum()
        engine.backward(surrogate / accumulation, scale_wrt_gas=False)
        if index < len(parts) - 1:
            engine.step()  # a DeepSpeed micro-step inside the accumulation window: no update
        replay_error = torch.maximum(
            replay_error,
            torch.maximum((query_emb.detach() - cached_q).abs().max(), (passage_emb.detach() - cached_p).abs().max()),
        )
    after.restore()
    stats["grad_cache_replay_error"] = replay_error
    return loss.detach(), stats


def reranker_logits(model, part, device):
    """(Q, G) pair logits of one encoder call of a reranker batch (PairCollator), G = group size."""
    inputs = {key: part[key].to(device, non_blocking=True) for key in ENCODER_KEYS if key in part}
    return model(**inputs)


def reranker_loss(model, batch, device):
    """A reranker micro-batch's loss and stats with a DeepSpeed engine or a plain Reranker."""
    logits = torch.cat([reranker_logits(model, part, device) for part in encoder_parts(batch)])
    return group_cross_entropy(logits.view(-1, batch["group_size"]))


def reranker_backward(engine, batch, accumulation):
    """engine.backward for one reranker micro-batch; returns (loss, stats). Each query's loss needs
    only its own pairs, so a micro-batch cut into chunks (train.grad_cache_chunk_size) is exact
    without any cache: each chunk is one DeepSpeed micro-step whose loss is weighted by its share
    of the micro-batch's queries (the DeepSpeed config counts accumulation x chunks micro-steps, as
    for GradCache). The caller calls engine.step() after it."""
    parts = encoder_parts(batch)
    if len(parts) == 1:
        loss, stats = reranker_loss(engine, batch, engine.device)
        engine.backward(loss)
        return loss.detach(), stats
    group, total = batch["group_size"], sum(part["num_pairs"] for part in parts)
    loss_sum, stats_sum = 0.0, {}
    for index, part in enumerate(parts):
        loss, stats = group_cross_entropy(reranker_logits(engine, part, engine.device).view(-1, group))
        share = part["num_pairs"] / total
        engine.backward(loss * share / accumulation, scale_wrt_gas=False)
        if index < len(parts) - 1:
            engine.step()  # a DeepSpeed micro-step inside the accumulation window: no update
        loss_sum = loss_sum + loss.detach() * share
        for key, value in stats.items():
            stats_sum[key] = stats_sum.get(key, 0.0) + value * share
    return loss_sum, stats_sum


class RngState:
    """The host (and current CUDA device) RNG state, to replay dropout in GradCache's second pass."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None

    def restore(self):
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def negatives_loss(
    queries_QD, passages_PD, positive_hash_QK, passage_hash_P, loss_config, group=None, uniform=False, pool=None
):
    """InfoNCE of this rank's queries against the pool that `loss_config.negatives` names; with
    loss.matryoshka_dims, the weighted sum over the embeddings truncated to each dim and
    re-normalised (Kusupati et al., 2022). The pool is assembled (and gathered) once for all dims.

    `global` pools the passages (and with `loss.query_negatives` the queries) of every rank of
    `group` (default: the world), gathered with gradient. Each rank's loss is its share of the
    mean over all pooled queries, so that DeepSpeed's average over ranks is that mean even when
    ranks hold different numbers of queries. `pool`: assemble_pool's result when the caller has it.
    """
    dims = loss_config.matryoshka_dims or [None]
    weights = loss_config.matryoshka_weights or [1.0] * len(dims)
    stats = group_accuracy(queries_QD, passages_PD)
    if loss_config.negatives == "group":
        losses = [
            group_info_nce(truncate_to(queries_QD, d), truncate_to(passages_PD, d), loss_config.temperature)[0]
            for d in dims
        ]
    else:
        pool_ND, targets_Q, masked_QN, share = pool or assemble_pool(
            queries_QD, passages_PD, positive_hash_QK, passage_hash_P, loss_config, group, uniform
        )
        losses = [
            share
            * pooled_info_nce(
                truncate_to(queries_QD, d), truncate_to(pool_ND, d), targets_Q, loss_config.temperature, masked_QN
            )[0]
            for d in dims
        ]
        stats["masked_fraction"] = masked_QN.float().mean()
        stats["negatives_per_query"] = (~masked_QN).float().sum(-1).mean() - 1.0
    if loss_config.matryoshka_dims:
        stats.update({f"loss_dim_{d}": loss.detach() for d, loss in zip(dims, losses)})
    return sum(w * loss for w, loss in zip(weights, losses)), stats


def truncate_to(embeddings, dim):
    return embeddings if dim is None else truncate(embeddings, dim)


def assemble_pool(queries_QD, passages_PD, positive_hash_QK, passage_hash_P, loss_config, group=None, uniform=False):
    """(pool_ND, targets_Q, masked_QN, share) for the `local` or `global` pool. masked_QN drops
    every known positive of a query (positive_hash_QK: its K known positives' content hashes) from
    its negatives, wherever in the pool (any rank) it sits, except its target."""
    num_queries, per_query = queries_QD.shape[0], passages_PD.shape[0] // queries_QD.shape[0]
    share = 1.0
    query_pool_MD, query_offset = queries_QD, 0
    if loss_config.negatives == "global":
        pool_ND, offset = distributed.gather_with_grad(passages_PD, group, uniform)
        pool_hash_N = distributed.gather_no_grad(passage_hash_P, group, uniform)
        total_queries = pool_ND.shape[0] // per_query
        share = num_queries * distributed.world_size(group) / total_queries
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
    return pool_ND, targets_Q, masked_QN, share


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
        kl = pool_kl(queries_QD, passages_PD, teacher_QT, teacher_PT, pool, loss_config, group, uniform)
        total = total + weights["kl"] * kl
        stats["distill_kl"] = kl.detach()
    return total, stats


def pool_kl(queries_QD, passages_PD, teacher_QT, teacher_PT, pool, loss_config, group=None, uniform=False):
    """KL(teacher || student) over the contrastive pool's candidates (`pool`: assemble_pool's result;
    None under `group`), summed over the Matryoshka truncations of the student with their weights
    (the teacher's scores use its full embedding)."""
    tau = loss_config.distill["kl_temperature"]
    dims = loss_config.matryoshka_dims or [None]
    weights = loss_config.matryoshka_weights or [1.0] * len(dims)
    if pool is None:
        teacher_QG = group_scores(teacher_QT, teacher_PT, tau)
        terms = [
            score_kl(group_scores(truncate_to(queries_QD, d), truncate_to(passages_PD, d), tau), teacher_QG)
            for d in dims
        ]
    else:
        pool_ND, _, masked_QN, share = pool
        teacher_QN = scores(teacher_QT, teacher_pool(teacher_QT, teacher_PT, loss_config, group, uniform), tau)
        terms = [
            share * score_kl(scores(truncate_to(queries_QD, d), truncate_to(pool_ND, d), tau), teacher_QN, masked_QN)
            for d in dims
        ]
    return sum(w * term for w, term in zip(weights, terms))


def teacher_pool(teacher_QT, teacher_PT, loss_config, group=None, uniform=False):
    """The teacher's embeddings laid out as assemble_pool lays out the student's (passages of every
    rank under `global`, then the queries with loss.query_negatives), gathered without gradient."""
    if loss_config.negatives == "global":
        pool_NT = distributed.gather_no_grad(teacher_PT, group, uniform)
        queries_MT = distributed.gather_no_grad(teacher_QT, group, uniform) if loss_config.query_negatives else None
    else:
        pool_NT, queries_MT = teacher_PT, teacher_QT if loss_config.query_negatives else None
    return pool_NT if queries_MT is None else torch.cat([pool_NT, queries_MT])
