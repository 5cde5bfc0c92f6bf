"""The trainer's image pipeline: image sources, decoding, and deterministic per-rank step batches.

The trainer runs under torchrun and must resume (or re-shard to another world size) onto exactly the
same global batches, so every random choice here is a function of ``(seed, step, sample index)``:

* the global batch of optimizer step ``s`` is :func:`batch_indices` ``(s, global_batch, n, seed)``:
  consecutive positions through per-epoch permutations seeded by ``(seed, epoch)``; there is no
  sampler state to save, the data position *is* the step;
* rank ``r`` of ``W`` takes the contiguous slice ``[r*B/W, (r+1)*B/W)`` of it, so the union over ranks
  is the global batch whatever ``W`` is;
* decoding is deterministic (no augmentation here), so DataLoader worker seeding does not matter.

A file that cannot be decoded never stops a run: it comes back as a zero image with ``valid=False``,
the batch shape stays fixed (no re-sampling, which would make steps depend on which files are bad),
and the trainer drops those samples' losses with the ``valid`` weight mask. :class:`DataStats`
counts them so the trainer can log ``skipped_images`` (per rank; all-reduce for a global count).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
SYNTHETIC_SPEC = "synthetic"
EPOCH_SEED_STRIDE = 1_000_003  # epoch permutation seed = seed * stride + epoch (distinct per (seed, epoch))

# EXIF orientation -> the transpose that shows the photo upright (what ImageOps.exif_transpose does).
_EXIF_ORIENTATION_TAG = 0x0112
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_ORIENTATION_SWAPS_AXES = (5, 6, 7, 8)


# ----------------------------------------------------------------------------------------- sources


class ImageSource:
    """An indexed, fixed-order collection of images; the index is what batches are made of."""

    def __len__(self) -> int:
        raise NotImplementedError

    def describe(self, index: int) -> str:
        """A human-readable name of image ``index`` (its path), for logs of skipped files."""
        raise NotImplementedError

    def open_image(self, index: int) -> Image.Image:
        """Open image ``index`` (lazily, as PIL does); may raise anything for a bad file."""
        raise NotImplementedError


@dataclass(frozen=True)
class FileImageSource(ImageSource):
    """Images on disk. Paths are not checked here (a million ``stat`` calls on a network file system
    at start-up); a missing file is just an invalid sample when it is read."""

    paths: tuple[Path, ...]
    origin: str  # the folder / list file / manifest it came from

    def __len__(self) -> int:
        return len(self.paths)

    def describe(self, index: int) -> str:
        return str(self.paths[index])

    def open_image(self, index: int) -> Image.Image:
        return Image.open(self.paths[index])


@dataclass(frozen=True)
class SyntheticImageSource(ImageSource):
    """``count`` generated images, each a function of ``(seed, index)`` only: for tests, smoke runs and
    throughput measurements without a data set. Smooth colour fields, gradients, soft blobs and a few
    hard-edged shapes, so they have structure at several scales rather than being pure noise."""

    count: int
    size: tuple[int, int]  # (H, W)
    seed: int = 0

    def __len__(self) -> int:
        return self.count

    def describe(self, index: int) -> str:
        return f"synthetic(seed={self.seed}, index={index})"

    def open_image(self, index: int) -> Image.Image:
        if not 0 <= index < self.count:
            raise IndexError(f"synthetic image {index} out of range [0, {self.count})")
        return Image.fromarray(synthetic_image(self.seed, index, self.size))


def open_source(
    spec: str | os.PathLike,
    synthetic_count: int = 1024,
    synthetic_size: tuple[int, int] = (256, 256),
    seed: int = 0,
) -> ImageSource:
    """The image source ``spec`` names.

    ``"synthetic"``: ``synthetic_count`` generated images of ``synthetic_size`` (H, W) from ``seed``.
    A folder: every ``.jpg .jpeg .png .bmp .webp`` file under it (recursive, case-insensitive), sorted
    so the index -> file mapping is the same on every rank and every run.
    A ``.txt`` list: one path per line; blank lines and ``#`` lines skipped.
    A ``.jsonl`` manifest: one object per row with a ``path`` key; rows with ``"kept": false`` skipped.
    Relative paths in a list or manifest are relative to its own folder, so it can move with the data.
    """
    if isinstance(spec, str) and spec == SYNTHETIC_SPEC:
        if synthetic_count <= 0:
            raise ValueError(f"synthetic_count must be positive, got {synthetic_count}")
        return SyntheticImageSource(int(synthetic_count), _check_size(synthetic_size), _check_seed(seed))
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"image source not found: {path}")
    if path.is_dir():
        paths = _folder_images(path)
    elif path.suffix.lower() == ".txt":
        paths = _list_file_images(path)
    elif path.suffix.lower() == ".jsonl":
        paths = _manifest_images(path)
    else:
        raise ValueError(
            f"unsupported image source {path}: expected a folder, a .txt list, a .jsonl manifest or 'synthetic'"
        )
    if not paths:
        raise ValueError(f"no images found in {path}")
    return FileImageSource(tuple(paths), str(path))


def _folder_images(folder: Path) -> list[Path]:
    found = [p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def _list_file_images(list_file: Path) -> list[Path]:
    paths = []
    for line in list_file.read_text(encoding="utf-8").splitlines():
        entry = line.strip()
        if entry and not entry.startswith("#"):
            paths.append(list_file.parent / entry)  # an absolute entry replaces the parent
    return paths


def _manifest_images(manifest: Path) -> list[Path]:
    paths = []
    for line_number, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{manifest}, line {line_number}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("path"), str) or not row["path"]:
            raise ValueError(f"{manifest}, line {line_number}: expected an object with a 'path' string")
        if row.get("kept", True) is False:
            continue
        paths.append(manifest.parent / row["path"])
    return paths


def synthetic_image(seed: int, index: int, size: tuple[int, int]) -> np.ndarray:
    """Image ``index`` of the synthetic source with ``seed``: uint8 (H, W, 3), from ``(seed, index)`` only."""
    height, width = size
    rng = np.random.default_rng([_check_seed(seed), index])
    yy, xx = np.meshgrid(np.linspace(0.0, 1.0, height), np.linspace(0.0, 1.0, width), indexing="ij")
    aspect = (height / min(height, width), width / min(height, width))  # round blobs and discs in pixels

    # A smooth colour field: a coarse random grid, bilinearly interpolated to full size.
    grid = rng.uniform(0.0, 255.0, size=(rng.integers(2, 6), rng.integers(2, 6), 3))
    image = _bilinear(grid, yy, xx)
    # A linear gradient in a random direction, towards a random colour.
    angle = rng.uniform(0.0, 2.0 * np.pi)
    ramp = (np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5)) + 0.5
    image += (np.clip(ramp, 0.0, 1.0)[..., None] - 0.5) * rng.uniform(-120.0, 120.0, size=3)
    # Soft colour blobs.
    for _ in range(rng.integers(2, 6)):
        cy, cx = rng.uniform(0.0, 1.0, size=2)
        sigma = rng.uniform(0.04, 0.25)
        alpha = np.exp(-_squared_distance(yy, xx, cy, cx, aspect) / (2.0 * sigma**2))[..., None]
        image = image * (1.0 - alpha) + rng.uniform(0.0, 255.0, size=3) * alpha
    # A few hard-edged shapes: rectangles and discs (edges, corners).
    for _ in range(rng.integers(1, 5)):
        cy, cx = rng.uniform(0.1, 0.9, size=2)
        half_h, half_w = rng.uniform(0.04, 0.25, size=2)
        if rng.random() < 0.5:
            mask = (np.abs(yy - cy) <= half_h) & (np.abs(xx - cx) <= half_w)
        else:
            mask = _squared_distance(yy, xx, cy, cx, aspect) <= half_h**2
        image[mask] = rng.uniform(0.0, 255.0, size=3)
    image += rng.normal(0.0, 3.0, size=image.shape)  # mild sensor-like noise
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _squared_distance(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, aspect: tuple[float, float]) -> np.ndarray:
    """Squared distance from (cy, cx) in units of the shorter image side."""
    return ((yy - cy) * aspect[0]) ** 2 + ((xx - cx) * aspect[1]) ** 2


def _bilinear(grid: np.ndarray, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Sample a (gh, gw, C) grid spanning [0, 1]^2 at (yy, xx) in [0, 1], bilinearly."""
    gh, gw = grid.shape[:2]
    gy, gx = yy * (gh - 1), xx * (gw - 1)
    y0 = np.clip(np.floor(gy).astype(np.int64), 0, gh - 2)
    x0 = np.clip(np.floor(gx).astype(np.int64), 0, gw - 2)
    fy, fx = (gy - y0)[..., None], (gx - x0)[..., None]
    top = grid[y0, x0] * (1.0 - fx) + grid[y0, x0 + 1] * fx
    bottom = grid[y0 + 1, x0] * (1.0 - fx) + grid[y0 + 1, x0 + 1] * fx
    return top * (1.0 - fy) + bottom * fy


