"""One micro-batch: encode queries and passages, then InfoNCE over the configured negative pool.

The pure losses live in embedtrain.losses; this module assembles the pool, which for `global`
means gathering across ranks with gradient (embedtrain.distributed). `grad_cache_backward` is the
same step for micro-batches far larger than activation memory allows (GradCache)."""

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


def micro_batch_backward(engine, batch, loss_config, accumulation, chunk_size=0, group=None):
    """engine.backward for one micro-batch, plain or (chunk_size > 0) through GradCache; returns
    (loss, stats). The caller calls engine.step() after it, as after engine.backward."""
    if chunk_size:
        return grad_cache_backward(engine, batch, loss_config, chunk_size, accumulation, group)
    loss, stats = contrastive_loss(engine, batch, loss_config, engine.device, group)
    engine.backward(loss)
    return loss, stats


def grad_cache_backward(engine, batch, loss_config, chunk_size, accumulation, group=None):
    """GradCache (Gao et al., 2021): the gradient of the whole micro-batch's loss, with activation
    memory for only `chunk_size` queries (and their passages) at a time.

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
    num_queries = batch["query_ids"].shape[0]
    per_query = batch["passage_ids"].shape[0] // num_queries
    if num_queries % chunk_size:
        raise ValueError(f"micro-batch of {num_queries} queries is not divisible by GradCache chunks of {chunk_size}")
    chunks = [(slice(start, start + chunk_size), slice(start * per_query, (start + chunk_size) * per_query))
              for start in range(0, num_queries, chunk_size)]

    def encode(queries, passages):
        return (engine(batch["query_ids"][queries].to(device), batch["query_mask"][queries].to(device)),
                engine(batch["passage_ids"][passages].to(device), batch["passage_mask"][passages].to(device)))

    rng_states, cached = [], []
    with torch.no_grad():
        for queries, passages in chunks:
            rng_states.append(RngState(device))
            cached.append(encode(queries, passages))
    queries_QD = torch.cat([q for q, _ in cached]).requires_grad_()
    passages_PD = torch.cat([p for _, p in cached]).requires_grad_()
    loss, stats = negatives_loss(queries_QD, passages_PD, batch["positive_hash"].to(device),
                                 batch["passage_hash"].to(device), loss_config, group)
    query_grad_QD, passage_grad_PD = torch.autograd.grad(loss, [queries_QD, passages_PD])

    replay_error = torch.zeros((), device=device)
    after = RngState(device)
    for index, ((queries, passages), rng) in enumerate(zip(chunks, rng_states)):
        rng.restore()
        query_emb, passage_emb = encode(queries, passages)
        surrogate = (query_emb * query_grad_QD[queries]).sum() + (passage_emb * passage_grad_PD[passages]).sum()
        engine.backward(surrogate / accumulation, scale_wrt_gas=False)
        if index < len(chunks) - 1:
            engine.step()  # a DeepSpeed micro-step inside the accumulation window: no update
        replay_error = torch.maximum(replay_error, torch.maximum(
            (query_emb.detach() - queries_QD.detach()[queries]).abs().max(),
            (passage_emb.detach() - passages_PD.detach()[passages]).abs().max()))
    after.restore()
    stats["grad_cache_replay_error"] = replay_error
    return loss.detach(), stats


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
