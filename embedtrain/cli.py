"""The `embedtrain` command line."""

import traceback
from contextlib import contextmanager

import click

from embedtrain.config import RECIPES_DIR
from embedtrain.data.formats import FORMATS
from embedtrain.errors import CheckpointError, EmbedtrainError, UsageError

# the shipped recipes, read from the recipes folder: `train --help` cannot name fewer than there are
SHIPPED_RECIPES = ", ".join(sorted(path.stem for path in RECIPES_DIR.glob("*.yaml")))


def fail(message, exit_code=2):
    """Report an error and end the process without the process-group teardown (see
    distributed.shutdown): exit code 2 for bad input, 1 for a failure."""
    from embedtrain.distributed import shutdown

    click.echo(f"embedtrain: error: {message}", err=True)
    shutdown(exit_code, wait_for_peers=False)


@contextmanager
def reported(*errors):
    """A command's call with its errors mapped to exits: a UsageError (options that do not fit
    together or the files they name) as click's usage error, `errors` (bad input) through `fail`;
    both exit code 2."""
    try:
        yield
    except UsageError as err:
        raise click.UsageError(str(err)) from None
    except errors as err:
        fail(str(err))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Train bidirectional Llama embedding models with DeepSpeed, and export them."""


@main.command()
@click.option(
    "--config",
    "recipe",
    required=True,
    metavar="RECIPE_OR_PATH",
    help=f"A shipped recipe ({SHIPPED_RECIPES}) or a YAML file.",
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a config key, e.g. --set train.lr=1e-5 --set deepspeed.bf16.enabled=false.",
)
@click.option(
    "--output-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Run folder (checkpoints, TensorBoard, resolved config). Default: train.output_dir.",
)
@click.option(
    "--resume",
    default=None,
    metavar="auto|never|PATH",
    help="auto (default): continue from the run folder's newest complete checkpoint if there is one; "
    "never: start fresh (refused if the run folder has checkpoints); PATH: a run or step folder.",
)
def train(recipe, overrides, output_dir, resume):
    """Train an embedding model (bi-encoder), a reranker (model.kind=reranker: the *_reranker recipes), a
    multi-vector ColBERT model (model.kind=multi_vector: the *_colbert recipes) or a sparse SPLADE model
    (model.kind=sparse: the *_sparse recipes).

    A run that fails before its first checkpoint removes the run folder if it created it.

    \b
    Example:     embedtrain train --config tiny --output-dir runs/tiny
    Multi-rank:  deepspeed --num_gpus 8 launch/train.py --config llama3_2_1b --set data.path=/data/nemotron
    """
    from embedtrain.config import load_config

    try:
        config = load_config(recipe, [*overrides, *([f"train.resume={resume}"] if resume else [])], output_dir)
        from embedtrain.train.loop import train_command  # after the config: its errors come before DeepSpeed loads
        from embedtrain.train.run_folder import removed_if_failed

        with removed_if_failed(config.train.output_dir):  # no empty run folder left by a failed run
            train_command(config)
    except EmbedtrainError as err:
        fail(str(err))
    except Exception as err:  # noqa: BLE001 - a bug or a crash below us: traceback, then a clean exit 1
        traceback.print_exc()
        fail(f"training failed: {type(err).__name__}: {err}", exit_code=1)


@main.command()
@click.argument("src")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--subset", "subsets", multiple=True, help="Prepare only this subset (repeatable). Default: all.")
@click.option(
    "--format",
    "input_format",
    type=click.Choice(FORMATS),
    default="auto",
    show_default=True,
    help="Input format of SRC; auto detects it (see docs/data.md).",
)
@click.option(
    "--sources",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="Folder of local copies of the ids_only subsets' sources, as SOURCES/<owner>/<name>.",
)
@click.option(
    "--skip-bad-rows",
    is_flag=True,
    help="Leave out bad rows instead of failing; each one is listed in OUT/skipped_rows.jsonl.",
)
@click.option("--workers", type=int, default=None, help="Parallel processes (one subset each). Default: cores.")
@click.option("--shard-mb", type=int, default=256, show_default=True, help="Target size of one Arrow shard.")
def prepare(src, out, subsets, input_format, sources, skip_bad_rows, workers, shard_mb):
    """Convert and validate a dataset, restore its ids_only subsets, write Arrow shards + manifest.

    SRC is a local folder or file (the embed-nemotron layout, inline JSONL, NeMo AutoModel's
    corpus-id JSON, BEIR, or a `datasets` folder), or a Hugging Face dataset id such as
    nvidia/embed-nemotron-dataset-v1 (downloaded into the Hugging Face cache, or read from it
    offline).

    \b
    Example:  embedtrain prepare nvidia/embed-nemotron-dataset-v1 /data/prepared --sources /data/sources
    Example:  embedtrain prepare /data/embed-nemotron-dataset-v1 /data/prepared --subset FEVER
    Then:     embedtrain train --config llama3_2_1b --set data.path=/data/prepared ...
    """
    from embedtrain.data.prepare import prepare_command

    with reported(EmbedtrainError):
        prepare_command(src, out, subsets, skip_bad_rows, workers, shard_mb, sources=sources, input_format=input_format)


@main.command()
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16"]),
    default="float32",
    show_default=True,
    help="Weight dtype of the exported safetensors.",
)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--max-shard-gb", type=float, default=5.0, show_default=True, help="Largest safetensors shard.")
@click.option(
    "--adapter-only",
    is_flag=True,
    help="LoRA runs: write the adapter in peft's format (plus tokenizer and prompts) instead of the merged model "
    "(not for multi-vector runs, whose projection is trained beside the adapter).",
)
@click.option(
    "--base-model",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="LoRA runs: the base model folder the adapter was trained on. Default: the run's model.path.",
)
@click.option(
    "--keep-projection",
    is_flag=True,
    help="Distillation runs (loss.distill): keep the student -> teacher projection, as a sentence-transformers "
    "Dense module that embedtrain applies too, so the model embeds in the teacher's space. Default: dropped.",
)
def export(checkpoint, out, dtype, overwrite, max_shard_gb, adapter_only, base_model, keep_projection):
    """Export a run (its latest checkpoint) or a checkpoint step folder to a Hugging Face folder.

    A LoRA run (model.lora) is merged into its base (W + alpha / r x B A) and written in the same
    format; --adapter-only writes the adapter alone, for peft.PeftModel.from_pretrained on the base.
    A distilled student keeps its own width unless --keep-projection is given.

    \b
    Example:  embedtrain export runs/tiny exported/tiny
    Load it:  AutoModel.from_pretrained("exported/tiny", trust_remote_code=True)
    Adapter:  embedtrain export runs/tiny-lora exported/tiny-lora-adapter --adapter-only
    Student:  embedtrain export runs/student exported/student-teacher-space --keep-projection
    """
    from embedtrain.export import export_command

    with reported(CheckpointError, FileExistsError):
        export_command(
            checkpoint,
            out,
            dtype=dtype,
            overwrite=overwrite,
            max_shard_gb=max_shard_gb,
            adapter_only=adapter_only,
            base_model=base_model,
            keep_projection=keep_projection,
        )


def _check_device(ctx, param, value):
    import re

    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise click.BadParameter(f"{value!r}: expected auto, cpu, cuda or cuda:N", ctx, param)
    return value


def inference_options(command):
    """--device and --dtype, shared by encode, rerank, eval and mine."""
    command = click.option(
        "--dtype",
        type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
        default="auto",
        show_default=True,
        help="Weights and activations: auto = bfloat16 on CUDA, float32 on "
        "CPU. What the model computes (vectors, scores) comes back as float32 either way.",
    )(command)
    return click.option(
        "--device",
        default="auto",
        show_default=True,
        callback=_check_device,
        metavar="auto|cpu|cuda|cuda:N",
        help="auto = CUDA when available (each rank its LOCAL_RANK's GPU), else CPU.",
    )(command)


def io_options(input_help, output_help, input_required=True, output_dir_okay=False):
    """--input (an existing file) and --output of encode and rerank."""

    def decorate(command):
        command = click.option(
            "--output", "output_path", required=True, type=click.Path(dir_okay=output_dir_okay), help=output_help
        )(command)
        input_type = click.Path(exists=True, dir_okay=False)
        return click.option("--input", "input_path", required=input_required, type=input_type, help=input_help)(command)

    return decorate


def batching_options(unit, long_unit, max_length_help):
    """--batch-size, --max-tokens and --max-length of encode (`unit` sequences) and rerank (pairs)."""

    def decorate(command):
        options = [
            click.option("--batch-size", type=int, default=32, show_default=True, help=f"Most {unit} per batch."),
            click.option(
                "--max-tokens",
                type=int,
                default=None,
                help=f"Most padded tokens per batch ({unit} x longest); long {long_unit} then go in small batches.",
            ),
            click.option("--max-length", type=int, default=None, help=max_length_help),
        ]
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def search_chunk_options(command):
    """--corpus-chunk and --query-chunk, shared by eval and mine."""
    command = click.option("--query-chunk", type=int, default=256, show_default=True, help="Queries scored per block.")(
        command
    )
    return click.option(
        "--corpus-chunk", type=int, default=4096, show_default=True, help="Documents scored per block."
    )(command)


def storage_option(default, why):
    """--storage of eval and mine: the dtype of the on-disk embedding matrices searched
    (embedtrain.retrieval); `why` says why this command's default is what it is."""
    return click.option(
        "--storage",
        type=click.Choice(["float16", "float32"]),
        default=default,
        show_default=True,
        help="Dtype of the on-disk corpus and query embeddings; scores are float32 either way. float32 gives "
        f"exactly a float32 search at twice the disk of float16 (N x dim x 4 bytes). {why}",
    )


