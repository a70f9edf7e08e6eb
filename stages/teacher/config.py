"""Stage one's settings: `TeacherConfig` (the `teacher` group of params.yaml plus the dataset)
and the checks that name the key or flag of a bad value before anything is loaded."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from any2seg import datasets
from any2seg.config import (
    DEFAULT_DATASET,
    Where,
    apply_overrides,
    build,
    dataset_root,
    preset,
    preset_path,
)
from any2seg.devices import DEVICE_FORMS, is_device, resolve_device
from any2seg.errors import PipelineError
from any2seg.store import DTYPES
from stages.teacher import captioners
from stages.teacher.checkpoints import BRANCH_FOLDERS, auto_branch, own_branch
from stages.teacher.codebook import DENSE_FORMS, parse_dense
from stages.teacher.default import FOLDER as DEFAULT_TEACHER

AUTO = "auto"  # modality_branch (whole or per modality): own branch if present, else image
STORE_DTYPES = DTYPES
# TeacherConfig fields that params.yaml keeps under another key
PARAMS_KEYS = {"dataset": "dataset.name", "root": "dataset.root", "teacher_root": "teacher.root"}
SCHEDULER_FORMS = "local:N (N >= 1 worker processes) or tcp://HOST:PORT"
_TCP = re.compile(r"tcp://(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(?P<port>\d{1,5})/?")


@dataclass
class TeacherConfig:
    """Every tunable of stage one (the `teacher` group of params.yaml plus the dataset)."""

    dataset: str = DEFAULT_DATASET
    root: str | None = None
    split: list[str] = field(default_factory=lambda: ["train", "val", "test"])
    modalities: list[str] | None = None
    out: str | None = None
    teacher_root: str = DEFAULT_TEACHER  # the fitted default teacher
    captioner: str = "template"
    captioner_options: dict[str, Any] = field(default_factory=dict)
    modality_branch: dict[str, str] | str = AUTO
    class_prompt: str = "{}"
    batch_size: int = 16
    rows_per_shard: int = 64
    device: str = "auto"
    dtype: str = "float16"
    scheduler: str | None = None
    decode_workers: int = 0  # 0: max(4, CPU cores)
    skip_bad: bool = False
    overwrite: bool = False  # rebuild the whole store
    repair: bool = False  # recompute rows in damaged shards
    on_mismatch: str = "refuse"  # or "rebuild": a store built differently is rebuilt
    dense: str | None = None  # codebook:K -> per-modality codebooks and patch codes
    dense_fit_samples: int = 256  # samples whose patch tokens fit the codebooks
    dense_heldout: int = 32  # other samples on which reconstruction cosine is measured
    dense_passes: int = 2  # k-means passes over the fit samples
    dense_seed: int = 0

    @classmethod
    def from_params(cls, params: dict[str, Any], overrides: dict[str, Any],
                    source: str = "params.yaml", flags: dict[str, str] | None = None
                    ) -> TeacherConfig:
        """Defaults, then params.yaml (`dataset.name/root`, `teacher.*`), then CLI flags;
        `flags` names the flag of each overridden field for error messages.

        `--modality-branch` entries are added to params' `teacher.modality_branch`, whose
        entries for modalities this run does not use are ignored."""
        data: dict[str, Any] = {}
        ds = params.get("dataset") or {}
        if "name" in ds:
            data["dataset"] = ds["name"]
        if "root" in ds:
            data["root"] = ds["root"]
        teacher = dict(params.get("teacher") or {})
        teacher.pop("fit", None)  # the default teacher's fitting (`pipeline fit-teacher`)
        if "root" in teacher:
            teacher["teacher_root"] = teacher.pop("root")
        data.update(teacher)
        where = Where("teacher", source, flags, PARAMS_KEYS)
        cfg = build(cls, data, Where("teacher", source, keys=PARAMS_KEYS))
        branches = overrides.get("modality_branch")
        apply_overrides({k: v for k, v in overrides.items() if k != "modality_branch"}, cfg)
        if branches is not None:  # each side named as the user set it
            _check_branches(Where("teacher", source), cfg.modality_branch)
            cfg._check_modalities(where, "modality_branch", list(branches))
            cfg.modality_branch = {**cfg.explicit_branches(), **branches}
        cfg.validate(where)
        return cfg

    def validate(self, where: Where | None = None) -> None:
        """Every value checked before a model is loaded or a store is touched."""
        w = where or Where("teacher", None)
        w.integer("batch_size", self.batch_size, 1, 65536, why="samples per model batch")
        w.integer("rows_per_shard", self.rows_per_shard, 1)
        w.integer("decode_workers", self.decode_workers, 0, why="0: max(4, CPU cores)")
        w.one_of("dtype", self.dtype, STORE_DTYPES)
        if "{}" not in self.class_prompt:
            w.fail("class_prompt", "a text with {} for the class name", self.class_prompt)
        if not is_device(self.device):
            w.fail("device", "one of " + ", ".join(DEVICE_FORMS), self.device)
        if self.scheduler is not None:
            parse_scheduler(self.scheduler, w)
        w.one_of("on_mismatch", self.on_mismatch, ("refuse", "rebuild"))
        if self.dense is not None:
            try:
                parse_dense(str(self.dense))
            except ValueError:
                w.fail("dense", DENSE_FORMS + ", or null for no dense codes", self.dense)
            w.integer("dense_fit_samples", self.dense_fit_samples, 1)
            w.integer("dense_heldout", self.dense_heldout, 1)
            w.integer("dense_passes", self.dense_passes, 1, why="k-means passes")
            w.integer("dense_seed", self.dense_seed, 0, 2 ** 32 - 1, why="numpy's seed range")
        if self.captioner not in captioners.available():
            raise PipelineError(f"{w.key('captioner')}: unknown captioner {self.captioner!r}; "
                                f"available: {', '.join(captioners.available())}")
        if not self.split:
            w.fail("split", "one or more split names", self.split)
        if self.modalities is not None:
            self._check_modalities(w, "modalities", self.modalities)
            if not self.modalities or len(set(self.modalities)) < len(self.modalities):
                w.fail("modalities", "distinct modality names", self.modalities)
        _check_branches(w, self.modality_branch)

    def _check_modalities(self, where: Where, name: str, modalities: list[str]) -> None:
        """Name the first modality the dataset does not have."""
        known = datasets.get(self.dataset).modalities
        unknown = [m for m in modalities if m not in known]
        if unknown:
            raise PipelineError(f"{where.key(name)} names {unknown[0]!r}, which dataset "
                                f"{self.dataset} does not have; its modalities: "
                                f"{', '.join(known)}")

    def resolved_root(self) -> Path:
        return dataset_root(self.dataset, self.root)

    def resolved_out(self) -> Path:
        return Path(self.out or f"cache/{self.dataset}.zarr")

    def resolved_modalities(self) -> list[str]:
        if self.modalities:
            return list(self.modalities)
        found = preset("datasets", self.dataset) if preset_path("datasets", self.dataset) \
            else {}
        return list(found.get("modalities") or datasets.get(self.dataset).modalities)

    def explicit_branches(self) -> dict[str, str]:
        """The modality -> branch entries set by name (`auto` ones and `auto` itself: none)."""
        if isinstance(self.modality_branch, str):
            return {}
        return {m: b for m, b in self.modality_branch.items() if b != AUTO}

    def branch_map(self, fitting: bool = False) -> dict[str, str]:
        """Modality -> LanguageBind branch for the modalities of this run (entries of
        `modality_branch` for other modalities do not matter). A modality left to `auto`
        takes its own branch when the teacher root has it, else the image branch; when
        `fitting` the default teacher, its own branch (the fit makes it)."""
        return self._branches(fitting)[0]

    def auto_fallbacks(self) -> list[str]:
        """One line per modality that `auto` maps to the image branch, and why."""
        return self._branches()[1]

    def _branches(self, fitting: bool = False) -> tuple[dict[str, str], list[str]]:
        explicit = self.explicit_branches()
        mapping, notes = {}, []
        for m in self.resolved_modalities():
            branch = explicit.get(m)
            if branch is None and fitting:
                branch = own_branch(m) or "image"
            elif branch is None:
                branch, note = auto_branch(self.teacher_root, m)
                if note:
                    notes.append(note)
            if branch not in BRANCH_FOLDERS:
                raise PipelineError(f"modality {m} maps to unknown branch {branch!r}; "
                                    f"branches: {', '.join(BRANCH_FOLDERS)}")
            mapping[m] = branch
        return mapping, notes

    def resolved_device(self) -> str:
        return resolve_device(self.device)

    def dense_k(self) -> int | None:
        return parse_dense(self.dense) if self.dense else None


def _check_branches(where: Where, modality_branch: dict[str, str] | str) -> None:
    """`auto`, or known branches (or `auto`) for modalities that some registered dataset
    has: an entry for another dataset's modality is fine (params.yaml serves several), a
    typo is not."""
    key = where.key("modality_branch")
    if isinstance(modality_branch, str):
        if modality_branch != AUTO:
            raise PipelineError(f"{key} must be auto or a mapping of modality to branch "
                                f"({', '.join(BRANCH_FOLDERS)}), got {modality_branch!r}")
        return
    every = {m for name in datasets.available() for m in datasets.get(name).modalities}
    for modality, branch in modality_branch.items():
        if branch == AUTO:
            continue
        if modality not in every:
            raise PipelineError(f"{key} names {modality!r}, which no registered dataset has "
                                f"(modalities: {', '.join(sorted(every))})")
        if branch not in BRANCH_FOLDERS:
            raise PipelineError(f"{key} maps {modality} to unknown branch {branch!r}; "
                                f"branches: {', '.join(BRANCH_FOLDERS)}")


def parse_scheduler(value: str, where: Where | None = None) -> tuple[str, int] | tuple[str, str]:
    """`local:N` -> ("local", N); `tcp://HOST:PORT` -> ("tcp", the address). Checked before
    anything is loaded: `local:0` would start a cluster with no worker and wait forever."""
    where = where or Where("teacher", None)
    if value.startswith("local:"):
        n = value.removeprefix("local:")
        if not n.isdigit() or int(n) < 1:
            where.fail("scheduler", SCHEDULER_FORMS, value)
        return "local", int(n)
    match = _TCP.fullmatch(value)
    if match is None or not 1 <= int(match["port"]) <= 65535:
        where.fail("scheduler", SCHEDULER_FORMS, value)
    return "tcp", value
