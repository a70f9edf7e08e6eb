"""The work on one shard, shared by the local and the dask runner: decode and preprocess
samples (`Prepared`, `model_input`), caption and encode them (`ShardWorker`), write the rows
(`ShardJob`, `run_job`), and create a store or rewrite its damaged static arrays."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from any2seg import datasets
from any2seg.content import from_read
from any2seg.datasets import Sample, SampleSequence
from any2seg.datasets.decode import recording_digests
from any2seg.errors import PipelineError
from any2seg.store import CacheWriter, Dense, Plan, StoreSpec
from stages.teacher import captioners
from stages.teacher.codebook import SphericalKMeans, assign, reconstruction_cosine
from stages.teacher.config import TeacherConfig

if TYPE_CHECKING:
    import torch

log = logging.getLogger("pipeline.teacher")

DENSE_VIEW = "short-side resize to image_size, centre crop, grid x grid patches"


def readable_class(name: str) -> str:
    """'TrafficSign' -> 'traffic sign', 'road_marking' -> 'road marking' (for prompts)."""
    spaced = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", name).replace("_", " ")
    return spaced.lower()


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


def load_samples(cfg: TeacherConfig) -> SampleSequence:
    branch_of = cfg.branch_map()
    options: dict[str, Any] = {"modalities": list(branch_of), "skip_bad": cfg.skip_bad}
    if "depth" in branch_of and "raw" in datasets.get(cfg.dataset).depth_sources:
        # LanguageBind's depth branch reads metric depth; anything else reads HHA
        options["depth_source"] = "raw" if branch_of["depth"] == "depth" else "hha"
    return datasets.load(cfg.dataset, cfg.resolved_root(), cfg.split, **options)


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


def create_store(worker: ShardWorker, out: Path, spec: StoreSpec) -> CacheWriter:
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


def repair_static(worker: ShardWorker | None, writer: CacheWriter, spec: StoreSpec,
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
