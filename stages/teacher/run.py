"""Stage one: run the frozen teachers once per sample into the zarr cache.

Every run first looks up the hashes of the files each sample is computed from
(`pipeline.content`, remembered by size and mtime) and reads the store once, checking
every chunk. The rows to compute are those not `done`, those whose input hash changed
since they were written (a done row's unremembered files are read to hash them), and,
with `--repair`, those in damaged shards. A computed row's unremembered files are
hashed from the read that decodes them, so a first run reads each input file once.
For each shard holding such rows: decode the samples and preprocess them for their
LanguageBind branch (in a thread pool, overlapping the model), caption them, encode
each modality (E_m) and the caption (E_S), and write the rows. The class names (E_C)
are encoded once when the store is created.
Compute batches are fixed subdivisions of a shard (of the store's batch size), and a
changed row is recomputed within its whole batch, so a resumed, updated, repaired or
distributed run does exactly the same arithmetic as a clean single-process build and
writes the same bytes.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline import datasets
from pipeline.config import Where, build, dataset_root, preset, preset_path
from pipeline.content import FileHashes, from_read
from pipeline.datasets import Sample, SampleSequence
from pipeline.datasets.decode import recording_digests
from pipeline.devices import DEVICE_FORMS, is_device, resolve_device
from pipeline.errors import PipelineError
from pipeline.store import (
    DTYPES,
    HASHES_NAME,
    CacheWriter,
    Dense,
    Plan,
    StoreSpec,
    TeacherCache,
    check_out_path,
    mismatches,
    plan,
    writer_lock,
)
from stages.teacher import captioners
from stages.teacher.checkpoints import (
    BRANCH_FOLDERS,
    auto_branch,
    checkpoint_fingerprint,
    own_branch,
    resolve_branch_dir,
)
from stages.teacher.codebook import (
    DENSE_FORMS,
    SphericalKMeans,
    assign,
    parse_dense,
    reconstruction_cosine,
)

if TYPE_CHECKING:
    import torch

log = logging.getLogger("pipeline.teacher")

PREPROCESS_VERSION = ("openai-mean-std bicubic-antialias short-side centre-crop; depth mm->m; "
                      "non-8-bit images over their value range; text ftfy+html+space clean v2")
AUTO = "auto"  # modality_branch (whole or per modality): own branch if present, else image
STORE_DTYPES = DTYPES
DENSE_TOKENS = ("last-layer patch tokens -> post_layernorm -> visual_projection -> L2; "
                "spherical mini-batch k-means, float16 codebook")
DENSE_VIEW = "short-side resize to image_size, centre crop, grid x grid patches"
# TeacherConfig fields that params.yaml keeps under another key
PARAMS_KEYS = {"dataset": "dataset.name", "root": "dataset.root", "teacher_root": "teacher.root"}
SCHEDULER_FORMS = "local:N (N >= 1 worker processes) or tcp://HOST:PORT"
_TCP = re.compile(r"tcp://(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(?P<port>\d{1,5})/?")


@dataclass
class TeacherConfig:
    """Every tunable of stage one (the `teacher` group of params.yaml plus the dataset)."""

    dataset: str = "sample"
    root: str | None = None
    split: list[str] = field(default_factory=lambda: ["train", "val", "test"])
    modalities: list[str] | None = None
    out: str | None = None
    teacher_root: str = "data/sample-teacher"  # as params.yaml (the fitted default teacher)
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
        if overrides.get("dataset") not in (None, cfg.dataset) and \
                overrides.get("root") is None:
            cfg.root = None  # params' root belongs to params' dataset
        for key, value in overrides.items():
            if value is None:
                continue
            if key == "modality_branch":  # each side named as the user set it
                _check_branches(Where("teacher", source), cfg.modality_branch)
                cfg._check_modalities(where, "modality_branch", list(value))
                value = {**cfg.explicit_branches(), **value}
            setattr(cfg, key, value)
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


def readable_class(name: str) -> str:
    """'TrafficSign' -> 'traffic sign', 'road_marking' -> 'road marking' (for prompts)."""
    spaced = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", name).replace("_", " ")
    return spaced.lower()


# ---------------------------------------------------------------------------------------
# the work on one shard (shared by the single-process and the dask paths)
# ---------------------------------------------------------------------------------------
@dataclass
class Prepared:
    """A decoded sample with its modalities already preprocessed for their branches."""

    sample: Sample
    pixels: dict[str, torch.Tensor]
    digests: dict[str, str] = field(default_factory=dict)  # files hashed as they were read


def model_input(sample: Sample, modality: str, branch: str) -> np.ndarray:
    if branch == "depth":
        depth = sample.raw.get(modality)
        if depth is None or depth.ndim != 2:
            source = sample.files.get(modality, "?")
            raise PipelineError(
                f"the depth branch needs single-channel 16-bit metric depth (mm) but {source} "
                f"is not; map {modality} to the image branch with --modality-branch "
                f"{modality}=image, or point the dataset at raw depth")
        return depth
    image = sample.modalities[modality]
    # 8-bit images go in as stored (the official ToTensor divides by 255); 16-bit and float
    # ones (raw depth, MCubeS AoLP / DoLP / NIR) as [0, 1] images over their value range
    return image if image.dtype == np.uint8 else sample.unit_image(modality)


class ShardWorker:
    """Teacher, captioner and dataset for one process; computes the rows of shards."""

    def __init__(self, cfg: TeacherConfig, samples: SampleSequence, device: str) -> None:
        import torch

        from stages.teacher.languagebind import LanguageBind

        self.cfg = cfg
        self.samples = samples
        self.branch_of = cfg.branch_map()
        compute_dtype = torch.float16 if device.startswith("cuda") else torch.float32
        self.teacher = LanguageBind(cfg.teacher_root, sorted(set(self.branch_of.values())),
                                    device=device, compute_dtype=compute_dtype)
        self.captioner = captioners.create(cfg.captioner, samples.classes,
                                           **cfg.captioner_options)
        self.model_seconds = 0.0
        self.codebooks: dict[str, np.ndarray] | None = None  # set to the store's (float16)

    def prepare(self, index: int, hash_files: bool = False) -> Prepared:
        """Decode and preprocess one sample; with `hash_files`, the sha256 of every file
        is taken from the read that decodes it (`Prepared.digests`)."""
        if not hash_files:
            sample = self.samples[index]
            digests: dict[str, str] = {}
        else:
            with recording_digests() as digests:
                sample = self.samples[index]
        pixels = {m: self.teacher.preprocess(b, model_input(sample, m, b))
                  for m, b in self.branch_of.items()}
        return Prepared(sample, pixels, digests)

    def compute(self, prepared: Sequence[Prepared], batch_size: int) -> tuple[
            list[str], np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray] | None]:
        """Captions, E_S, E_m and (with codebooks) patch codes for whole compute batches
        of a shard, `batch_size` at a time (`prepared` is a run of whole batches, only
        the shard's last one short)."""
        import torch

        start = time.perf_counter()
        captions: list[str] = []
        scene, visual = [], {m: [] for m in self.branch_of}
        codes: dict[str, list[np.ndarray]] = {m: [] for m in self.branch_of}
        bs = batch_size
        for i in range(0, len(prepared), bs):
            batch = prepared[i:i + bs]
            texts = self.captioner.caption([p.sample for p in batch])
            captions += texts
            scene.append(self.teacher.encode_text(texts))
            for m, b in self.branch_of.items():
                pixels = torch.stack([p.pixels[m] for p in batch])
                if self.codebooks is None:
                    visual[m].append(self.teacher.encode_pixels(b, pixels))
                else:
                    pooled, tokens = self.teacher.encode_pixels_dense(b, pixels)
                    visual[m].append(pooled)
                    codes[m].append(assign(tokens.numpy(), self.codebooks[m]))
        self.model_seconds += time.perf_counter() - start
        return (captions, torch.cat(scene).numpy(),
                {m: torch.cat(v).numpy() for m, v in visual.items()},
                None if self.codebooks is None else
                {m: np.concatenate(c) for m, c in codes.items()})

    def patch_tokens(self, indices: Sequence[int], batch_size: int
                     ) -> Iterator[dict[str, np.ndarray]]:
        """{modality: (n, h, w, D) patch tokens} for `indices`, one batch at a time."""
        import torch

        for i in range(0, len(indices), batch_size):
            prepared = [self.prepare(j) for j in indices[i:i + batch_size]]
            start = time.perf_counter()
            yield {m: self.teacher.encode_pixels_dense(
                b, torch.stack([p.pixels[m] for p in prepared]))[1].numpy()
                for m, b in self.branch_of.items()}
            self.model_seconds += time.perf_counter() - start

    def fit_codebooks(self) -> Dense:
        """Codebooks per modality by streamed spherical mini-batch k-means over the patch
        tokens of a seeded subset of the rows; reconstruction cosine on other rows."""
        cfg = self.cfg
        k = cfg.dense_k()
        assert k is not None
        n = len(self.samples)
        order = np.random.default_rng(cfg.dense_seed).permutation(n).tolist()
        heldout = min(cfg.dense_heldout, max(1, n // 5)) if n > 1 else 0
        fit_rows = sorted(order[heldout:heldout + cfg.dense_fit_samples])
        held_rows = sorted(order[:heldout])
        bs = cfg.batch_size
        kmeans = {m: SphericalKMeans(k, cfg.dense_seed) for m in self.branch_of}
        log.info("fitting %d-code codebooks on %d samples (%d passes)", k, len(fit_rows),
                 cfg.dense_passes)
        for tokens in self.patch_tokens(fit_rows, bs):
            for m, t in tokens.items():
                kmeans[m].init_update(t)
        for km in kmeans.values():
            km.check_init()
        for _ in range(cfg.dense_passes):
            for tokens in self.patch_tokens(fit_rows, bs):
                for m, t in tokens.items():
                    kmeans[m].update(t)
        books = {m: km.float16() for m, km in kmeans.items()}
        cosine = {m: float("nan") for m in self.branch_of}
        if held_rows:
            held = list(self.patch_tokens(held_rows, bs))
            cosine = {m: reconstruction_cosine((t[m] for t in held), books[m])
                      for m in self.branch_of}
        branch = next(iter(self.branch_of.values()))
        g = self.teacher.grid(branch)
        size = self.teacher.branches[branch].image_size
        fit = {"seed": cfg.dense_seed, "passes": cfg.dense_passes,
               "fit_samples": len(fit_rows), "heldout_samples": len(held_rows),
               "tokens_per_modality": len(fit_rows) * g * g,
               "empty_codes": {m: km.report(cfg.dense_passes).empty_codes
                               for m, km in kmeans.items()}}
        return Dense(k=k, grid=(g, g), codebooks=books, reconstruction_cosine=cosine, fit=fit,
                     view=DENSE_VIEW, image_size=size)

    def class_embeddings(self) -> np.ndarray:
        prompts = [self.cfg.class_prompt.format(readable_class(c)) for c in self.samples.classes]
        return self.teacher.encode_text(prompts).numpy()


# ---------------------------------------------------------------------------------------
# orchestration
# ---------------------------------------------------------------------------------------
def load_samples(cfg: TeacherConfig) -> SampleSequence:
    branch_of = cfg.branch_map()
    options: dict[str, Any] = {"modalities": list(branch_of), "skip_bad": cfg.skip_bad}
    if "depth" in branch_of and "raw" in datasets.get(cfg.dataset).depth_sources:
        # LanguageBind's depth branch reads metric depth; anything else reads HHA
        options["depth_source"] = "raw" if branch_of["depth"] == "depth" else "hha"
    return datasets.load(cfg.dataset, cfg.resolved_root(), cfg.split, **options)


def skipped_ids(cfg: TeacherConfig, samples: SampleSequence) -> list[str]:
    """Samples of the requested splits that `--skip-bad` dropped (recorded in the store, so
    stage two skips them too instead of calling the store another sample list)."""
    if not cfg.skip_bad:
        return []
    kept = set(samples.ids)
    indexed = datasets.get(cfg.dataset).index(cfg.resolved_root(), cfg.split)
    return [r.id for r in indexed if r.id not in kept]


def teacher_fingerprint(cfg: TeacherConfig, class_names: Sequence[str]) -> dict[str, Any]:
    """Everything that decides the cached numbers, without loading a model."""
    branch_of = cfg.branch_map()
    checkpoints = {b: checkpoint_fingerprint(resolve_branch_dir(cfg.teacher_root, b))
                   for b in sorted(set(branch_of.values()))}
    captioner = captioners.create(cfg.captioner, class_names, **cfg.captioner_options)
    return {
        "encoder": "languagebind",
        "checkpoints": checkpoints,
        "modality_branch": dict(sorted(branch_of.items())),
        "preprocess": PREPROCESS_VERSION,
        "class_prompt": cfg.class_prompt,
        "captioner": captioner.fingerprint(),
        **({"dense": {"kind": "codebook", "k": cfg.dense_k(), "tokens": DENSE_TOKENS,
                      "fit_samples": cfg.dense_fit_samples, "heldout": cfg.dense_heldout,
                      "passes": cfg.dense_passes, "seed": cfg.dense_seed}}
           if cfg.dense else {}),
    }


@dataclass
class RunReport:
    out: str
    rows: int
    computed_rows: int
    shards: int
    seconds: float
    model_seconds: float
    status: str
    samples_per_s: float = 0.0
    model_busy: float = 0.0
    model_waited: float = 0.0  # share of the loop the model waited for decoded samples
    decode_workers: int = 0
    new_rows: int = 0  # never computed before (or interrupted)
    changed_rows: int = 0  # recomputed because their files changed
    repaired_rows: int = 0  # recomputed because their chunks were damaged
    hashed_files: int = 0  # input files hashed (0 when none changed), most while decoded
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ShardJob:
    """Rows of one shard to write, and the whole compute batches that produce them."""

    shard: int
    compute: list[int]
    write: list[int]
    hashes: list[str | None]  # input hashes of the `write` rows (None: from the decoding)

    def hash_while_decoding(self) -> set[int]:
        """The rows whose input hash comes from the read that decodes their files."""
        return {r for r, h in zip(self.write, self.hashes, strict=True) if h is None}


def shard_jobs(writer: CacheWriter, rows: Sequence[int],
               input_hashes: Sequence[str | None], batch_size: int) -> list[ShardJob]:
    """Group rows by shard; recompute each row inside its whole compute batch, so its
    bytes equal a clean build's, and write exactly the rows asked for."""
    by_shard: dict[int, list[int]] = {}
    for r in rows:
        by_shard.setdefault(r // writer.rows_per_shard, []).append(r)
    jobs = []
    for shard, todo in sorted(by_shard.items()):
        span = writer.shard_rows(shard)
        batches = sorted({(r - span.start) // batch_size for r in todo})
        compute = [r for b in batches
                   for r in range(span.start + b * batch_size,
                                  min(span.start + (b + 1) * batch_size, span.stop))]
        todo = sorted(todo)
        jobs.append(ShardJob(shard, compute, todo, [input_hashes[r] for r in todo]))
    return jobs


def run_job(worker: ShardWorker, writer: CacheWriter, job: ShardJob,
            prepared: Sequence[Prepared]) -> dict[str, str]:
    """Compute and write the job's rows; returns the digests of the files hashed while
    they were decoded ({absolute path: sha256}, for `FileHashes.learn`)."""
    captions, scene, visual, codes = worker.compute(prepared, writer.batch_size)
    pick = [job.compute.index(r) for r in job.write]
    read: dict[str, str] = {}
    for p in prepared:
        read.update(p.digests)
    hashes = []
    for r, i, h in zip(job.write, pick, job.hashes, strict=True):
        if h is None:
            h, extra = from_read(worker.samples.records[r].files, prepared[i].digests)
            read.update(extra)
        hashes.append(h)
    writer.write_rows(job.write, [captions[i] for i in pick], scene[pick],
                      {m: v[pick] for m, v in visual.items()}, hashes,
                      None if codes is None else {m: c[pick] for m, c in codes.items()})
    return read


def cache_teacher(cfg: TeacherConfig,
                  progress: Callable[[int, int], None] | None = None) -> RunReport:
    """Build, finish, update or repair the store at `cfg.resolved_out()` (module docstring).

    A store with nothing to do is only read: no lock, no model, nothing written into it
    (a read-only complete store is fine)."""
    cfg.validate()  # before anything is loaded or locked
    start = time.perf_counter()
    out = cfg.resolved_out()
    check_out_path(out)
    samples = load_samples(cfg)
    hashes = FileHashes(out / HASHES_NAME)
    spec = StoreSpec(ids=samples.ids, modalities=list(cfg.branch_map()),
                     teacher_fingerprint=teacher_fingerprint(cfg, samples.classes),
                     dtype=cfg.dtype, rows_per_shard=cfg.rows_per_shard,
                     batch_size=cfg.batch_size, skipped=skipped_ids(cfg, samples))
    if not cfg.overwrite:
        existing, todo, input_hashes = _inspect(cfg, out, spec, samples, hashes)
        if existing is not None and todo.empty:
            if out.is_dir():
                hashes.save()
            return RunReport(str(out), existing.n, 0, 0, time.perf_counter() - start, 0.0,
                             "complete", hashed_files=hashes.hashed)
    with writer_lock(out):
        existing, todo, input_hashes = _inspect(cfg, out, spec, samples, hashes)
        if existing is not None and todo.empty:  # another run finished it meanwhile
            return RunReport(str(out), existing.n, 0, 0, time.perf_counter() - start, 0.0,
                             "complete", hashed_files=hashes.hashed)
        writer = None
        if existing is not None:
            writer = CacheWriter(out)
            writer.remove_partials()
            writer.discard(todo.damages)
            if writer.rows_per_shard != cfg.rows_per_shard:
                log.info("updating with the store's rows_per_shard=%d", writer.rows_per_shard)
            if writer.batch_size != cfg.batch_size:
                log.info("updating with the store's batch_size=%d (the batches it was built "
                         "with, so recomputed rows equal a clean build)", writer.batch_size)
        for note in cfg.auto_fallbacks():  # once, where models are about to be loaded
            log.info(note)
        device = cfg.resolved_device()
        if cfg.scheduler:
            report = _run_distributed(cfg, samples, spec, writer, todo, input_hashes, out,
                                      device, hashes, progress)
        else:
            report = _run_local(cfg, samples, spec, writer, todo, input_hashes, out, device,
                                hashes, progress)
        hashes.save()
    if writer is not None:
        report.new_rows, report.changed_rows = len(todo.new), len(todo.changed)
        report.repaired_rows = len(todo.damaged)
    else:
        report.new_rows = report.computed_rows
    report.hashed_files = hashes.hashed
    report.seconds = time.perf_counter() - start
    report.samples_per_s = report.computed_rows / report.seconds if report.seconds else 0.0
    return report


def _inspect(cfg: TeacherConfig, out: Path, spec: StoreSpec, samples: SampleSequence,
             hashes: FileHashes) -> tuple[TeacherCache | None, Plan, list[str | None]]:
    """The existing store (None: create a new one), what it needs, and the input hashes.
    Reads only. A row whose files' digests are not remembered gets None, unless it is
    done and must be compared with the store: a row that is computed takes its hash
    from the read that decodes its files (`run_job`), so a first run reads each once."""
    files = [r.files for r in samples.records]
    input_hashes = hashes.lookup(files)
    if cfg.overwrite:
        return None, Plan(), input_hashes
    cache, problems = mismatches(out, spec)
    if problems and cfg.on_mismatch != "rebuild":
        raise PipelineError(f"{out} was built differently: {' | '.join(problems)}; pass "
                            "--overwrite to rebuild it, or choose another --out")
    if cache is None or problems:
        return None, Plan(), input_hashes
    big = cache.num_shards >= 32  # a progress bar only where the scan takes a while
    todo = plan(cache, input_hashes, cfg.repair, show=big,
                complete=lambda rows: hashes.complete(files, input_hashes, rows))
    books = [name for name in todo.static if name.startswith("codebook/")]
    if books:  # refused before anything (the damaged file included) is touched
        raise PipelineError(f"{out}: {', '.join(books)} is damaged; every code of the store "
                            "was assigned against it, so it cannot be refitted in place: "
                            "rebuild the store with `pipeline cache-teacher --overwrite`")
    return cache, todo, input_hashes


def _create(worker: ShardWorker, out: Path, spec: StoreSpec) -> CacheWriter:
    # dataset and splits let stage two re-derive the sample list and check the fingerprint;
    # root and teacher_root let a damage message print a working --repair command
    cfg = worker.cfg
    dense = worker.fit_codebooks() if cfg.dense else None
    return CacheWriter.create(out, spec, worker.teacher.dim, worker.samples.classes,
                              worker.class_embeddings(),
                              {"dataset": cfg.dataset, "splits": list(cfg.split),
                               "root": str(cfg.resolved_root()),
                               "teacher_root": str(cfg.teacher_root)}, dense)


def use_codebooks(worker: ShardWorker, writer: CacheWriter) -> None:
    """Codes are always assigned against the store's own float16 codebooks."""
    if writer.dense is not None:
        worker.codebooks = {m: writer.codebook(m) for m in writer.modalities}


def _repair_static(worker: ShardWorker | None, writer: CacheWriter, spec: StoreSpec,
                   todo: Plan, samples: SampleSequence, cfg: TeacherConfig,
                   device: str) -> None:
    """Rewrite damaged arrays fixed at creation (E_C needs the text encoder)."""
    if not todo.static:
        return
    classes = np.zeros((0, 0), np.float32)
    if "classes" in todo.static:
        classes = (worker or ShardWorker(cfg, samples, device)).class_embeddings()
    writer.write_static(spec, samples.classes, classes, todo.static)
    log.info("rewrote the damaged %s of %s", ", ".join(todo.static), writer.path)


def _prefetch(worker: ShardWorker, jobs: list[ShardJob], pool: ThreadPoolExecutor,
              depth: int = 2, waited: list[float] | None = None
              ) -> Iterator[tuple[ShardJob, list[Prepared]]]:
    """Yield (job, prepared samples) while the next `depth` jobs decode in `pool`;
    `waited[0]` sums the seconds the caller (the model) waited for decoded samples."""
    queue: list[tuple[ShardJob, list[Future[Prepared]]]] = []
    it = iter(jobs)

    def submit() -> None:
        job = next(it, None)
        if job is not None:
            hashed = job.hash_while_decoding()
            queue.append((job, [pool.submit(worker.prepare, i, i in hashed)
                                for i in job.compute]))

    for _ in range(depth):
        submit()
    while queue:
        job, futures = queue.pop(0)
        submit()
        start = time.perf_counter()
        prepared = [f.result() for f in futures]
        if waited is not None:
            waited[0] += time.perf_counter() - start
        yield job, prepared


def _run_local(cfg: TeacherConfig, samples: SampleSequence, spec: StoreSpec,
               writer: CacheWriter | None, todo: Plan, input_hashes: Sequence[str | None],
               out: Path, device: str, hashes: FileHashes,
               progress: Callable[[int, int], None] | None) -> RunReport:
    worker = ShardWorker(cfg, samples, device)
    if writer is None:
        writer = _create(worker, out, spec)
        rows: list[int] = list(range(writer.n))
    else:
        _repair_static(worker, writer, spec, todo, samples, cfg, device)
        rows = todo.rows
    use_codebooks(worker, writer)
    jobs = shard_jobs(writer, rows, input_hashes, writer.batch_size)
    total = sum(len(j.write) for j in jobs)
    done_rows = 0
    loop_start = time.perf_counter()
    threads = decode_threads(cfg)
    waited = [0.0]
    with ThreadPoolExecutor(threads) as pool:
        for job, prepared in _prefetch(worker, jobs, pool, waited=waited):
            hashes.learn(run_job(worker, writer, job, prepared))
            done_rows += len(job.write)
            if progress:
                progress(done_rows, total)
    loop = time.perf_counter() - loop_start
    report = RunReport(str(out), writer.n, done_rows, len(jobs), 0.0, worker.model_seconds,
                       "written", model_busy=worker.model_seconds / loop if loop else 0.0,
                       model_waited=waited[0] / loop if loop else 0.0, decode_workers=threads)
    writer.touch()
    record_run(writer, report)
    return report


def decode_threads(cfg: TeacherConfig) -> int:
    """Decode workers: `teacher.decode_workers`, or 0 for one per CPU core (at least
    4). Threads, not processes: libpng (`decode_png`) and PIL decode, hashlib and torch's
    resizes release the GIL: two decode threads wait for it 1-2 % of their time (two
    processes 0 %, a pure Python control 19-27 %), and processes would only add sending
    the tensors back (benchmarks/decode_workers.py, docs/performance.md)."""
    return cfg.decode_workers or max(4, os.cpu_count() or 1)


def record_run(writer: CacheWriter, report: RunReport) -> None:
    """The last run's throughput and the model's waiting share, for `cache-info`."""
    writer.group.attrs["last_run"] = {
        "rows": report.computed_rows, "model_busy": round(report.model_busy, 4),
        "model_waited": round(report.model_waited, 4),
        "decode_workers": report.decode_workers}


# -- dask.distributed ---------------------------------------------------------------------
_WORKER_STATE: dict[str, tuple[ShardWorker, CacheWriter]] = {}


def _shard_task(cfg_dict: dict[str, Any], out: str, device: str, threads: int,
                job: ShardJob) -> tuple[int, int, float, dict[str, str]]:
    """Runs on a dask worker: load the teacher once per process, compute one shard's rows."""
    key = repr((sorted(cfg_dict.items()), out, device))
    if key not in _WORKER_STATE:
        import torch

        torch.set_num_threads(threads)
        cfg = TeacherConfig(**cfg_dict)
        worker = ShardWorker(cfg, load_samples(cfg), device)
        writer = CacheWriter(Path(out))
        use_codebooks(worker, writer)
        _WORKER_STATE[key] = (worker, writer)
    worker, writer = _WORKER_STATE[key]
    before = worker.model_seconds
    hashed = job.hash_while_decoding()
    prepared = [worker.prepare(i, i in hashed) for i in job.compute]
    read = run_job(worker, writer, job, prepared)
    return job.shard, len(job.write), worker.model_seconds - before, read


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


def _client(scheduler: str) -> tuple[Any, Any]:
    """A dask client (and the cluster it started, for local:N). A tcp:// scheduler that does
    not answer within dask's connect timeout fails in one line."""
    import dask
    from dask.distributed import Client, LocalCluster

    kind, value = parse_scheduler(scheduler)
    if kind == "local":
        cluster = LocalCluster(n_workers=int(value), threads_per_worker=1, processes=True,
                               dashboard_address=None, silence_logs=logging.ERROR)
        return Client(cluster), cluster
    timeout = dask.config.get("distributed.comm.timeouts.connect")
    try:
        return Client(scheduler, timeout=timeout), None
    except OSError as exc:  # TimeoutError included
        raise PipelineError(
            f"cannot reach the dask scheduler at {scheduler} within {timeout} "
            f"({str(exc).splitlines()[0]}); start one there with `dask scheduler`, or wait "
            "longer with DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT=120s") from exc


def _run_distributed(cfg: TeacherConfig, samples: SampleSequence, spec: StoreSpec,
                     writer: CacheWriter | None, todo: Plan,
                     input_hashes: Sequence[str | None], out: Path, device: str,
                     hashes: FileHashes,
                     progress: Callable[[int, int], None] | None) -> RunReport:
    from dask.distributed import as_completed

    environ = dict(os.environ)  # dask sets OMP/MKL_NUM_THREADS=1 here for its workers
    client = cluster = None
    try:
        client, cluster = _client(cfg.scheduler or "")  # reachable before anything is written
        if writer is None:
            # the coordinator creates the store (and E_C) once; workers only fill shards
            creator = ShardWorker(cfg, samples, device)
            writer = _create(creator, out, spec)
            del creator
            rows: list[int] = list(range(writer.n))
        else:
            _repair_static(None, writer, spec, todo, samples, cfg, device)
            rows = todo.rows
        jobs = shard_jobs(writer, rows, input_hashes, writer.batch_size)
        total = sum(len(j.write) for j in jobs)
        n_workers = max(1, len(client.scheduler_info()["workers"]))
        threads = max(1, (os.cpu_count() or 1) // n_workers)
        cfg_dict = {**asdict(cfg), "scheduler": None, "overwrite": False, "repair": False,
                    "root": str(cfg.resolved_root()), "out": str(out)}
        futures = [client.submit(_shard_task, cfg_dict, str(out), device, threads, job,
                                 pure=False, key=f"teacher-shard-{job.shard}") for job in jobs]
        done_rows, model_s = 0, 0.0
        for fut in as_completed(futures):
            _, n_rows, seconds, read = fut.result()
            hashes.learn(read)
            done_rows += n_rows
            model_s += seconds
            if progress:
                progress(done_rows, total)
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
        os.environ.clear()
        os.environ.update(environ)
    writer.touch()
    return RunReport(str(out), writer.n, done_rows, len(jobs), 0.0, model_s, "written",
                     extra={"workers": n_workers})
