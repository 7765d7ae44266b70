"""Contrastive losses as pure functions of embeddings. No distributed code here: the caller hands
in the passage pool (its own passages, or every rank's, gathered with gradient).

Shapes: Q queries, G = 1 + k passages per query (positive first, then k hard negatives),
P = Q * G local passages, N passages in the pool, D embedding dims.
"""

import torch
import torch.nn.functional as F

NEGATIVE_POOLS = ("group", "local", "global")


def scores(queries_QD, passages_ND, temperature):
    """cos(q, p) / tau in fp32. Inputs are unit vectors; bf16 here would quantise logits at tau 0.02."""
    return queries_QD.float() @ passages_ND.float().T / temperature


def group_info_nce(queries_QD, passages_PD, temperature, masked_QG=None):
    """InfoNCE over each query's own group only (the llama-embed-nemotron-8b recipe, arXiv 2511.07025):

        loss_i = -log( exp(s(q_i, p_i0)) / sum_{j not masked} exp(s(q_i, p_ij)) ),  j over query i's G passages.

    queries_QD: (Q, D); passages_PD: (Q*G, D) grouped per query, positive first. masked_QG (bool)
    drops hard negatives that are one of the query's known positives (group_positive_mask).
    Returns (loss: mean over queries, logits_QG).
    """
    logits_QG = group_scores(queries_QD, passages_PD, temperature)
    if masked_QG is not None:
        logits_QG = logits_QG.masked_fill(masked_QG, float("-inf"))
    targets_Q = torch.zeros(logits_QG.shape[0], dtype=torch.long, device=logits_QG.device)
    return F.cross_entropy(logits_QG, targets_Q), logits_QG


def pooled_info_nce(queries_QD, pool_ND, targets_Q, temperature, masked_QN=None):
    """InfoNCE of each query against a shared pool of passages (in-batch negatives):

        loss_i = -log( exp(s(q_i, p_t(i))) / sum_{n not masked} exp(s(q_i, p_n)) ),

    where t(i) = targets_Q[i] is the index of query i's positive in the pool. The pool holds every
    query's own positive and hard negatives, so the group terms are included. masked_QN (bool) drops
    pool entries that must not count as negatives (the query's known positives other than the
    target: duplicate_positive_mask).
    Returns (loss: mean over the Q queries, logits_QN).
    """
    logits_QN = scores(queries_QD, pool_ND, temperature)
    if masked_QN is not None:
        logits_QN = logits_QN.masked_fill(masked_QN, float("-inf"))
    return F.cross_entropy(logits_QN, targets_Q), logits_QN


def positive_targets(num_queries, passages_per_query, pool_offset=0, device=None):
    """Pool index of each query's positive: this rank's passages start at `pool_offset`."""
    return pool_offset + torch.arange(num_queries, device=device) * passages_per_query


def duplicate_positive_mask(positive_hash_QK, pool_hash_N, targets_Q):
    """True where a pool passage is one of the query's known positives but is not its target.

    positive_hash_QK: (Q, K) content hashes (embedtrain.data.nemotron.content_hash, of the text) of
    each query's K known positives, a row padded by repeating a hash; a (Q,) tensor is K = 1.
    pool_hash_N: (N,) hashes of the pool's passages; targets_Q: (Q,) pool index of each query's
    positive. Masked: copies of the positive (the same text under another id or in another corpus)
    and the query's other positives (siblings), wherever they sit in the pool; never the target.
    """
    if positive_hash_QK.dim() == 1:
        positive_hash_QK = positive_hash_QK[:, None]
    same_QN = torch.zeros(len(targets_Q), pool_hash_N.shape[0], dtype=torch.bool, device=pool_hash_N.device)
    for hash_Q in positive_hash_QK.T:  # K is small: Q x N memory, not Q x K x N
        same_QN |= hash_Q[:, None] == pool_hash_N[None, :]
    same_QN[torch.arange(len(targets_Q), device=targets_Q.device), targets_Q] = False
    return same_QN


def group_positive_mask(positive_hash_QK, passage_hash_P):
    """(Q, G) bool: True where a hard negative of a query's own group is one of its known positives.

    The `group` pool's duplicate_positive_mask: the same content hashes (positive_hash_QK: (Q, K) or
    (Q,), each query's known positives, target first; passage_hash_P: (Q*G,) grouped per query,
    positive first), compared within each query's group only. Mined negatives can hold a copy of
    the positive or one of its siblings; left in, InfoNCE pushes the query away from a passage it
    should match. Column 0 (the target) is never masked.
    """
    if positive_hash_QK.dim() == 1:
        positive_hash_QK = positive_hash_QK[:, None]
    hash_QG = passage_hash_P.view(positive_hash_QK.shape[0], -1)
    same_QG = (hash_QG[:, None, :] == positive_hash_QK[:, :, None]).any(dim=1)  # Q x K x G: K, G small
    same_QG[:, 0] = False
    return same_QG