def rerank_batch_and_inference_options(command):
    """--rerank-batch-size, --device and --dtype: the last options of eval and mine."""
    return click.option(
        "--rerank-batch-size",
        type=int,
        default=32,
        show_default=True,
        help="(query, document) pairs per reranker batch.",
    )(inference_options(command))


@main.command()
@click.argument("model", type=click.Path(exists=True, file_okay=False))
@io_options(
    '.txt (one text per line) or .jsonl (a "text" field per line). Required, except with --teacher-cache.',
    ".npy (float32 matrix) or .parquet (text, embedding); a multi-vector model: .npz (embeddings, offsets); "
    "with --teacher-cache the cache folder.",
    input_required=False,
    output_dir_okay=True,
)
@click.option(
    "--teacher-cache",
    "teacher_data",
    default=None,  # a path or assets:NAME, checked by embedtrain.teacher_cache.prepared_folder
    metavar="DATA",
    help="Teacher-cache mode: embed every distinct query and passage (positives and hard negatives) of the "
    "training data DATA (prepared or raw) with MODEL as the distillation teacher, each subset with the "
    "model's own prompts, into the cache folder --output (embedtrain.data.teacher).",
)
@click.option(
    "--subsets",
    default=None,
    metavar="A,B",
    help="With --teacher-cache: only these subsets of DATA (comma-separated). Default: all.",
)
@click.option(
    "--cache-dtype",
    type=click.Choice(["float16", "float32"]),
    default="float16",
    show_default=True,
    help="With --teacher-cache: dtype of the stored embeddings.",
)
@click.option(
    "--prompt",
    type=click.Choice(["query", "document"]),
    default=None,
    help="Prepend the model's prompt of this name (its embedtrain.json / sentence-transformers prompts).",
)
@click.option("--dim", type=int, default=None, help="Keep the first K dims and re-normalise (Matryoshka).")
@batching_options(
    "sequences", "texts", "Tokens per sequence (default: the model's max_seq_length, sentence_bert_config.json)."
)
@click.option(
    "--long-documents",
    type=click.Choice(["truncate", "chunk"]),
    default="truncate",
    show_default=True,
    help="Texts over --max-length: cut, or split into windows whose embeddings are averaged.",
)
@click.option(
    "--chunk-overlap",
    type=int,
    default=0,
    show_default=True,
    help="Tokens shared by consecutive windows with --long-documents chunk.",
)
@inference_options
@click.pass_context
def encode(
    ctx,
    model,
    input_path,
    output_path,
    teacher_data,
    subsets,
    cache_dtype,
    prompt,
    dim,
    batch_size,
    max_tokens,
    max_length,
    long_documents,
    chunk_overlap,
    device,
    dtype,
):
    """Embed texts with an exported model, in input order; or, with --teacher-cache, build the
    teacher-embedding cache of a training set for distillation.

    \b
    Example:  embedtrain encode exported/tiny --input queries.txt --output q.npy --prompt query
              embedtrain encode exported/1b --input docs.jsonl --output d.npy --prompt document \\
                  --max-length 8192 --max-tokens 65536 --long-documents chunk --device cuda
    Teacher:  embedtrain encode exported/teacher --teacher-cache /data/prepared --output /data/teacher-cache \\
                  --subsets FEVER,SciFact --max-tokens 65536 --device cuda
    """
    if teacher_data is not None:
        _refuse_given(
            ctx,
            ("input_path", "prompt", "dim", "max_length", "long_documents", "chunk_overlap"),
            "cannot be used with --teacher-cache (the teacher embeds the data's texts with its own prompts, "
            "full width, truncated to its max_seq_length)",
        )
        from embedtrain.teacher_cache import teacher_cache_command

        with reported(EmbedtrainError, ValueError):
            teacher_cache_command(
                model,
                teacher_data,
                output_path,
                subsets,
                cache_dtype,
                batch_size=batch_size,
                max_tokens=max_tokens,
                device=device,
                dtype=dtype,
            )
        return
    _refuse_given(ctx, ("subsets", "cache_dtype"), "only go with --teacher-cache")
    if input_path is None:
        raise click.UsageError("Missing option '--input' (or --teacher-cache DATA for a teacher cache).")
    from embedtrain.encode import encode_command

    with reported(EmbedtrainError, ValueError):
        encode_command(
            model,
            input_path,
            output_path,
            prompt,
            dim,
            batch_size,
            max_tokens,
            max_length,
            long_documents,
            chunk_overlap,
            device=device,
            dtype=dtype,
        )


