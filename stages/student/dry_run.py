"""What `pipeline train` would do, told before anything is loaded, trained or written.

The resolved configuration (every student and train setting, with where its value came
from: a flag, the parameters file, or the default), the data and modalities it would
read, the steps, the learning-rate schedule, the checkpoints it would write, whether it
would resume or start fresh (the same decision a run makes: `stages.student.resume`) and
a time estimate (`stages.student.estimate`). Needs neither weights nor data: what is not
there to read is said, never guessed.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

import yaml

from any2seg import datasets
from any2seg.errors import PipelineError
from stages.student.config import TrainConfig
from stages.student.estimate import estimate
from stages.student.model import StudentConfig

NESTED = {"train.loss", "train.augment", "student.mff"}  # groups expanded to their fields


def resolved(student: StudentConfig, cfg: TrainConfig) -> dict[str, dict[str, Any]]:
    """Every setting the run uses, nested groups expanded to all their fields (defaults
    included), as params.yaml would spell them."""
    train = asdict(cfg)
    train["loss"] = asdict(cfg.loss_config())
    train["augment"] = asdict(cfg.augment_config())
    stud = asdict(student)
    stud["mff"] = asdict(student.mff_config())
    return {"student": stud, "train": train}


def _lookup(params: dict[str, Any], dotted: str) -> tuple[bool, Any]:
    node: Any = params
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def sources(params: dict[str, Any], source: str, flags: dict[str, str],
            values: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Where each dotted key of `values` got its value: the flag that set it (`flags`:
    field -> flag), the parameters file `source` (with the key it was read from), or the
    default. --steps and --epochs each clear the other."""
    from_dataset = {"train.dataset": "dataset.name", "train.root": "dataset.root"}
    cleared = {"steps": "--epochs", "epochs": "--steps"}  # each flag clears the other
    out = {}
    for group, fields in values.items():
        for name, value in fields.items():
            keys = [f"{group}.{name}.{k}" for k in value] if f"{group}.{name}" in NESTED \
                else [f"{group}.{name}"]
            for key in keys:
                field = key.split(".")[1]
                if field in flags:
                    out[key] = flags[field]
                elif group == "train" and cleared.get(field) in flags.values():
                    out[key] = f"cleared by {cleared[field]}"
                elif _lookup(params, key)[0]:
                    out[key] = source
                elif key in from_dataset and _lookup(params, from_dataset[key])[0]:
                    out[key] = f"{source} ({from_dataset[key]})"
                else:
                    out[key] = "default"
    return out


def config_yaml(values: dict[str, dict[str, Any]], where: dict[str, str]) -> list[str]:
    """The resolved configuration as YAML, each leaf followed by `# where it came from`."""
    lines = []
    for group, fields in values.items():
        lines.append(f"{group}:")
        for name, value in fields.items():
            if f"{group}.{name}" in NESTED:
                lines.append(f"  {name}:")
                for k, v in value.items():
                    lines.append(_leaf(f"    {k}: {_flow(v)}", where[f"{group}.{name}.{k}"]))
            else:
                lines.append(_leaf(f"  {name}: {_flow(value)}", where[f"{group}.{name}"]))
    return lines


