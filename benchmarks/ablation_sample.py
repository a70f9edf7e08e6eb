"""An ablation plan on the generated sample, through `pipeline ablate` (seeds, paired t).

    python benchmarks/ablation_sample.py [--plan table5] [--seeds 3] [--steps 300]
        [--crop 128] [--rows a,b] [--jobs 1] [-S KEY=VALUE ...] [--metric FILE.KEY ...]
        [--project-set KEY=VALUE ...] [--work DIR] [--out JSON]

A thin caller: it copies the project's pipeline (dvc.yaml, params.yaml, configs/ and the
code the stages run) into a git repository under --work, applies `--project-set` to its
params.yaml (stage-one settings such as dataset.sample.size, teacher.fit.image_epochs or
teacher.dense, which a plan cannot change), commits, runs `dvc repro <stage one>` (the
sample, the fitted default teacher and its cache) and then `pipeline ablate PLAN` with
`-S train.steps=--steps -S train.crop=--crop -S train.val_every=0` (validation only after
the last step, so best.pt is the final weights) and every `-S` given. The table is
ablate's own report (ablations/PLAN/report.md in the project); the JSON (default
benchmarks/results/ablate_<plan>.json) is its report.json plus the settings and timing.
With --work kept, a rerun continues: finished runs are not repeated.

The results recorded before issue 27 (benchmarks/results/ablation_sample*.json,
ablation_lscd*.json, ablation_teacher_codes.json) came from this script's previous version,
which had its own training loop and options ablate has no equivalent for (--val-stride,
--teacher-frames, the teacher-code rows' own loss defaults); each says so in its
`produced_by` field, and `git show 28108f9:benchmarks/ablation_sample.py` is that version.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]


def copy_project(repo: Path) -> None:
    """The pipeline files, presets and the code its stages depend on (as tests/e2e/test_dvc.py)."""
    repo.mkdir(parents=True)
    for name in ("dvc.yaml", "params.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(ROOT / name, repo / name)
    shutil.copytree(ROOT / ".dvc", repo / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"))
    for folder in ("configs", "pipelines", "pipeline", "stages"):
        shutil.copytree(ROOT / folder, repo / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))


def set_params(path: Path, pairs: list[str]) -> dict[str, Any]:
    """KEY=VALUE (dotted, YAML values) into a params.yaml; returns what was set."""
    params = yaml.safe_load(path.read_text())
    done = {}
    for item in pairs:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--project-set expects KEY=VALUE, got {item!r}")
        *parents, last = key.split(".")
        node = params
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise SystemExit(f"--project-set {item}: params.yaml has no group {part!r}")
            node = node[part]
        if last not in node:
            raise SystemExit(f"--project-set {item}: params.yaml has no key {key!r}")
        node[last] = done[key] = yaml.safe_load(value)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return done


def sh(repo: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "bench", "GIT_COMMITTER_NAME": "bench",
           "GIT_AUTHOR_EMAIL": "bench@localhost", "GIT_COMMITTER_EMAIL": "bench@localhost"}
    result = subprocess.run(args, cwd=repo, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed in {repo}:\n{result.stdout[-3000:]}")
    return result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", default="table5", help="a shipped plan or a plan .yaml")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300, help="train.steps of every run")
    parser.add_argument("--crop", type=int, default=128, help="train.crop of every run")
    parser.add_argument("--rows", default=None, help="rows to run (comma-separated)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once")
    parser.add_argument("-S", "--set", dest="sets", action="append", default=[],
                        metavar="KEY=VALUE", help="another -S for every run (ablate's)")
    parser.add_argument("--metric", action="append", default=[], metavar="FILE.KEY")
    parser.add_argument("--project-set", action="append", default=[], metavar="KEY=VALUE",
                        help="a params.yaml value of the project before stage one runs")
    parser.add_argument("--work", type=Path, default=None,
                        help="keep the project here and continue it on the next call "
                        "(default: a temp folder)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON (default: benchmarks/results/ablate_<plan>.json)")
    args = parser.parse_args()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        repo = (args.work or Path(tmp)) / "project"
        if not repo.exists():
            copy_project(repo)
            project_set = set_params(repo / "params.yaml", args.project_set)
            sh(repo, "git", "init", "-q")
            sh(repo, "git", "add", "-A")
            sh(repo, "git", "commit", "-qm", "ablation_sample project")
        else:
            project_set = set_params(repo / "params.yaml", args.project_set)
            if sh(repo, "git", "status", "--porcelain", "params.yaml").strip():
                raise SystemExit(f"--project-set changes {repo}/params.yaml, whose runs "
                                 "belong to its commit: give another --work")
        t0 = time.perf_counter()
        print(sh(repo, "dvc", "repro", "cache_teacher")[-2000:], flush=True)
        stage_one_s = time.perf_counter() - t0
        sets = [f"train.steps={args.steps}", f"train.crop={args.crop}",
                "train.val_every=0", *args.sets]
        cmd = [sys.executable, "-m", "pipeline", "ablate", args.plan, "--seeds",
               str(args.seeds), "--jobs", str(args.jobs)]
        cmd += [a for s in sets for a in ("-S", s)]
        cmd += [a for m in args.metric for a in ("--metric", m)]
        cmd += ["--rows", args.rows] if args.rows else []
        t0 = time.perf_counter()
        print(sh(repo, *cmd), flush=True)
        ablate_s = time.perf_counter() - t0
        plan = Path(args.plan).stem
        report = json.loads((repo / "ablations" / plan / "report.json").read_text())
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    out = args.out or ROOT / "benchmarks" / "results" / f"ablate_{plan}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "ablation_sample", "produced_by": "benchmarks/ablation_sample.py "
        f"(pipeline ablate) at commit {commit[:7]}", "plan": args.plan, "seeds": args.seeds,
        "steps": args.steps, "crop": args.crop, "jobs": args.jobs, "sets": sets,
        "project_set": project_set, "cpu_count": os.cpu_count(),
        "machine": platform.machine(), "stage_one_seconds": round(stage_one_s, 1),
        "ablate_seconds": round(ablate_s, 1),
        "total_minutes": round((time.perf_counter() - start) / 60, 2),
        "report": report}, indent=2, allow_nan=True) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