def group_accuracy(queries_QD, passages_PD):
    """Fraction of queries whose positive outscores their own hard negatives (in-group accuracy@1),
    plus the mean positive and hardest-negative cosine."""
    with torch.no_grad():
        q = queries_QD.float()
        cos_QG = torch.einsum("qd,qgd->qg", q, passages_PD.float().view(q.shape[0], -1, q.shape[-1]))
        stats = {"accuracy": (cos_QG.argmax(dim=-1) == 0).float().mean(), "sim_positive": cos_QG[:, 0].mean()}
        if cos_QG.shape[1] > 1:
            stats["sim_hardest_negative"] = cos_QG[:, 1:].max(dim=-1).values.mean()
        stats["embedding_std"] = q.std(dim=0, correction=0).mean()
        return stats


def group_cross_entropy(logits_QG, masked_QG=None):
    """A reranker's loss: cross-entropy over each query's group of pair logits, the positive (column
    0) the target (NeMo AutoModel's cross-encoder recipe). masked_QG (bool, group_positive_mask)
    drops negatives that are one of the query's known positives, from the loss and the stats.
    Returns (loss: mean over queries, stats: accuracy = fraction of queries whose positive scores
    highest, and the mean positive margin over the best negative, over queries with a negative)."""
    logits_QG = logits_QG.float()
    if masked_QG is not None:
        logits_QG = logits_QG.masked_fill(masked_QG, float("-inf"))
    targets_Q = torch.zeros(logits_QG.shape[0], dtype=torch.long, device=logits_QG.device)
    loss = F.cross_entropy(logits_QG, targets_Q)
    with torch.no_grad():
        stats = {"accuracy": (logits_QG.argmax(dim=-1) == 0).float().mean()}
        if logits_QG.shape[1] > 1:
            best_negative_Q = logits_QG[:, 1:].max(dim=-1).values
            has_negative_Q = best_negative_Q.isfinite()  # no sync: 0 when every negative is masked
            margin_Q = torch.where(has_negative_Q, logits_QG[:, 0] - best_negative_Q, 0.0)
            stats["margin"] = margin_Q.sum() / has_negative_Q.sum().clamp(min=1)
    return loss, stats


def inbatch_cross_entropy(logits_QC, inbatch, masked_QC=None):
    """A reranker's loss with in-batch negatives (loss.negatives=local): the cross-entropy over each
    query's C = 1 + k + n pair logits, its positive (column 0), its k hard negatives, then the last
    `inbatch` = n columns that pair it with other queries' positives (data/collate.py PairCollator),
    the positive the target:

        loss_i = -log( exp(s(q_i, p_i)) / sum_{c not masked} exp(s(q_i, c)) ),  c over the k + n negatives and p_i

    as sentence-transformers' CrossEncoder MultipleNegativesRankingLoss scores an anchor against
    its positive, sampled in-batch negatives and hard negatives (it also squashes the logits with
    a sigmoid x 10 by default; here the logits are used as they are, as group_cross_entropy does).
    masked_QC (bool, group_positive_mask over every column) drops pairs whose passage is a known
    positive of the query. Returns (loss, stats): group_cross_entropy's over every column, plus
    accuracy_hard and accuracy_inbatch, the fraction of queries whose positive outscores every
    (unmasked) hard negative, and every in-batch negative: a reranker that learned a shortcut of the
    mined negatives (less word overlap means relevant) wins the first and loses the second."""
    loss, stats = group_cross_entropy(logits_QC, masked_QC)
    if inbatch:
        with torch.no_grad():
            logits_QC = logits_QC.float()
            if masked_QC is not None:
                logits_QC = logits_QC.masked_fill(masked_QC, float("-inf"))
            positive_Q1, hard_QH = logits_QC[:, :1], logits_QC[:, 1 : logits_QC.shape[1] - inbatch]
            stats["accuracy_hard"] = (positive_Q1 > hard_QH).all(dim=-1).float().mean()
            stats["accuracy_inbatch"] = (positive_Q1 > logits_QC[:, -inbatch:]).all(dim=-1).float().mean()
    return loss, stats


def embedding_distance(projected_ND, teacher_ND):
    """Distillation's embedding terms: (mean cosine distance 1 - cos(s, t), mean squared error per
    element) between the projected student embeddings and the teacher's, row by row, in fp32."""
    s, t = projected_ND.float(), teacher_ND.float()
    return (1.0 - F.cosine_similarity(s, t, dim=-1)).mean(), F.mse_loss(s, t)