def _refuse_given(ctx, names, reason):
    """A usage error naming the options among `names` given on the command line."""
    from click.core import ParameterSource

    params = {p.name: p for p in ctx.command.params}
    given = [params[n].opts[0] for n in names if ctx.get_parameter_source(n) is not ParameterSource.DEFAULT]
    if given:
        raise click.UsageError(f"{', '.join(given)} {reason}.")


@main.command()
@click.argument("model", type=click.Path(exists=True, file_okay=False))
@io_options(
    '.jsonl, one object per line: {"query": ..., "passage": ...} or {"query": ..., "passages": [...]}.',
    '.jsonl, one line per input line, in order: {"score": S} or {"scores": [S, ...]}.',
)
@batching_options(
    "pairs", "pairs", "Tokens per pair, longer ones cut (default: the model's pair_max_length, embedtrain.json)."
)
@inference_options
def rerank(model, input_path, output_path, batch_size, max_tokens, max_length, device, dtype):
    """Score (query, passage) pairs with an exported reranker: one relevance logit per pair, higher
    is more relevant, each pair rendered with the model's pair template.

    \b
    Example:  embedtrain rerank exported/tiny_reranker --input pairs.jsonl --output scores.jsonl
    pairs.jsonl:
      {"query": "Who is Shilin Linlofo?", "passage": "Shilin Linlofo is a chemist."}
      {"query": "Who is Shilin Linlofo?", "passages": ["Shilin Linlofo is a chemist.", "Paris is in France."]}
    scores.jsonl:
      {"score": 2.71}
      {"scores": [2.71, -1.93]}
    """
    from embedtrain.rerank import rerank_command

    with reported(EmbedtrainError, OSError):
        rerank_command(model, input_path, output_path, batch_size, max_length, max_tokens, device=device, dtype=dtype)


