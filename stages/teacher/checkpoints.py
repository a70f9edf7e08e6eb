"""Where LanguageBind checkpoints live and what identifies them, without loading them.

Kept free of torch and transformers so that a rerun on a complete cache can check its
fingerprint in well under a second.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

from any2seg.errors import PipelineError

BRANCH_FOLDERS = {"image": "LanguageBind_Image", "depth": "LanguageBind_Depth",
                  "thermal": "LanguageBind_Thermal",
                  # no published LanguageBind tower exists for these two: the embedded
                  # default teacher fits them (stages/teacher/default/fit.py) in the same format
                  "event": "LanguageBind_Event", "lidar": "LanguageBind_Lidar"}
PUBLISHED = ("image", "depth", "thermal")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json",
                   "special_tokens_map.json", "tokenizer.json")


def resolve_branch_dir(teacher_root: str | Path, branch: str) -> Path:
    """Folder of one branch: `<root>/LanguageBind_<Branch>` or a hub id's local snapshot.

    `teacher_root` is either a folder holding the hub folder names (as
    `hf download LanguageBind/LanguageBind_Depth --local-dir
    DIR/LanguageBind_Depth` leaves them) or a hub namespace such as `LanguageBind`.
    """
    if branch not in BRANCH_FOLDERS:
        raise PipelineError(f"unknown LanguageBind branch {branch!r}; branches: "
                            f"{', '.join(BRANCH_FOLDERS)}")
    folder = BRANCH_FOLDERS[branch]
    if Path(teacher_root).is_file():
        raise PipelineError(f"teacher root {teacher_root} (--teacher-root or teacher.root) is "
                            f"a file, not a folder; give the folder holding {folder}/")
    local = Path(teacher_root) / folder
    if local.is_dir():
        return local
    if branch not in PUBLISHED:
        raise PipelineError(
            f"no {folder}/ under teacher root {teacher_root}: LanguageBind publishes no "
            f"{branch} tower; map the modality to the image branch (--modality-branch "
            f"{branch}=image, or teacher.modality_branch in params.yaml), or use the fitted "
            "default teacher (`pipeline fit-teacher`), which has one")
    root_str = str(teacher_root)
    looks_like_hub = (not Path(teacher_root).exists() and root_str.count("/") == 0
                      and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", root_str) is not None)
    if looks_like_hub:
        repo_id = f"{root_str}/{folder}"
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(repo_id, local_files_only=True))
        except Exception:  # noqa: BLE001 - any hub failure gets the same instructions
            pass
        if not os.environ.get("HF_HUB_OFFLINE"):
            try:
                from huggingface_hub import snapshot_download

                return Path(snapshot_download(repo_id))
            except Exception:  # noqa: BLE001
                pass
        raise PipelineError(
            f"LanguageBind weights {repo_id} are not in the local Hugging Face cache and "
            f"cannot be downloaded here; fetch them on a machine with network access with "
            f"`hf download {repo_id} --local-dir DIR/{folder}` and pass "
            f"--teacher-root DIR")
    raise PipelineError(
        f"no {folder}/ under teacher root {teacher_root}; download it with "
        f"`hf download LanguageBind/{folder} --local-dir "
        f"{Path(teacher_root) / folder}` (or, for the sample, fit the default teacher with "
        f"`pipeline fit-teacher --out {teacher_root}`)")


def own_branch(modality: str) -> str | None:
    """The LanguageBind branch named after a modality (rgb -> image), None if there is none."""
    branch = "image" if modality == "rgb" else modality
    return branch if branch in BRANCH_FOLDERS else None


def branch_available(teacher_root: str | Path, branch: str) -> bool:
    """Whether `resolve_branch_dir` finds `branch` here without downloading anything: the
    folder under the root, or, for a hub namespace, a snapshot in the local cache."""
    folder = BRANCH_FOLDERS[branch]
    if (Path(teacher_root) / folder).is_dir():
        return True
    root_str = str(teacher_root)
    if branch not in PUBLISHED or Path(teacher_root).exists() or "/" in root_str:
        return False
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(f"{root_str}/{folder}", local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached (or no hub client): not available
        return False
    return True


def auto_branch(teacher_root: str | Path, modality: str) -> tuple[str, str | None]:
    """`modality_branch: auto` for one modality: its own `LanguageBind_<Modality>` branch
    when the teacher has one, else the image branch; with the reason for a fallback."""
    own = own_branch(modality)
    if own is None:  # no branch by that name exists anywhere: image is the only reading
        return "image", None
    if own == "image" or branch_available(teacher_root, own):
        return own, None
    return "image", f"{modality} -> image: no {BRANCH_FOLDERS[own]} under {teacher_root}"


def weights_file(folder: Path) -> Path:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise PipelineError(f"no {' or '.join(WEIGHT_FILES)} in {folder}; the download is "
                        "incomplete: download the folder again")


def quick_hash(path: Path, block: int = 8 << 20) -> str:
    """sha256 of the size, the first and the last 8 MiB: cheap for 1.7 GB checkpoints,
    and any re-export or fine-tune changes it."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(block))
        if size > 2 * block:
            f.seek(size - block)
        h.update(f.read(block))
    return h.hexdigest()[:16]


def checkpoint_fingerprint(folder: Path) -> dict[str, Any]:
    """What identifies a branch checkpoint in the cache's teacher fingerprint."""
    weights = weights_file(folder)
    tok = hashlib.sha256()
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            tok.update(name.encode())
            tok.update((folder / name).read_bytes())
    return {
        "folder": folder.name,
        "config": hashlib.sha256((folder / "config.json").read_bytes()).hexdigest()[:16],
        "weights": f"{weights.name}:{quick_hash(weights)}",
        "tokenizer": tok.hexdigest()[:16],
    }