def score_kl(student_logits_QN, teacher_logits_QN, masked_QN=None):
    """Mean over queries of KL(softmax(teacher row) || softmax(student row)): the student learns the
    teacher's distribution over the same candidates. Masked entries (not candidates of that query)
    drop out of both softmaxes."""
    student, teacher = student_logits_QN.float(), teacher_logits_QN.float()
    if masked_QN is not None:
        student = student.masked_fill(masked_QN, float("-inf"))
        teacher = teacher.masked_fill(masked_QN, float("-inf"))
    log_p_student, log_p_teacher = F.log_softmax(student, dim=-1), F.log_softmax(teacher, dim=-1)
    log_ratio = log_p_teacher - log_p_student
    if masked_QN is not None:
        log_ratio = log_ratio.masked_fill(masked_QN, 0.0)  # p_teacher is 0 there; keeps -inf - -inf out
    return (log_p_teacher.exp() * log_ratio).sum(-1).mean()


def group_scores(queries_QD, passages_PD, temperature):
    """(Q, G) scores of each query against its own group of passages, in fp32."""
    q = queries_QD.float()
    return torch.einsum("qd,qgd->qg", q, passages_PD.float().view(q.shape[0], -1, q.shape[-1])) / temperature


def matryoshka(loss_at_dim, dims=None, weights=None):
    """Matryoshka representation learning (Kusupati et al., 2022) around any embedding loss:
    (sum of weight x loss_at_dim(dim) over `dims`, [each dim's loss]). loss_at_dim(dim) is the loss
    with the embeddings truncated to their first `dim` dims and re-normalised (None: the full
    embedding, the only term without `dims`); weights default to 1 each."""
    dims = dims or [None]
    weights = weights or [1.0] * len(dims)
    losses = [loss_at_dim(dim) for dim in dims]
    return sum(weight * loss for weight, loss in zip(weights, losses)), losses


# --- sparse (SPLADE): term-weight vectors over the vocabulary --------------------------------------
#
# Shapes: B texts, V vocabulary terms (term weights >= 0, mostly 0).


def flops_regularizer(weights_BV):
    """The FLOPS regulariser (Paria et al., 2020, "Minimizing FLOPs to learn efficient sparse
    representations", arXiv 2004.05665), as SPLADE uses it (Formal et al., 2021, arXiv 2107.05720):

        FLOPS = sum over terms j of (mean over the batch's B texts of |w_ij|)^2,

    in fp32: a smooth stand-in for the expected number of multiplications of a dot product with
    an inverted index (the probability that term j is active in two texts, squared). Squaring the
    batch mean rather than summing |w| (an L1 penalty) pushes hardest on terms that many texts
    use, which make the longest posting lists."""
    return weights_BV.float().abs().mean(dim=0).square().sum()


def flops_warmup(weight, step, warmup_steps):
    """The FLOPS weight at optimizer step `step` (1-based: the first step is 1): SPLADE's quadratic
    warm-up, weight x min(1, (step / warmup_steps)^2) (arXiv 2107.05720, section 4: the weight
    grows quadratically until a given step, then stays constant), so that sparsity is enforced
    only after the ranking loss has shaped the representations. warmup_steps 0: no warm-up."""
    if warmup_steps <= 0:
        return float(weight)
    return float(weight) * min(1.0, (step / warmup_steps) ** 2)


def nonzero_terms(weights_BV):
    """The mean number of terms with a weight > 0 per text (a float tensor, no gradient)."""
    with torch.no_grad():
        return (weights_BV > 0).float().sum(dim=-1).mean()


# --- multi-vector (ColBERT late interaction): MaxSim scores of token embeddings ------------------
#
# Shapes: T query tokens, L document tokens per row (padded; the masks say which are scored).

MAXSIM_BLOCK_ELEMENTS = 2**26  # query-token x document-token similarities held at once (256 MiB fp32)