@main.command()
@click.option("--config", "recipe", required=True, metavar="RECIPE_OR_PATH", help="Recipe name or YAML file.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Config overrides, as for train.")
@click.option("--nodes", type=int, default=1, show_default=True)
@click.option("--gpus-per-node", type=int, default=8, show_default=True)
@click.option("--gpu-memory", type=float, default=80.0, show_default=True, help="GiB per GPU.")
@click.option("--mfu", type=float, default=0.40, show_default=True, help="Assumed model FLOPs utilisation.")
@click.option("--peak-tflops", type=float, default=989.0, show_default=True, help="Dense bf16 peak per GPU.")
@click.option(
    "--shape",
    type=click.Choice(["llama-3.2-1b", "llama-3.1-8b", "qwen3-0.6b", "ministral3-3b"]),
    default=None,
    help="Model shape when model.path is not a local checkpoint.",
)
@click.option(
    "--bandwidth-gbps",
    type=float,
    default=None,
    help="Per-GPU bandwidth of the ZeRO collectives, Gb/s each direction. Default: 3600 (450 GB/s) on one "
    "node, half of the H100 SXM's 900 GB/s NVLink 4 (both directions; NVIDIA H100 datasheet); 400 "
    "across nodes, one ConnectX-7 NDR InfiniBand port per GPU (NVIDIA DGX H100 datasheet). "
    "Communication time is added to compute time, not overlapped.",
)
def plan(recipe, overrides, nodes, gpus_per_node, gpu_memory, mfu, peak_tflops, shape, bandwidth_gbps):
    """Per-GPU memory and step time of a recipe on N nodes x G GPUs; recommends micro-batch,
    accumulation, checkpointing and offload.

    \b
    Example:  embedtrain plan --config llama_embed_nemotron_8b --nodes 8 --gpus-per-node 8
    """
    from embedtrain.plan import plan_command

    with reported(EmbedtrainError, ValueError):
        plan_command(recipe, overrides, nodes, gpus_per_node, gpu_memory, mfu, peak_tflops, shape, bandwidth_gbps)


