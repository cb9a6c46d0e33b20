"""Render the SLURM job script for ``ssl-pretrain`` (scripts/slurm/pretrain.sbatch.template).

    python scripts/slurm_job.py --recipe mae --nodes 2 --gpus-per-node 4 --time 24:00:00 \\
        --partition gpu -o mae.sbatch -- --trainer.max_epochs 400 --trainer.precision bf16-mixed
    sbatch mae.sbatch

One task per GPU (``--ntasks-per-node`` = ``--gres=gpu:N`` = ``--trainer.devices N``), ``--trainer.num_nodes``
from the allocation, SIGUSR1 90 s before the time limit (Lightning saves an HPC checkpoint and requeues),
and a run folder that survives the requeue (default ``runs/RECIPE/${SLURM_JOB_ID}``) resumed with
``--ckpt_path last``. Arguments after ``--`` are appended to the ``ssl-pretrain`` command line.
Needs no torch: it runs on a login node.
"""
from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "scripts" / "slurm" / "pretrain.sbatch.template"
RECIPE_DIR = ROOT / "ssl_kit" / "recipes"
# SLURM --time formats: minutes, minutes:seconds, hours:minutes:seconds, days-hours,
# days-hours:minutes, days-hours:minutes:seconds.
TIME_RE = re.compile(r"^(\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+|\d+-\d+:\d{1,2}|\d+-\d+:\d{1,2}:\d{1,2})$")
SAFE_NAME_RE = re.compile(r"^[A-Za-z0-9_.+-]+$")


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def check_recipe(recipe: str) -> str:
    """A shipped recipe name, or a path to an existing YAML file (kept as given)."""
    path = Path(recipe).expanduser()
    if path.suffix in (".yaml", ".yml") or "/" in recipe:
        if not path.is_file():
            raise ValueError(f"recipe file {recipe} does not exist")
        return recipe
    if recipe not in available_recipes():
        raise ValueError(f"unknown recipe {recipe!r}; available: {', '.join(available_recipes())} "
                         "(or a path to your own YAML)")
    return recipe


def double_quoted(text: str) -> str:
    """Body of a bash double-quoted string: ``$VAR`` / ``${VAR}`` still expand (e.g. ``${SLURM_JOB_ID}``)."""
    if re.search(r'["`\\]|\$\(', text):
        raise ValueError(f"--run-dir {text!r}: quotes, backslashes, backticks and $( ) are not allowed")
    return text


def render(
    recipe: str,
    nodes: int,
    gpus_per_node: int,
    time: str,
    partition: str | None = None,
    run_dir: str | None = None,
    cpus_per_task: int = 8,
    job_name: str | None = None,
    command: str = "ssl-pretrain",
    setup: list[str] | None = None,
    overrides: list[str] | None = None,
) -> str:
    """The job script text; ValueError with a user-facing message for an invalid request."""
    recipe = check_recipe(recipe)
    if nodes < 1:
        raise ValueError(f"--nodes must be at least 1 (got {nodes})")
    if gpus_per_node < 1:
        raise ValueError(f"--gpus-per-node must be at least 1 (got {gpus_per_node}): the job runs one task per GPU")
    if cpus_per_task < 1:
        raise ValueError(f"--cpus-per-task must be at least 1 (got {cpus_per_task})")
    if not TIME_RE.match(time):
        raise ValueError(f"--time {time!r} is not a SLURM time (MINUTES, HH:MM:SS, D-HH:MM:SS, ...)")
    job_name = job_name or f"ssl-{Path(recipe).stem}"
    for flag, value in (("--job-name", job_name), ("--partition", partition)):
        if value is not None and not SAFE_NAME_RE.match(value):
            raise ValueError(f"{flag} {value!r}: use letters, digits and . _ + - only")
    run_dir = double_quoted(run_dir or f"runs/{Path(recipe).stem}/${{SLURM_JOB_ID}}")
    fixed = {"--trainer.devices", "--trainer.num_nodes", "--run_dir", "--ckpt_path", "--recipe"}
    for arg in overrides or []:
        if arg.split("=", 1)[0] in fixed:
            raise ValueError(f"{arg.split('=', 1)[0]} is set by the job script (use --nodes / --gpus-per-node / --run-dir)")
    values = {
        "JOB_NAME": job_name,
        "NODES": str(nodes),
        "GPUS_PER_NODE": str(gpus_per_node),
        "CPUS_PER_TASK": str(cpus_per_task),
        "TIME": time,
        "PARTITION_LINE": f"#SBATCH --partition={partition}" if partition else "",
        "SETUP": "\n".join(setup or []),
        "RUN_DIR": run_dir,
        "COMMAND": command,
        "RECIPE": shlex.quote(recipe),
        "OVERRIDES": "".join(" " + shlex.quote(a) for a in overrides or []),
    }
    lines = []
    for line in TEMPLATE.read_text().splitlines():
        placeholder_only = line.strip() in ("{{PARTITION_LINE}}", "{{SETUP}}")
        for key, value in values.items():
            line = line.replace("{{" + key + "}}", value)
        if placeholder_only and not line.strip():
            continue
        lines.append(line)
    text = "\n".join(lines) + "\n"
    left = re.findall(r"\{\{\w+\}\}", text)
    assert not left, f"unfilled placeholders {left} in {TEMPLATE}"
    return text


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, overrides = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(
        prog="slurm_job.py", description="Write the sbatch script of an ssl-pretrain run (one task per GPU, "
        "SIGUSR1 requeue, automatic resume). Arguments after -- go to ssl-pretrain.")
    parser.add_argument("--recipe", required=True, help="shipped recipe name or path to a recipe YAML")
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, required=True)
    parser.add_argument("--time", required=True, help="SLURM time limit, e.g. 24:00:00 or 2-00:00:00")
    parser.add_argument("--partition", default=None)
    parser.add_argument("--run-dir", default=None,
                        help="run folder, the same for every requeue of the job (default runs/RECIPE/${SLURM_JOB_ID}); "
                        "$VARIABLES expand in the job")
    parser.add_argument("--cpus-per-task", type=int, default=8)
    parser.add_argument("--job-name", default=None, help="default ssl-RECIPE")
    parser.add_argument("--command", default="ssl-pretrain",
                        help="how to start the CLI on the nodes (default ssl-pretrain; e.g. 'python -m ssl_kit.cli')")
    parser.add_argument("--setup", action="append", default=[],
                        help="shell line run before srun, e.g. 'source .venv/bin/activate' (repeatable)")
    parser.add_argument("-o", "--output", default=None, help="write the script here (default: print it)")
    args = parser.parse_args(argv)
    try:
        text = render(args.recipe, args.nodes, args.gpus_per_node, args.time, args.partition, args.run_dir,
                      args.cpus_per_task, args.job_name, args.command, args.setup, overrides)
    except ValueError as err:
        parser.error(str(err))
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}: sbatch {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
