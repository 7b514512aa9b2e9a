"""Launches a recipe where config says: `launcher.target: local` (torchrun) or `vessl`.

    python -m launch.launcher recipes/rho1.yaml [--config recipes/config.yaml] [--dry-run] [key=value ...]

local: one node → `torchrun --standalone`; several → `--nnodes/--node_rank` with a static master
or c10d rendezvous (run the same command on every node with its own launcher.node_rank).
vessl: renders launch/vessl.yaml with the recipe (name, RECIPE, resources, image) to
outputs/vessl/<name>.yaml and submits it with the `vessl` CLI.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from runtime.cli import ArgumentParser, entry_point
from runtime.config import LauncherConfig, load_env_config
from runtime.schema import ConfigError

REPO = Path(__file__).resolve().parents[1]
VESSL_TEMPLATE = REPO / "launch" / "vessl.yaml"


def torchrun_command(
    recipe: str, launcher: LauncherConfig, extra: list[str] | None = None
) -> list[str]:
    """The torchrun argv for this node."""
    cmd = ["torchrun"]
    if launcher.nnodes == 1:
        cmd += ["--standalone", f"--nproc_per_node={launcher.nproc_per_node}"]
    elif launcher.rdzv_backend == "c10d":
        cmd += [
            f"--nnodes={launcher.nnodes}",
            f"--nproc_per_node={launcher.nproc_per_node}",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint={launcher.master_addr}:{launcher.master_port}",
            f"--rdzv_id={launcher.rdzv_id}",
        ]
    else:
        cmd += [
            f"--nnodes={launcher.nnodes}",
            f"--nproc_per_node={launcher.nproc_per_node}",
            f"--node_rank={launcher.node_rank}",
            f"--master_addr={launcher.master_addr}",
            f"--master_port={launcher.master_port}",
        ]
    return [*cmd, "train_wmtp.py", recipe, *(extra or [])]


def render_vessl(recipe: str, launcher: LauncherConfig, template: Path = VESSL_TEMPLATE) -> dict:
    spec = yaml.safe_load(template.read_text())
    name = Path(recipe).stem
    spec["name"] = f"wmtp-{name}"
    spec["env"]["RECIPE"] = name
    spec["resources"] = {"cluster": launcher.vessl.cluster, "preset": launcher.vessl.preset}
    spec["image"] = launcher.vessl.image
    return spec


def submit_vessl(spec: dict, out_dir: Path, dry_run: bool) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    if dry_run:
        return path
    if shutil.which("vessl") is None:
        raise ConfigError(
            "the vessl CLI is not installed: `pip install vessl && vessl configure`, then rerun "
            f"(rendered spec: {path})"
        )
    subprocess.run(["vessl", "run", "create", "-f", str(path)], check=True)
    return path


@entry_point
def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--config")
    parser.add_argument("--dry-run", action="store_true", help="print (or render) without running")
    a = parser.parse_intermixed_args(argv)
    try:
        env = load_env_config(a.config)
        if not Path(a.recipe).is_file():
            raise ConfigError(f"recipe not found: {a.recipe}")
        launcher = env.launcher
        if launcher.target == "vessl":
            path = submit_vessl(
                render_vessl(a.recipe, launcher), REPO / "outputs" / "vessl", a.dry_run
            )
            print(f"vessl run spec: {path}")
            return 0
        extra = ([f"--config={a.config}"] if a.config else []) + a.overrides
        cmd = torchrun_command(a.recipe, launcher, extra)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(" ".join(cmd))
    if a.dry_run:
        return 0
    os.chdir(REPO)
    os.execvp(cmd[0], cmd)
    return 0  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