@main.command(name="eval")
@click.argument("model", type=click.Path(exists=True, file_okay=False))
@click.argument("data", type=click.Path(exists=True, file_okay=False))
@click.option("--output", type=click.Path(dir_okay=False), default=None, help="Write the metrics JSON here too.")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option(
    "--query-prompt",
    default=None,
    help="Override the query prompt (default: the model's prompt for the "
    "subset, embedtrain.prompts; BEIR folders: its query prompt).",
)
@click.option("--dim", type=int, default=None, help="Evaluate the first K dims, re-normalised (Matryoshka).")
@click.option(
    "--work-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder for the embedding files (--storage), shared by all ranks (default: a temporary folder, "
    "removed after; give a shared one for multi-node runs).",
)
@search_chunk_options
@click.option(
    "--rerank",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    metavar="RERANKER",
    help="An exported reranker: rescore each query's top --rerank-top-k candidates with it and report both "
    "stages. The top k are reordered by its scores; candidates beyond them keep their first-stage order below.",
)
@click.option(
    "--rerank-top-k",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="First-stage candidates per query rescored by --rerank (over 100: the first stage searches deeper).",
)
@click.option(
    "--first-stage",
    default=None,
    metavar="DENSE_MODEL|bm25",
    help="Instead of searching the whole corpus with MODEL, rescore each query's top --first-stage-k from this "
    "first stage with MODEL (by its own scores: MaxSim, term-weight or embedding dot products) and report those "
    "reordered lists. The first stage: an exported "
    "dense model (its own prompts) or bm25 (Okapi BM25 over lowercase words, k1 1.2, b 0.75).",
)
@click.option(
    "--first-stage-k",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="Candidates per query from --first-stage.",
)
@storage_option(
    "float32",
    "float16 moved the tiny model's nDCG@10 on the demo data by up to 7e-4 (docs/evaluation.md): use it when "
    "float32 would not fit the disk.",
)
@rerank_batch_and_inference_options
def evaluate(
    model, data, output, batch_size, query_prompt, dim, work_dir, rerank, rerank_top_k, first_stage, **run_options
):
    """nDCG@10, Recall@10, Recall@100 and MRR@10 of an exported model (exact search: dense, multi-vector
    by MaxSim, sparse by dot product with its mean non-zeros), or of its reranking of a first stage's
    top k (--first-stage), optionally reranked by a reranker (--rerank).

    \b
    DATA: a subset folder or folder of subsets (dataset layout: pos_doc are the relevant documents),
          or a BEIR folder (corpus.jsonl, queries.jsonl, qrels/test.tsv).
    The metrics JSON goes to stdout (and --output). With --rerank its "subsets"/"mean" are the first
    stage's, "reranked" holds the reranked ones, and a side-by-side table goes to stderr.
    With --first-stage they are MODEL's reordered lists and "first_stage" holds the first stage's.
    Example:  embedtrain eval exported/tiny /data/heldout --output metrics.json
    Rerank:   embedtrain eval exported/tiny /data/heldout --rerank exported/tiny_reranker --rerank-top-k 50
    ColBERT:  embedtrain eval exported/tiny_colbert /data/heldout --first-stage exported/tiny --first-stage-k 100
    Sharded:  torchrun --nproc_per_node 8 -m embedtrain.cli eval exported/1b /data/heldout
    """
    from embedtrain.eval import eval_command

    with reported(EmbedtrainError):
        eval_command(
            model,
            data,
            output,
            batch_size,
            query_prompt,
            dim,
            work_dir,
            rerank=rerank,
            rerank_top_k=rerank_top_k,
            first_stage=first_stage,
            **run_options,  # device, dtype, query_chunk, corpus_chunk, rerank_batch_size, storage, first_stage_k
        )