def maxsim_scores(q_QTD, q_mask_QT, d_PLD, d_mask_PL, max_elements=MAXSIM_BLOCK_ELEMENTS):
    """(Q, P) fp32 MaxSim (ColBERT, arXiv 2004.12832): for each query and document, the sum over the
    query's scored tokens of the best similarity (dot product of unit vectors) with any of the
    document's scored tokens. A document without a scored token scores 0.

    The Q x T x P x L similarities are computed `max_elements` at a time (blocks of documents), so
    the memory held, forward and, under autograd, backward (each block's graph keeps only its
    argmax indices), is bounded whatever the pool's size."""
    q, d = q_QTD.float(), d_PLD.float()
    num_q, num_t = q.shape[:2]
    num_p, num_l = d.shape[:2]
    block = max(1, max_elements // max(1, num_q * num_t * num_l))
    q_valid_QT = q_mask_QT.bool()
    blocks = []
    for start in range(0, num_p, block):
        d_block, mask_block = d[start : start + block], d_mask_PL[start : start + block].bool()
        sim_QTPL = torch.einsum("qtd,pld->qtpl", q, d_block)
        sim_QTPL = sim_QTPL.masked_fill(~mask_block[None, None], float("-inf"))
        best_QTP = sim_QTPL.max(dim=-1).values
        best_QTP = torch.where(q_valid_QT[:, :, None] & mask_block.any(-1)[None, None], best_QTP, 0.0)
        blocks.append(best_QTP.sum(dim=1))
    return torch.cat(blocks, dim=1) if blocks else q.new_zeros(num_q, 0)


def group_maxsim_scores(q_QTD, q_mask_QT, d_PLD, d_mask_PL):
    """(Q, G) fp32 MaxSim of each query against its own group of G = P / Q passages only (grouped per
    query, positive first): the `group` pool's scores, Q x G x T x L similarities."""
    q, num_q = q_QTD.float(), q_QTD.shape[0]
    d_QGLD = d_PLD.float().view(num_q, -1, *d_PLD.shape[1:])
    d_mask_QGL = d_mask_PL.bool().view(num_q, -1, d_PLD.shape[1])
    sim_QGTL = torch.einsum("qtd,qgld->qgtl", q, d_QGLD).masked_fill(~d_mask_QGL[:, :, None, :], float("-inf"))
    best_QGT = sim_QGTL.max(dim=-1).values
    valid_QGT = q_mask_QT.bool()[:, None, :] & d_mask_QGL.any(-1)[:, :, None]
    return torch.where(valid_QGT, best_QGT, 0.0).sum(dim=-1)


def logits_info_nce(logits_QN, targets_Q, masked_QN=None):
    """InfoNCE from precomputed fp32 logits (scores / temperature): cross-entropy with each query's
    target column, masked entries (known positives that are not the target) dropped. Returns
    (loss: mean over queries, logits_QN as used)."""
    if masked_QN is not None:
        logits_QN = logits_QN.masked_fill(masked_QN, float("-inf"))
    return F.cross_entropy(logits_QN, targets_Q), logits_QN


def maxsim_group_info_nce(q_QTD, q_mask_QT, d_PLD, d_mask_PL, temperature, masked_QG=None):
    """group_info_nce over MaxSim: each query against its own positive and hard negatives only.
    masked_QG as there (group_positive_mask). Returns (loss, logits_QG)."""
    logits_QG = group_maxsim_scores(q_QTD, q_mask_QT, d_PLD, d_mask_PL) / temperature
    targets_Q = torch.zeros(logits_QG.shape[0], dtype=torch.long, device=logits_QG.device)
    return logits_info_nce(logits_QG, targets_Q, masked_QG)


def maxsim_pooled_info_nce(q_QTD, q_mask_QT, pool_NLD, pool_mask_NL, targets_Q, temperature, masked_QN=None):
    """pooled_info_nce over MaxSim: each query against a shared pool of passages' token embeddings
    (`local`: the rank's own; `global`: every rank's, gathered with gradient), targets_Q and
    masked_QN as there (positive_targets, duplicate_positive_mask). Returns (loss, logits_QN)."""
    logits_QN = maxsim_scores(q_QTD, q_mask_QT, pool_NLD, pool_mask_NL) / temperature
    return logits_info_nce(logits_QN, targets_Q, masked_QN)


def maxsim_group_accuracy(q_QTD, q_mask_QT, d_PLD, d_mask_PL):
    """group_accuracy for MaxSim: the fraction of queries whose positive outscores their own hard
    negatives, the mean positive and hardest-negative MaxSim per scored query token (in [-1, 1])."""
    with torch.no_grad():
        scores_QG = group_maxsim_scores(q_QTD, q_mask_QT, d_PLD, d_mask_PL)
        per_token_QG = scores_QG / q_mask_QT.float().sum(-1, keepdim=True).clamp(min=1)
        stats = {"accuracy": (scores_QG.argmax(dim=-1) == 0).float().mean(), "sim_positive": per_token_QG[:, 0].mean()}
        if scores_QG.shape[1] > 1:
            stats["sim_hardest_negative"] = per_token_QG[:, 1:].max(dim=-1).values.mean()
        return stats
