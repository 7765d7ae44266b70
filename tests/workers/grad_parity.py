"""Gradient parity worker: W-rank DeepSpeed gradients vs a plain 1-process PyTorch step.

    torchrun --standalone --nproc_per_node 2 tests/workers/grad_parity.py --out r.json --negatives global
    python tests/workers/grad_parity.py --out r.json --reentrant      # 1 rank, reentrant checkpointing
    torchrun --standalone --nproc_per_node 2 tests/workers/grad_parity.py --out r.json --negatives global \
        --two-positives --step 1                                       # sibling positives, cycled
    torchrun --standalone --nproc_per_node 2 tests/workers/grad_parity.py --out r.json --negatives global \
        --distill                                                      # distillation: all four terms
    torchrun --standalone --nproc_per_node 2 tests/workers/grad_parity.py --out r.json --negatives global \
        --sparse                                                       # a sparse (SPLADE) model: InfoNCE + FLOPS
    torchrun --standalone --nproc_per_node 2 tests/workers/grad_parity.py --out r.json --negatives global \
        --multi-vector plain --grad-cache 1                            # ColBERT: MaxSim InfoNCE, GradCache
    torchrun --standalone --nproc_per_node 2 tests/workers/grad_parity.py --scenarios batch.json
                                          # several runs in one launch (tests/workers/scenario_batch.py)

Every rank runs DeepSpeed on its share of global batch `--step` (default 0) and reads the full
gradient of every parameter before the optimizer step; every rank also runs the plain reference on
the whole global batch (micro-batch W x B, no DeepSpeed, no checkpointing). Rank 0 writes the worst
relative error. With --two-positives the data is a small set whose queries have two positives each
(data.positive_sampling=cycle) and every query lists the other queries' positives as negatives, so
each query's sibling positive sits in other groups, on other ranks; the worker also reports how the
pooled loss masked them.
"""

import argparse
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import scenario_batch
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad

from embedtrain import distributed
from embedtrain.config import deepspeed_config, load_config
from embedtrain.data.collate import Collator, known_positive_hashes
from embedtrain.data.nemotron import content_hash
from embedtrain.data.stream import Sampler, StepBatches
from embedtrain.kinds import kind_of
from embedtrain.losses import duplicate_positive_mask
from embedtrain.model.encoder import load_tokenizer
from embedtrain.train import grad_cache, sparse_loss
from embedtrain.train import step as step_module
from embedtrain.train.engine import build_encoder, build_engine
from embedtrain.train.loop import open_dataset
from embedtrain.train.multi_vector_loss import multi_vector_loss
from embedtrain.train.step import contrastive_loss, micro_batch_backward


def detached_gather(tensor, group=None, uniform=False):
    """The scheme the test must reject: gather without grad, put the local slice back."""
    pool = distributed.gather_no_grad(tensor.detach(), group)
    sizes = distributed.gather_sizes(tensor.shape[0], group)
    offset = sum(sizes[: distributed.rank()])
    return torch.cat([pool[:offset], tensor, pool[offset + tensor.shape[0] :]]), offset


def synthetic_passage(content, length):
    """`length` synthetic tokens less up to 255 (so lengths differ); they depend only on the
    passage (its content hash), not on how batches are cut."""
    generator = torch.Generator().manual_seed(content % 2**31)
    real = length - int(torch.randint(0, 256, (1,), generator=generator))
    return torch.randint(0, 1000, (real,), generator=generator).tolist()


COLOURS = "red green blue amber violet silver golden black".split()
ANIMALS = "otter falcon badger heron lynx salmon beetle walrus".split()