# ----------------------------------------------------------------------------------------- decoding


class ImageDataset(Dataset):
    """Decoded images of one fixed size: ``dataset[i] -> (uint8 (3, H, W), valid, i)``.

    Each image is scaled so it covers (H, W) with its aspect ratio kept (the shorter side matches;
    small images are upscaled) and centre-cropped, after applying its EXIF orientation. Anything a bad
    file raises while decoding (OSError, UnidentifiedImageError, SyntaxError, ValueError,
    DecompressionBombError, ...) gives a zero image and ``valid=False`` instead: one corrupt file in
    millions must not kill a multi-node run.
    """

    def __init__(self, source: ImageSource, size: tuple[int, int] = (1024, 1024)):
        self.source = source
        self.size = _check_size(size)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, bool, int]:
        index = int(index)
        try:
            pixels = self._decode(index)
        except Exception as err:  # noqa: BLE001 - any decoder failure is a skipped sample, by design
            log.warning("skipping unreadable image %s: %s: %s", self.source.describe(index), type(err).__name__, err)
            return torch.zeros((3, *self.size), dtype=torch.uint8), False, index
        return torch.from_numpy(pixels).permute(2, 0, 1).contiguous(), True, index

    def _decode(self, index: int) -> np.ndarray:
        height, width = self.size
        with self.source.open_image(index) as image:
            orientation = _exif_orientation(image)
            swaps = orientation in _ORIENTATION_SWAPS_AXES
            upright_w, upright_h = image.size[::-1] if swaps else image.size
            scale = max(height / upright_h, width / upright_w)
            # JPEG only: decode at a reduced DCT scale that still covers the target (much faster).
            needed = (max(1, math.ceil(upright_w * scale)), max(1, math.ceil(upright_h * scale)))
            image.draft("RGB", needed[::-1] if swaps else needed)
            image = image.convert("RGB")
            if orientation in _ORIENTATION_TRANSPOSE:
                image = image.transpose(_ORIENTATION_TRANSPOSE[orientation])
            image = _cover_and_centre_crop(image, height, width)
            return np.array(image, dtype=np.uint8)  # a copy: writable, independent of the PIL buffer


