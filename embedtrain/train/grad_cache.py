"""GradCache (Gao et al., 2021): a contrastive micro-batch far larger than activation memory
allows, encoded chunk by chunk twice (without grad, then with grad and the RNG replayed) around one
loss over all its embeddings. Independent of the loss: embedtrain.train.step passes its encoder
call and its loss."""

import torch


def set_boundary(engine, boundary):
    """Tell DeepSpeed whether the coming backward ends the optimizer step (None: leave it to
    DeepSpeed's micro-step counter, which assumes a fixed gradient_accumulation_steps).

    With train.micro_batch_tokens the number of micro-steps changes from step to step, so the
    training loop sets the boundary of every DeepSpeed micro-step explicitly
    (DeepSpeedEngine.set_gradient_accumulation_boundary, deepspeed/runtime/engine.py): ZeRO-1/2/3
    then reduce or accumulate gradients as for a non-final micro-step, and engine.step() updates
    the optimizer (clipping the whole step's gradient) only after the backward marked True."""
    if boundary is not None:
        engine.set_gradient_accumulation_boundary(boundary)


def grad_cache_backward(engine, parts, encode, embeddings_loss, accumulation, boundary=None):
    """GradCache (Gao et al., 2021): the gradient of the whole micro-batch's loss, with activation
    memory for only one chunk of queries (and their passages) at a time. The collator cut the
    micro-batch into chunks (train.grad_cache_chunk_size, `parts`); `encode(part)` is one encoder call
    -> (queries_QD, passages_PD) and `embeddings_loss(queries_QD, passages_PD)` the micro-batch's
    (loss, stats) from all its embeddings (embedtrain.train.step assembles both).

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
    `boundary` (see set_boundary): the chunks before the last are never the boundary, the last is
    `boundary`. The caller calls engine.step() after the last chunk. Returns (loss, stats) like
    step.contrastive_loss; stats["grad_cache_replay_error"] is the largest difference between an
    embedding re-encoded with grad and its cached value (0 unless the forward is not
    deterministic given the RNG state).
    """
    device = engine.device
    set_boundary(engine, None if boundary is None else False)
    rng_states, cached = [], []
    with torch.no_grad():
        for part in parts:
            rng_states.append(RngState(device))
            cached.append(encode(part))
    queries_QD = torch.cat([q for q, _ in cached]).requires_grad_()
    passages_PD = torch.cat([p for _, p in cached]).requires_grad_()
    loss, stats = embeddings_loss(queries_QD, passages_PD)
    query_grad_QD, passage_grad_PD = torch.autograd.grad(loss, [queries_QD, passages_PD])

    replay_error = torch.zeros((), device=device)
    after = RngState(device)
    query_start = passage_start = 0
    for index, (part, rng, (cached_q, cached_p)) in enumerate(zip(parts, rng_states, cached)):
        rng.restore()
        set_boundary(engine, None if boundary is None else boundary and index == len(parts) - 1)
        query_emb, passage_emb = encode(part)
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