def write_two_positive_data(folder, num_queries):
    """One subset in the dataset layout: query i has positives d_{2i} and d_{2i+1} (two texts about
    the same made-up animal) and lists every other query's positives as its negatives. Returns
    question -> [content hash of positive A, of positive B]."""
    folder = Path(folder) / "TwoPositives"
    folder.mkdir(parents=True, exist_ok=True)
    corpus, queries, truth = [], [], {}
    for i in range(num_queries):
        colour, animal = COLOURS[i % len(COLOURS)], ANIMALS[i // len(COLOURS) % len(ANIMALS)]
        texts = [
            f"The {colour} {animal} of valley {i} sleeps under old bridges and eats river fish.",
            f"Field notes, valley {i}: a {colour} {animal} was seen hunting at dawn near the mill.",
        ]
        corpus += [{"id": f"d_{2 * i}", "text": texts[0]}, {"id": f"d_{2 * i + 1}", "text": texts[1]}]
        question = f"Where does the {colour} {animal} of valley {i} live?"
        truth[question] = [content_hash(t) for t in texts]
        others = [{"id": f"d_{2 * j + k}"} for j in range(num_queries) if j != i for k in (0, 1)]
        queries.append(
            {
                "question_id": f"q_{i}",
                "question": question,
                "corpus_id": "TwoPositives",
                "pos_doc": [{"id": f"d_{2 * i}"}, {"id": f"d_{2 * i + 1}"}],
                "neg_doc": others,
            }
        )
    metadata = {
        "corpus_id": "TwoPositives",
        "query_instruction": "Instruct: Given a question, retrieve passages that answer it\nQuery:",
        "passage_instruction": "",
        "task_type": "Retrieval",
        "ids_only": False,
    }
    (folder / "dataset_metadata.json").write_text(json.dumps(metadata))
    pq.write_table(pa.Table.from_pylist(corpus), folder / "corpus.parquet")
    pq.write_table(pa.Table.from_pylist(queries), folder / "queries.parquet")
    return truth


def positive_masking(records, micro_examples, truth, per_query):
    """Counts over this rank's pooled losses (records: (pool_hash_N, targets_Q, masked_QN) of each
    micro-batch), summed over ranks: pool entries that are a known positive of the query but not its
    target, left unmasked; such entries among other ranks' passages; targets that are the query's
    second positive; and the entries a mask of only the target's own text (the rule before sibling
    masking) would have left unmasked."""
    counts = dict.fromkeys(["unmasked_positives", "positives_on_other_ranks", "second_positive_targets"], 0)
    counts["unmasked_with_target_hash_only"] = 0
    for (pool_hash_N, targets_Q, masked_QN), examples in zip(records, micro_examples):
        mine = range(int(targets_Q[0]), int(targets_Q[0]) + len(examples) * per_query)
        target_only_QN = pool_hash_N[targets_Q][:, None] == pool_hash_N[None, :]
        for q, example in enumerate(examples):
            known, target = truth[example.query], int(targets_Q[q])
            counts["second_positive_targets"] += int(pool_hash_N[target]) == known[1]
            for n, passage_hash in enumerate(pool_hash_N.tolist()):
                if n == target or passage_hash not in known:
                    continue
                counts["unmasked_positives"] += int(not masked_QN[q, n])
                counts["unmasked_with_target_hash_only"] += int(not target_only_QN[q, n])
                counts["positives_on_other_ranks"] += int(n not in mine)
    totals = torch.tensor(list(counts.values()))
    dist.all_reduce(totals)
    return dict(zip(counts, totals.tolist()))


class SyntheticTeacher:
    """A teacher cache stand-in: a fixed random unit vector of width `dim` per (side, text), from a
    generator seeded by the text's content hash, so every rank and the reference see the same."""

    def __init__(self, dim=48):
        self.dim = dim

    def lookup(self, texts, side):
        rows = []
        for text in texts:
            generator = torch.Generator().manual_seed((content_hash(text) + (side == "query")) % 2**31)
            rows.append(torch.nn.functional.normalize(torch.randn(self.dim, generator=generator), dim=0))
        return torch.stack(rows).numpy()


def write_tied_copy(model_path, folder):
    """A copy of the checkpoint folder whose config.json ties the LM head to the input embeddings."""
    shutil.copytree(model_path, folder, dirs_exist_ok=True)
    config = json.loads((Path(folder) / "config.json").read_text())
    (Path(folder) / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))