def _exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation (1 = upright); a broken EXIF block only loses the orientation."""
    try:
        return int(image.getexif().get(_EXIF_ORIENTATION_TAG, 1))
    except Exception:  # noqa: BLE001
        return 1


def _cover_and_centre_crop(image: Image.Image, height: int, width: int) -> Image.Image:
    """Scale ``image`` to cover (height, width), aspect kept, and take the centre: one resampling pass
    over the centred source box (antialiased when shrinking)."""
    src_w, src_h = image.size
    scale = max(height / src_h, width / src_w)
    box_w, box_h = width / scale, height / scale
    left, top = (src_w - box_w) / 2.0, (src_h - box_h) / 2.0
    return image.resize((width, height), Image.Resampling.BICUBIC, box=(left, top, left + box_w, top + box_h))


# --------------------------------------------------------------------------------- step batches


def batch_indices(step: int, global_batch: int, n: int, seed: int) -> torch.Tensor:
    """Dataset indices of the global batch of optimizer step ``step``: int64 (global_batch,).

    Positions ``step*B .. step*B + B - 1`` of the endless sequence made of one permutation of
    ``range(n)`` per epoch (epoch ``e`` seeded by ``seed * 1_000_003 + e``). A batch straddling an
    epoch end takes the tail of one permutation and the head of the next, so every index appears
    exactly once per epoch. Stateless: resuming at step ``s`` needs only ``s``.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if global_batch <= 0:
        raise ValueError(f"global batch must be positive, got {global_batch}")
    if n <= 0:
        raise ValueError(f"the data set is empty (n={n})")
    _check_seed(seed)
    start, stop = step * global_batch, (step + 1) * global_batch
    pieces = []
    for epoch in range(start // n, (stop - 1) // n + 1):
        lo, hi = max(start, epoch * n) - epoch * n, min(stop, (epoch + 1) * n) - epoch * n
        pieces.append(_epoch_permutation(n, seed, epoch)[lo:hi])
    return torch.cat(pieces)  # always a new tensor: the cached permutations stay untouched


@functools.lru_cache(maxsize=2)  # consecutive steps reuse the current (and, at a straddle, the next) epoch
def _epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed((seed * EPOCH_SEED_STRIDE + epoch) % 2**64)
    return torch.randperm(n, generator=generator)


def rank_slice(global_batch: int, rank: int, world_size: int) -> slice:
    """Rank ``rank``'s contiguous share ``[r*B/W, (r+1)*B/W)`` of a global batch of ``B``."""
    if world_size <= 0 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    if global_batch % world_size:
        raise ValueError(f"global batch {global_batch} is not divisible by world size {world_size}")
    per_rank = global_batch // world_size
    return slice(rank * per_rank, (rank + 1) * per_rank)


def rank_batch_indices(step: int, global_batch: int, n: int, seed: int, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s dataset indices at ``step``: its slice of :func:`batch_indices`."""
    share = rank_slice(global_batch, rank, world_size)
    return batch_indices(step, global_batch, n, seed)[share]


class StepBatchSampler(Sampler[list[int]]):
    """Yields one list of dataset indices per step, ``start_step .. start_step + num_steps - 1``: this
    rank's share of each step's global batch. A DataLoader ``batch_sampler``."""

    def __init__(
        self, n: int, *, global_batch: int, rank: int, world_size: int, start_step: int, num_steps: int, seed: int
    ):
        rank_slice(global_batch, rank, world_size)  # fail here, not in the first step
        if start_step < 0 or num_steps < 0:
            raise ValueError(f"start_step and num_steps must be >= 0, got {start_step} and {num_steps}")
        batch_indices(start_step, global_batch, n, seed)  # checks n, seed
        self.n, self.global_batch, self.seed = n, global_batch, seed
        self.rank, self.world_size = rank, world_size
        self.start_step, self.num_steps = start_step, num_steps

    def __len__(self) -> int:
        return self.num_steps

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.start_step + self.num_steps):
            yield rank_batch_indices(
                step, self.global_batch, self.n, self.seed, self.rank, self.world_size
            ).tolist()


def collate_samples(samples: Sequence[tuple[torch.Tensor, bool, int]]) -> dict[str, torch.Tensor]:
    """Stack ``ImageDataset`` samples: images uint8 (b, 3, H, W), valid bool (b,), index int64 (b,)."""
    images, valid, index = zip(*samples)
    return {
        "images": torch.stack(images),
        "valid": torch.tensor(valid, dtype=torch.bool),
        "index": torch.tensor(index, dtype=torch.int64),
    }


# ---------------------------------------------------------------------------------------- loader


@dataclass
class DataStats:
    """What this rank's loader has yielded: ``samples`` seen, ``skipped`` (invalid) among them, and the
    first few skipped dataset indices (for ``source.describe``). Per rank: all-reduce for global counts."""

    samples: int = 0
    skipped: int = 0
    skipped_examples: list[int] = field(default_factory=list)
    max_examples: int = 16

    def record(self, valid: torch.Tensor, index: torch.Tensor) -> None:
        self.samples += int(valid.numel())
        bad = index[~valid].tolist()
        self.skipped += len(bad)
        room = self.max_examples - len(self.skipped_examples)
        if room > 0:
            self.skipped_examples.extend(bad[:room])

    def as_log(self) -> dict[str, int]:
        return {"skipped_images": self.skipped}


class StepLoader:
    """Iterable of per-step batches for one rank: ``{"images", "valid", "index", "step"}`` for steps
    ``start_step .. start_step + num_steps - 1``; ``stats`` accumulates skipped images as batches are
    yielded. Iterating again restarts at ``start_step`` (the stats keep counting)."""

    def __init__(self, loader: DataLoader, start_step: int, num_steps: int):
        self.loader = loader
        self.start_step, self.num_steps = start_step, num_steps
        self.stats = DataStats()

    def __len__(self) -> int:
        return self.num_steps

    def __iter__(self) -> Iterator[dict]:
        for step, batch in enumerate(self.loader, start=self.start_step):  # the DataLoader keeps order
            self.stats.record(batch["valid"], batch["index"])
            batch["step"] = step
            yield batch


def make_loader(
    dataset: ImageDataset,
    *,
    global_batch: int,
    rank: int,
    world_size: int,
    start_step: int,
    num_steps: int,
    seed: int,
    num_workers: int = 8,
    prefetch: int = 2,
    pin_memory: bool = False,
) -> StepLoader:
    """This rank's batches for steps ``start_step ..``, decoded in ``num_workers`` DataLoader workers
    (0: in this process) with ``prefetch`` batches in flight per worker.

    A batch has ``global_batch // world_size`` samples, always (invalid ones included, ``valid=False``).
    The DataLoader gets its own generator so creating an iterator does not draw from (and shift) the
    trainer's global torch RNG.
    """
    if num_workers < 0 or prefetch < 1:
        raise ValueError(f"need num_workers >= 0 and prefetch >= 1, got {num_workers} and {prefetch}")
    sampler = StepBatchSampler(
        len(dataset),
        global_batch=global_batch,
        rank=rank,
        world_size=world_size,
        start_step=start_step,
        num_steps=num_steps,
        seed=seed,
    )
    worker_options = {"persistent_workers": True, "prefetch_factor": prefetch} if num_workers > 0 else {}
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_samples,
        num_workers=num_workers,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed % 2**64),
        **worker_options,
    )
    return StepLoader(loader, start_step, num_steps)


# ---------------------------------------------------------------------------------------- checks


def _check_size(size: Sequence[int]) -> tuple[int, int]:
    if len(size) != 2 or any(int(side) != side or side <= 0 for side in size):
        raise ValueError(f"size must be two positive integers (H, W), got {size!r}")
    return int(size[0]), int(size[1])


def _check_seed(seed: int) -> int:
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)