@main.command()
@click.argument("model", type=click.Path(exists=True, file_okay=False))
@click.argument("data")  # anything prepare reads (a file, a Hub id): embedtrain.mine.source_subsets checks it
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--top-k", type=int, default=20, show_default=True, help="Negatives kept per query.")
@click.option(
    "--margin",
    type=float,
    default=0.95,
    show_default=True,
    help="Drop candidates scoring above margin x the lowest positive score (TopK-PercPos).",
)
@search_chunk_options
@click.option("--batch-size", type=int, default=64, show_default=True, help="Sequences per encoding batch.")
@click.option(
    "--rerank",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    metavar="RERANKER",
    help="An exported reranker: score the mined negatives and the positives with it and drop each negative "
    "it scores above the query's lowest positive score minus --rerank-margin (likely false negatives; "
    "nothing is mined in their place). OUT/<subset>/mining.json counts them.",
)
@click.option(
    "--rerank-margin",
    type=float,
    default=0.0,
    show_default=True,
    help="With --rerank: also drop negatives within this many score units below the positive.",
)
@storage_option(
    "float16",
    "float16 halves the disk of a whole training corpus; the negatives it picks differ only at near-ties.",
)
@rerank_batch_and_inference_options
def mine(model, data, out, top_k, margin, batch_size, rerank, rerank_margin, **run_options):
    """Re-mine hard negatives with a model (dense, or multi-vector by MaxSim), written as ranked neg_doc
    in the dataset's layout.

    \b
    Example:  embedtrain mine exported/tiny /data/embed-nemotron-dataset-v1 /data/remined --top-k 20
    Filtered: embedtrain mine exported/tiny /data/nemotron /data/remined --rerank exported/tiny_reranker
    Sharded:  torchrun --nproc_per_node 8 -m embedtrain.cli mine exported/1b /data/nemotron /data/remined
    """
    from embedtrain.mine import mine_command

    with reported(EmbedtrainError):
        mine_command(
            model,
            data,
            out,
            top_k,
            margin,
            batch_size=batch_size,
            rerank=rerank,
            rerank_margin=rerank_margin,
            **run_options,  # device, dtype, query_chunk, corpus_chunk, rerank_batch_size, storage
        )


@main.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.argument("models", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--weights", default=None, help="Comma-separated weights summing to 1 (default: uniform).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def merge(out, models, weights, dtype, overwrite):
    """Average exported models with identical configs (fp32 arithmetic).

    \b
    Example:  embedtrain merge exported/soup exported/run1 exported/run2 exported/run3
    """
    from embedtrain.merge import merge_command

    with reported(EmbedtrainError, FileExistsError, ValueError):
        merge_command(out, models, weights, dtype, overwrite)


if __name__ == "__main__":
    main()
