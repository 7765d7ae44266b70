"""The `embedtrain` command line."""

import sys

import click

from embedtrain.config import ConfigError


def fail(message):
    click.echo(f"embedtrain: error: {message}", err=True)
    sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Train bidirectional Llama embedding models with DeepSpeed, and export them."""


@main.command()
@click.option("--config", "recipe", required=True, metavar="RECIPE_OR_PATH",
              help="A shipped recipe (tiny, llama3_2_1b, llama_embed_nemotron_8b) or a YAML file.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key, e.g. --set train.lr=1e-5 --set deepspeed.bf16.enabled=false.")
@click.option("--output-dir", type=click.Path(file_okay=False), default=None,
              help="Run folder (checkpoints, TensorBoard, resolved config). Default: train.output_dir.")
def train(recipe, overrides, output_dir):
    """Train an embedding model.

    \b
    Single process:  embedtrain train --config tiny --output-dir runs/tiny
    Multi-rank:      deepspeed --num_gpus 8 launch/train.py --config llama3_2_1b --set data.path=/data/nemotron
    """
    from embedtrain.config import load_config
    from embedtrain.data.nemotron import DataError
    from embedtrain.model.encoder import ModelError

    try:
        config = load_config(recipe, overrides, output_dir)
        from embedtrain import distributed
        from embedtrain.train.loop import train as run_training

        run_training(config)
        distributed.shutdown()
    except (ConfigError, DataError, ModelError) as err:
        fail(str(err))


@main.command()
@click.argument("src", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--subset", "subsets", multiple=True, help="Prepare only this subset (repeatable). Default: all.")
@click.option("--skip-bad-rows", is_flag=True,
              help="Leave out bad rows instead of failing; each one is listed in OUT/skipped_rows.jsonl.")
@click.option("--workers", type=int, default=None, help="Parallel processes (one subset each). Default: cores.")
@click.option("--shard-mb", type=int, default=256, show_default=True, help="Target size of one Arrow shard.")
def prepare(src, out, subsets, skip_bad_rows, workers, shard_mb):
    """Validate a local copy of nvidia/embed-nemotron-dataset-v1 and write Arrow shards + manifest.

    \b
    Example:  embedtrain prepare /data/embed-nemotron-dataset-v1 /data/prepared
    Then:     embedtrain train --config llama3_2_1b --set data.path=/data/prepared ...
    """
    from embedtrain.data.nemotron import DataError
    from embedtrain.data.prepare import prepare as run_prepare

    try:
        manifest = run_prepare(src, out, subsets or None, skip_bad_rows, workers, shard_mb)
    except DataError as err:
        fail(str(err))
    total = sum(s["num_queries"] for s in manifest["subsets"].values())
    click.echo(f"prepared {total:,} queries from {len(manifest['subsets'])} subset(s) into {out}")


@main.command()
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True,
              help="Weight dtype of the exported safetensors.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def export(checkpoint, out, dtype, overwrite):
    """Export a run (its latest checkpoint) or a checkpoint step folder to a Hugging Face folder.

    \b
    Example:  embedtrain export runs/tiny exported/tiny
    Load it:  AutoModel.from_pretrained("exported/tiny", trust_remote_code=True)
    """
    from embedtrain.export import export_checkpoint

    try:
        path = export_checkpoint(checkpoint, out, dtype=dtype, overwrite=overwrite)
    except (ValueError, FileExistsError) as err:
        fail(str(err))
    click.echo(f"exported to {path}")


if __name__ == "__main__":
    main()
