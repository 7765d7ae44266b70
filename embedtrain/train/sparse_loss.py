"""The loss of a sparse (SPLADE) model: InfoNCE over dot products of term-weight vectors, over the
configured negative pool, plus the FLOPS regularisation of queries and documents.

The vectors are embeddings that are not normalised, so the ranking term is train/step.py's
negatives_loss as it is (its scores are dot products / loss.temperature; SPLADE scores with the
plain dot product: loss.temperature 1). The FLOPS terms (losses.flops_regularizer) are computed over
the same batch as the negatives pool, the *contrastive batch*:

- `group` and `local`: the rank's micro-batch (SPLADE computes FLOPS per training batch);
- `global`: the micro-batch of every rank of the gather group, from the vectors gathered with
  gradient (the passages are the pool's own rows; the queries are gathered here). Each rank adds
  the same value; DeepSpeed's average over ranks keeps it once, and the gather's backward (a sum
  over ranks) gives every rank the gradient of its own rows. So 2 ranks equal 1 rank holding both
  micro-batches, the same rule as for the InfoNCE pool (tests/test_sparse_training.py).

Under GradCache the loss runs once on the cached vectors of the whole micro-batch, so the FLOPS
term is the micro-batch's, exactly as without GradCache.
"""

from functools import partial

from embedtrain import distributed
from embedtrain.losses import flops_regularizer, flops_warmup, nonzero_terms
from embedtrain.train.step import assemble_pool, negatives_loss


def flops_weights(settings, step):
    """(query weight, document weight) of the FLOPS terms at optimizer step `step` (1-based), from
    model.sparse's resolved settings: each final weight under SPLADE's quadratic warm-up."""
    warmup = settings["flops_warmup_steps"]
    return (
        flops_warmup(settings["flops_query_weight"], step, warmup),
        flops_warmup(settings["flops_document_weight"], step, warmup),
    )


def sparse_loss(
    queries_QV,
    passages_PV,
    batch,
    loss_config,
    device,
    group=None,
    uniform=False,
    query_weight=0.0,
    document_weight=0.0,
):
    """(loss, stats) of one micro-batch from its term weights: queries_QV (Q, V), passages_PV (Q*G, V)
    grouped per query, positive first. loss = InfoNCE (the pool of loss.negatives) + query_weight x
    FLOPS(queries) + document_weight x FLOPS(documents), the FLOPS over the contrastive batch (see
    the module docstring). stats: the ranking loss, both FLOPS values (unweighted) and their
    weighted sum (flops_loss), and the mean number of non-zero terms per query and per document on
    this rank."""
    positive_hash_QK, passage_hash_P = batch["positive_hash"].to(device), batch["passage_hash"].to(device)
    pool = None
    if loss_config.negatives != "group":
        pool = assemble_pool(queries_QV, passages_PV, positive_hash_QK, passage_hash_P, loss_config, group, uniform)
    ranking, stats = negatives_loss(
        queries_QV, passages_PV, positive_hash_QK, passage_hash_P, loss_config, group, uniform, pool
    )
    queries_MV, documents_NV = flops_batch(queries_QV, passages_PV, pool, loss_config, group, uniform)
    flops_query, flops_document = flops_regularizer(queries_MV), flops_regularizer(documents_NV)
    flops = query_weight * flops_query + document_weight * flops_document
    stats.update(
        loss_ranking=ranking.detach(),
        flops_query=flops_query.detach(),
        flops_document=flops_document.detach(),
        flops_loss=flops.detach(),
        nonzero_query=nonzero_terms(queries_QV),
        nonzero_document=nonzero_terms(passages_PV),
    )
    return ranking + flops, stats


def flops_batch(queries_QV, passages_PV, pool, loss_config, group=None, uniform=False):
    """(queries, documents) the FLOPS terms are computed over: the rank's own under group/local, every
    rank's under global. The gathered documents are the pool's first rows (assemble_pool: the
    gathered passages, then with loss.query_negatives the gathered queries, which are then reused)."""
    if loss_config.negatives != "global":
        return queries_QV, passages_PV
    pool_NV = pool[0]
    if not loss_config.query_negatives:
        return distributed.gather_with_grad(queries_QV, group, uniform)[0], pool_NV
    per_query = passages_PV.shape[0] // queries_QV.shape[0]
    documents = pool_NV.shape[0] * per_query // (per_query + 1)  # the pool holds M*G passages + M queries
    return pool_NV[documents:], pool_NV[:documents]


def sparse_loss_at(settings, step):
    """sparse_loss with the FLOPS weights of optimizer step `step` (1-based), in the signature of
    train/step.py's embeddings_loss (what micro_batch_backward calls)."""
    query_weight, document_weight = flops_weights(settings, step)
    return partial(sparse_loss, query_weight=query_weight, document_weight=document_weight)
