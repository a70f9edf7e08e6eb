"""Modality isolation: whole scenes go to groups, so two groups never share a frame.

The official `divide_scene` (opencood/utils/heter_utils.py) deals scenes to groups in
turn; here the turn order is a seeded permutation of the sorted scene names, so the
split is balanced, reproducible and fixed for a run (it is written into every
checkpoint). A frame's scene is its id without the frame name (DELIVER and the sample:
condition/split/scene/frame). MCubeS has no scene folders (ids are split/frame), so
there every frame is its own scene: a frame split.

How a group uses the assignment is `codealign.split` (stages.CodeAlignRun.indices):
`dealt` trains each group on its scenes only; `all` trains each group on every training
scene, as each official run does (every CodeAlign training yaml under
hypes_yaml/opv2v/Heter_group/codebook/ lists one `heter_group`, so `divide_scene` hands
that group every scene).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from stages.student.data import StudentData

FRAME_SCENES = {"mcubes"}  # data sets without scene folders: a frame is its own scene


def scene_of(frame_id: str, dataset: str = "sample") -> str:
    if dataset in FRAME_SCENES:
        return frame_id
    return frame_id.rsplit("/", 1)[0] if "/" in frame_id else frame_id


def assign_groups(ids: Sequence[str], n_groups: int, seed: int, dataset: str = "sample"
                  ) -> list[int]:
    """Group index of every frame: scenes permuted by `seed`, dealt round-robin."""
    scenes = sorted({scene_of(i, dataset) for i in ids})
    order = np.random.default_rng([seed, n_groups]).permutation(len(scenes))
    group_of = {scenes[j]: pos % n_groups for pos, j in enumerate(order)}
    return [group_of[scene_of(i, dataset)] for i in ids]


def group_indices(assignment: Sequence[int], group: int) -> list[int]:
    return [i for i, g in enumerate(assignment) if g == group]


class GroupData(torch.utils.data.Dataset):
    """The frames of one group, each with only that group's modalities: `base` is built
    on exactly those modalities; item j is frame `indices[j]` of the split."""

    def __init__(self, base: StudentData, indices: Sequence[int]) -> None:
        self.base, self.indices = base, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: tuple[int, ...]) -> dict[str, torch.Tensor]:
        item = self.base[(key[0], self.indices[key[1]], *key[2:])]
        item["frame"] = torch.tensor(self.indices[key[1]])
        return item

