"""What each rank reads from a checkpoint on resume: files opened through load_checkpoint_file and
bytes of optimizer state copied out of them, for a same-size and a resharded ZeRO-3 resume.

    python tools/resume_reads.py --old 2 --new 2 --new 4 --new 1   # tiny recipe, CPU ranks (gloo)

Trains the tiny recipe (ZeRO-3, fp32) 4 steps on --old ranks, then resumes its step_2 checkpoint on
each --new rank count (the same 4-step run, 2 more steps) and prints one line per
rank: distinct files opened, of them optimizer files, optimizer-state bytes copied, and the
optimizer state's total size. docs/reliability.md quotes the output.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def launch(nproc, *args):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    result = subprocess.run([*command, __file__, *args], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")


def rank_main(run_dir, steps, out):
    """Inside a launch: train (or resume) the tiny recipe; with --out, each rank's reads."""
    from embedtrain import distributed
    from embedtrain.config import load_config
    from embedtrain.train import checkpoint
    from embedtrain.train.loop import train

    config = load_config(
        "tiny",
        [f"train.max_steps={steps}", "train.save_every=2", "train.keep_checkpoints=0", "train.micro_batch_size=4"],
        output_dir=run_dir,
    )
    checkpoint.reset_reads()
    train(config)
    reads = {
        "files": len(set(checkpoint.READS["files"])),
        "optim_files": len({f for f in checkpoint.READS["files"] if f.endswith("_optim_states.pt")}),
        "state_bytes": checkpoint.READS["state_bytes"],
    }
    every = distributed.all_gather_object(reads)
    if out and distributed.rank() == 0:
        Path(out).write_text(json.dumps(every))
    distributed.shutdown()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--old", type=int, default=2)
    parser.add_argument("--new", type=int, action="append")
    parser.add_argument("--rank-run", nargs=3, metavar=("RUN", "STEPS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_run:
        run_dir, steps, out = args.rank_run
        rank_main(run_dir, int(steps), out if out != "-" else None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "run"
        launch(args.old, "--rank-run", str(source), "4", "-")
        step = source / "checkpoints" / "step_2"
        total = sum(p.stat().st_size for p in step.glob("*_optim_states.pt"))
        for new in args.new or [args.old]:
            run = Path(tmp) / f"resume{new}"
            shutil.copytree(step, run / "checkpoints" / "step_2")  # resumed at step 2 of the same 4-step run
            (run / "checkpoints" / "latest").write_text("step_2\n")
            out = Path(tmp) / f"reads{new}.json"
            launch(new, "--rank-run", str(run), "4", str(out))
            for rank, reads in enumerate(json.loads(out.read_text())):
                print(
                    f"{args.old} -> {new} ranks, rank {rank}: {reads['files']} checkpoint file(s) opened "
                    f"({reads['optim_files']} of {args.old} optimizer files), {reads['state_bytes']:,} bytes of "
                    f"optimizer state copied of {total:,} in the optimizer files"
                )


if __name__ == "__main__":
    main()