def relative_errors(grads, reference):
    errors = {}
    for name, ref in reference.items():
        errors[name] = float((grads[name] - ref).norm() / ref.norm().clamp(min=1e-12))
    return errors


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--negatives", default="group")
    parser.add_argument("--micro", type=int, default=2)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--stage", type=int, default=3)
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--reentrant", action="store_true")
    parser.add_argument("--detached", action="store_true")
    parser.add_argument("--query-negatives", action="store_true")
    parser.add_argument("--grad-cache", type=int, default=0, help="GradCache chunk size (queries)")
    parser.add_argument("--dropout", type=float, default=0.0, help="attention dropout (GradCache replays it)")
    parser.add_argument("--no-replay", action="store_true", help="GradCache without RNG replay (must be caught)")
    parser.add_argument("--long", type=int, default=0, help="replace passages by synthetic ones of this many tokens")
    parser.add_argument("--matryoshka", action="store_true", help="loss summed over dims 16 and 64")
    parser.add_argument("--step", type=int, default=0, help="the global batch to compare")
    parser.add_argument("--model", default=None, help="model.path (default: the tiny recipe's tiny Llama)")
    parser.add_argument(
        "--distill",
        action="store_true",
        help="loss.distill from a synthetic teacher: contrastive 0.5 + cosine + MSE + KL, projection trained",
    )
    parser.add_argument(
        "--two-positives",
        action="store_true",
        help="queries with two positives each, data.positive_sampling=cycle, hard negatives = the others' positives",
    )
    parser.add_argument(
        "--reference-padded",
        action="store_true",
        help="the plain reference on padded batches (DeepSpeed's are packed, as configured)",
    )
    parser.add_argument("--compile", action="store_true", help="train.compile=true (each decoder layer compiled)")
    parser.add_argument(
        "--sparse",
        action="store_true",
        help="model.kind=sparse: InfoNCE over term-weight dot products (temperature 1) + FLOPS at weights 0.1, "
        "no warm-up; the DeepSpeed side through the kind's backward",
    )
    parser.add_argument(
        "--multi-vector",
        choices=["plain", "expand", "expand-attend"],
        default=None,
        help="model.kind=multi_vector: MaxSim InfoNCE through the kind's collator and backward; expand: queries "
        "expanded with unattended tokens (padded batches), expand-attend: attended expansion (packed)",
    )
    parser.add_argument(
        "--rank-flops", action="store_true", help="with --sparse: FLOPS over the rank's own vectors (must be caught)"
    )
    parser.add_argument(
        "--tied-head", action="store_true", help="with --sparse: the LM head tied to the input embeddings"
    )
    parser.add_argument(
        "--inference-free",
        action="store_true",
        help="with --sparse: inference-free queries (the learned query table) through the kind's collator",
    )
    parser.add_argument(
        "--auto-zero3",
        action="store_true",
        help="deepspeed.config=auto at ZeRO-3 (decoder layers as leaf modules), checkpointing every 2nd layer",
    )
    parser.add_argument(
        "--separate-forwards",
        action="store_true",
        help="queries and passages in two encoder forwards (the layout embedtrain does not use)",
    )
    args = parser.parse_args(argv)

    rank, world, _ = distributed.init_distributed()
    global_batch = world * args.micro * args.accumulation
    overrides = [
        f"train.micro_batch_size={args.micro}",
        f"train.global_batch_size={global_batch}",
        f"loss.negatives={args.negatives}",
        f"loss.query_negatives={str(args.query_negatives).lower()}",
        "deepspeed.bf16.enabled=false",
        f"deepspeed.zero_optimization.stage={args.stage}",
        f"train.activation_checkpointing={'2' if args.auto_zero3 else str(not args.no_checkpointing).lower()}",
        *(["deepspeed.config=auto"] if args.auto_zero3 else []),
        f"train.grad_cache_chunk_size={args.grad_cache}",
        f"train.compile={str(args.compile).lower()}",
        *(["loss.matryoshka_dims=[16,64]", "loss.matryoshka_weights=[0.5,1.0]"] if args.matryoshka else []),
    ]
    if args.model:
        overrides.append(f"model.path={args.model}")
    if args.multi_vector:
        overrides += ["model.kind=multi_vector", "model.multi_vector.dim=16", "loss.temperature=1.0"]
        if args.multi_vector != "plain":
            attend = str(args.multi_vector == "expand-attend").lower()
            overrides += [f"model.multi_vector.query_expansion={{attend: {attend}}}", "data.query_max_length=48"]
            overrides += [] if attend == "true" else ["data.packing=false"]
    if args.tied_head:  # the tiny Llama with tie_word_embeddings: true (its own lm_head is then unused)
        tied = Path(args.out).parent / "tied-llama"
        distributed.run_on_main(lambda: write_tied_copy(load_config("tiny").model.path, tied))
        overrides.append(f"model.path={tied}")
    if args.sparse:
        overrides += [
            "model.kind=sparse",
            "loss.temperature=1.0",
            "model.sparse.flops_query_weight=0.1",
            "model.sparse.flops_document_weight=0.1",
            "model.sparse.flops_warmup_steps=0",
            *(["model.sparse.inference_free_queries=true"] if args.inference_free else []),
        ]
    teacher = None
    if args.distill:
        teacher = SyntheticTeacher()
        overrides += [
            "loss.distill.teacher_cache=synthetic",
            "loss.distill.contrastive=0.5",
            "loss.distill.kl=1.0",
            "loss.distill.kl_temperature=0.1",
        ]
    truth = None
    if args.two_positives:  # one step = one epoch over global_batch queries
        source = Path(args.out).parent / "two_positives"
        truth = distributed.run_on_main(lambda: write_two_positive_data(source, global_batch))
        overrides += [
            f"data.path={source}",
            "data.positive_sampling=cycle",
            f"loss.hard_negatives={2 * (global_batch - 1)}",
        ]
    # one folder for all ranks: rank 0 prepares the demo data there, every rank reads it
    config = load_config("tiny", overrides, output_dir=str(Path(args.out).parent / "run"))
    torch.manual_seed(0)
    dataset = open_dataset(config.data, config.train.output_dir)
    collator = Collator(load_tokenizer(config.model.path), config.data, dataset.info, args.grad_cache, teacher)
    if args.multi_vector or args.inference_free:  # the kind's collator: skiplist ids, query expansion; query table
        collator = kind_of(config).make_collator(collator.tokenizer, config, dataset.info, False)
    teacher_dim = teacher.dim if teacher is not None else None
    sampler = Sampler(dataset.subset_sizes(), global_batch, 0)

    def batch_of(examples):
        if args.separate_forwards:  # two encoder calls: all queries, then all passages
            query_ids, passage_ids = collator.tokenize(examples)
            return {
                **collator(examples),
                "chunks": [collator.encoder_inputs(query_ids, len(query_ids)), collator.encoder_inputs(passage_ids, 0)],
            }
        if not args.long:
            return collator(examples)
        query_ids, _ = collator.tokenize(examples)  # every passage replaced by a long synthetic one
        passage_hash = [content_hash(p) for e in examples for p in e.passages]
        return collator.assemble(
            query_ids,
            [synthetic_passage(h, args.long) for h in passage_hash],
            [known_positive_hashes(e) for e in examples],
            passage_hash,
        )

    def micro_examples(rank_, world_, micro_):
        stream = StepBatches(
            dataset,
            sampler,
            collator,
            rank_,
            world_,
            micro_,
            config.loss.hard_negatives,
            args.step,
            args.step + 1,
            positive_sampling=config.data.positive_sampling,
        )
        return stream.examples(args.step)

    def micro_batches(rank_, world_, micro_):
        return [batch_of(examples) for examples in micro_examples(rank_, world_, micro_)]

    def reference_micro_batches():
        if args.reference_padded:
            collator.config = type(config.data)(**{**vars(config.data), "packing": False})
        return micro_batches(0, 1, world * args.micro)

    if args.no_replay:
        grad_cache.RngState.restore = lambda self: None
    if args.detached:
        distributed.gather_with_grad = detached_gather
    if args.rank_flops:  # the FLOPS terms over the rank's own vectors only (must fail under global)
        sparse_loss.flops_batch = lambda queries_QV, passages_PV, *rest: (queries_QV, passages_PV)

    engine = build_engine(
        config,
        deepspeed_config(config, world),
        use_reentrant=args.reentrant,
        teacher_dim=teacher_dim,
        leaf_modules=not args.separate_forwards,  # two forwards per backward: leaf modules need one
    )
    for layer in engine.module.backbone.layers:  # dropout makes the parity reference moot: replay only
        layer.self_attn.attention_dropout = args.dropout
    records = []

    def recording_mask(positive_hash_QK, pool_hash_N, targets_Q):
        masked_QN = duplicate_positive_mask(positive_hash_QK, pool_hash_N, targets_Q)
        records.append((pool_hash_N.cpu(), targets_Q.cpu(), masked_QN.cpu()))
        return masked_QN

    step_module.duplicate_positive_mask = recording_mask  # the DeepSpeed pass's masks, for --two-positives
    losses, terms, replay = [], [], 0.0
    for index, batch in enumerate(micro_batches(rank, world, args.micro)):
        if args.sparse or args.multi_vector:  # the training loop's call: the kind's backward
            loss, stats = kind_of(config).backward(engine, batch, config, args.accumulation)
        else:
            loss, stats = micro_batch_backward(engine, batch, config.loss, args.accumulation, args.grad_cache)
        if index < args.accumulation - 1:
            engine.step()  # inside the accumulation window: no update; the last step is left out
        losses.append(loss.item())
        terms.append({k: float(v) for k, v in stats.items() if k.startswith(("distill_", "loss_", "flops", "nonzero"))})
        replay = max(replay, float(stats.get("grad_cache_replay_error", 0.0)))
    step_module.duplicate_positive_mask = duplicate_positive_mask
    grads = {name: safe_get_full_grad(p).detach().clone() for name, p in engine.module.named_parameters()}
    masking = {}
    if truth is not None:
        per_query = 1 + config.loss.hard_negatives
        masking = positive_masking(records, micro_examples(rank, world, args.micro), truth, per_query)
        masking["queries"] = global_batch
    ds_loss = distributed.all_reduce_mean(sum(losses) / len(losses))

    config.train.activation_checkpointing = False
    config.train.compile = False
    config.loss.negatives = "local" if args.negatives == "global" else args.negatives
    reference = build_encoder(config, torch.float32, teacher_dim=teacher_dim)
    loss_fn = sparse_loss.sparse_loss_at(config.model.sparse, 1) if args.sparse else None
    ref_loss = 0.0
    for batch in reference_micro_batches():
        if args.multi_vector:
            loss, _ = multi_vector_loss(reference, batch, config.loss, "cpu")
        else:
            loss, _ = contrastive_loss(reference, batch, config.loss, "cpu", loss_fn=loss_fn)
        (loss / args.accumulation).backward()
        ref_loss += loss.item() / args.accumulation
    errors = relative_errors(grads, {n: p.grad for n, p in reference.named_parameters()})
    if rank == 0:
        worst = max(errors, key=errors.get)
        with open(args.out, "w") as f:
            json.dump(
                {
                    "ds_loss": ds_loss,
                    "ref_loss": ref_loss,
                    "max_rel_error": errors[worst],
                    "worst_param": worst,
                    "world": world,
                    "compiled": all(
                        getattr(layer, "_compiled_call_impl", None) is not None
                        for layer in engine.module.backbone.layers
                    ),
                    "leaf_modules": sum(bool(getattr(m, "_z3_leaf", False)) for m in engine.module.modules()),
                    "checkpointed_layers": sum(
                        bool(getattr(layer, "gradient_checkpointing", False)) for layer in engine.module.backbone.layers
                    ),
                    "zero_stage": engine.zero_optimization_stage(),
                    "replay_error": replay,
                    "micro_steps": engine.micro_steps,
                    "ds_accumulation": engine.gradient_accumulation_steps(),
                    "loss_terms": terms,
                    "backbone": type(engine.module.backbone).__name__,
                    "parameters": sorted(errors),
                    "grad_norms": {name: float(p.grad.norm()) for name, p in reference.named_parameters()},
                    **masking,
                },
                f,
            )
    engine.destroy()  # a batch's next scenario builds its own


def run_restoring(argv):
    """main(argv), then the functions a scenario patches (--no-replay, --detached, the recording
    mask) put back, so that the next scenario of a batch runs unpatched."""
    saved = (
        grad_cache.RngState.restore,
        distributed.gather_with_grad,
        step_module.duplicate_positive_mask,
        sparse_loss.flops_batch,
    )
    try:
        main(argv)
    finally:
        (
            grad_cache.RngState.restore,
            distributed.gather_with_grad,
            step_module.duplicate_positive_mask,
            sparse_loss.flops_batch,
        ) = saved


scenario_entry = run_restoring  # what tests/workers/scenario_batch.py runs for an entry naming this worker

if __name__ == "__main__":
    scenario_batch.run(run_restoring)
    distributed.shutdown()