def _flow(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip() \
        .removesuffix("\n...").removesuffix("...").strip()


def _leaf(text: str, where: str) -> str:
    return f"{text:<40} # {where}"


def _device_kind(device: str) -> tuple[str, str]:
    """(cpu or cuda, how it was decided), without refusing a CUDA device that is absent."""
    if device == "auto":
        import torch

        kind = "cuda" if torch.cuda.is_available() else "cpu"
        return kind, f"auto: {kind} on this machine"
    return ("cuda" if device.startswith("cuda") else "cpu"), device


def _train_split(cfg: TrainConfig) -> tuple[int | None, str]:
    root = cfg.resolved_root()
    try:
        n = len(datasets.get(cfg.dataset).index(root, "train"))
    except (PipelineError, OSError) as exc:
        return None, f"{cfg.dataset} at {root}: not readable here ({str(exc).split(';')[0]})"
    return n, f"{cfg.dataset} at {root}: {n:,} train samples"


def _modalities(cfg: TrainConfig) -> tuple[list[str], str, Any]:
    """The modalities the run would train on, where that came from, and the open cache."""
    from any2seg.store import open_cache

    cache_path = cfg.resolved_cache()
    cache = None
    if cache_path.exists():
        try:
            cache = open_cache(cache_path)
        except PipelineError:
            cache = None
    if cfg.modalities:
        return list(cfg.modalities), "train.modalities", cache
    if cache is not None:
        return list(cache.modalities), f"those of the teacher cache {cache_path}", cache
    return (list(datasets.get(cfg.dataset).modalities),
            f"all of {cfg.dataset}'s; the teacher cache {cache_path} is not there to say", None)


def _every(total: int, every: int) -> int:
    """Events at multiples of `every` and at the last step."""
    return total // every + (1 if total % every else 0)


def resume_line(student: StudentConfig, cfg: TrainConfig, steps: int | None, cache: Any,
                mode: str | None) -> str:
    """What the run would do with OUT/last.pt, decided as the run decides."""
    from stages.student import train as _  # noqa: F401  (the modules a run fingerprints)
    from stages.student.checkpoint import cache_fingerprints
    from stages.student.code_version import code_fingerprint
    from stages.student.resume import decide

    last = cfg.resolved_out() / "last.pt"
    if not mode:
        return (f"fresh from step 0 (no --resume); {last} would be replaced"
                if last.exists() else "fresh from step 0 (no --resume)")
    if steps is None:
        return f"unknown: the step count is unknown, so whether {last} is finished is too"
    now: dict[str, Any] = {"student": asdict(student), "train": cfg.settings(),
                           "code": code_fingerprint()}
    caveat = ""
    if cache is not None:
        now["cache"] = cache_fingerprints(cache)
    elif last.is_file():  # compare the rest; say the cache could not be
        from stages.student.checkpoint import read_checkpoint_file

        recorded = read_checkpoint_file(last)
        now["cache"] = recorded.get("meta", {}).get("cache") if isinstance(recorded, dict) \
            else None
        caveat = (f" (if the teacher cache {cfg.resolved_cache()} is the one last.pt "
                  "recorded: it is not there to check)")
    try:
        decision = decide(last, now, steps, mode)
    except PipelineError as exc:
        return f"refused: {exc}"
    if decision.action == "resume":
        return f"resume {last} at step {decision.step:,} of {steps:,}{caveat}"
    if decision.action == "finished":
        return f"nothing to do: {last} has finished this run (step {decision.step:,}){caveat}"
    return f"fresh from step 0: {decision.why}" if decision.why else \
        f"fresh from step 0 ({last} does not exist)"


def describe(student: StudentConfig, cfg: TrainConfig, params: dict[str, Any], source: str,
             flags: dict[str, str], resume: str | None = None) -> str:
    """The whole dry run as text: configuration, then the plan."""
    values = resolved(student, cfg)
    lines = ["# pipeline train --dry-run: the resolved configuration (# where each value "
             "came from), then what the run would do; nothing is trained or written",
             *config_yaml(values, sources(params, source, flags, values)), ""]
    n_train, data = _train_split(cfg)
    modalities, why_mods, cache = _modalities(cfg)
    if cfg.steps:
        steps: int | None = cfg.steps
        how = "train.steps"
    elif n_train is not None:
        per_epoch = max(1, n_train // cfg.batch_size)
        steps = math.ceil(cfg.epochs * per_epoch)
        how = f"{cfg.epochs:g} epochs x {per_epoch:,} steps of {cfg.batch_size}"
    else:
        steps, how = None, f"{cfg.epochs:g} epochs of the train split, whose size is unknown"
    kind, device = _device_kind(cfg.device)
    est = estimate(kind, student.backbone, cfg.crop, cfg.batch_size, len(modalities), steps,
                   cfg.nproc)
    out = cfg.resolved_out()
    plan = [
        f"data: {data}",
        f"modalities: {', '.join(modalities)} ({why_mods})",
        f"device: {device}; {cfg.nproc} process{'es' if cfg.nproc > 1 else ''}",
        f"steps: {f'{steps:,}' if steps is not None else 'unknown'} ({how})",
    ]
    if steps is not None:
        warm = int(cfg.warmup * steps)
        plan.append(f"schedule: AdamW, {warm:,} warm-up steps from lr {cfg.lr * cfg.warmup_ratio:g}"
                    f" to {cfg.lr:g}, then poly {cfg.power:g} to 0 at step {steps:,}")
        vals = _every(steps, cfg.val_every) if cfg.val_every else 1
        val_at = f"every {cfg.val_every:,} steps and " if cfg.val_every else ""
        plan += [
            f"checkpoints: {out / 'last.pt'} every {cfg.checkpoint_every:,} steps and at the "
            f"end ({_every(steps, cfg.checkpoint_every):,} writes, each replacing the last; "
            "weights, optimiser, RNG states)",
            f"             {out / 'best.pt'} at each validation ({val_at}at the end: {vals:,})"
            " that improves val mIoU (weights only); dvclive log in "
            f"{out / 'dvclive'}",
        ]
    plan += [f"resume: {resume_line(student, cfg, steps, cache, resume)}",
             f"estimate: {est.line()}"]
    return "\n".join(lines + plan)
