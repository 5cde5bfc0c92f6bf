"""The trainer's image pipeline: sources, fault-tolerant decoding, deterministic per-rank step batches."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sapiens2.train.data import (
    DataStats,
    FileImageSource,
    ImageDataset,
    SyntheticImageSource,
    batch_indices,
    make_loader,
    open_source,
    rank_batch_indices,
    rank_slice,
)


def _write_image(path, size_hw=(12, 16), colour=(200, 30, 60), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.zeros((*size_hw, 3), dtype=np.uint8)
    array[...] = colour
    Image.fromarray(array).save(path, format=fmt)
    return path


def _image_folder(root, count=6):
    """``count`` small solid-colour PNGs, colour encoding the file number, under ``root``."""
    return [_write_image(root / f"img_{i:02d}.png", colour=(10 * i, 255 - 10 * i, 7)) for i in range(count)]


# ------------------------------------------------------------------------------------------ sources


def test_folder_source_is_recursive_case_insensitive_and_sorted(tmp_path):
    _write_image(tmp_path / "b.PNG")
    _write_image(tmp_path / "a.jpg")
    _write_image(tmp_path / "sub" / "deeper" / "c.JPEG")
    _write_image(tmp_path / "sub" / "d.bmp", fmt="BMP")
    _write_image(tmp_path / "e.webp", fmt="WEBP")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "dir.jpg").mkdir()  # a folder with an image suffix is not an image

    source = open_source(str(tmp_path))
    assert isinstance(source, FileImageSource)
    names = [p.relative_to(tmp_path).as_posix() for p in source.paths]
    assert names == ["a.jpg", "b.PNG", "e.webp", "sub/d.bmp", "sub/deeper/c.JPEG"]
    assert len(source) == 5
    assert open_source(tmp_path).paths == source.paths  # a PathLike works too, same order


def test_list_file_source_skips_blanks_and_comments_and_resolves_relative(tmp_path):
    data = tmp_path / "data"
    first = _write_image(data / "one.png")
    absolute = _write_image(tmp_path / "elsewhere" / "two.png")
    lists = tmp_path / "lists"
    lists.mkdir()
    list_file = lists / "train.txt"
    lines = ["# training images", "", "  ../data/one.png  ", str(absolute), "   ", "# ../data/ignored.png", "missing.png"]
    list_file.write_text("\n".join(lines) + "\n")

    source = open_source(str(list_file))
    expected = [first, absolute, lists / "missing.png"]
    assert [p.resolve() for p in source.paths] == [p.resolve() for p in expected]
    # A listed file that does not exist is not checked up front; it is an invalid sample when read.
    image, valid, index = ImageDataset(source, size=(8, 8))[2]
    assert (valid, index) == (False, 2) and not image.any()


def test_jsonl_manifest_skips_unkept_rows_and_resolves_relative(tmp_path):
    _image_folder(tmp_path / "imgs", count=3)
    manifest = tmp_path / "manifest.jsonl"
    rows = [
        {"path": "imgs/img_00.png", "kept": True},
        {"path": "imgs/img_01.png", "kept": False},
        {"path": "imgs/img_02.png", "score": 0.9},
    ]
    manifest.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + json.dumps(rows[2]) + "\n")

    source = open_source(str(manifest))
    assert source.paths == (tmp_path / "imgs" / "img_00.png", tmp_path / "imgs" / "img_02.png")
    assert all(ImageDataset(source, size=(4, 4))[i][1] for i in range(len(source)))


@pytest.mark.parametrize("bad_row", ['{"file": "x.png"}', "[1, 2]", "{not json"])
def test_jsonl_manifest_bad_row_names_its_line(tmp_path, bad_row):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"path": "a.png"}) + "\n\n" + bad_row + "\n")
    with pytest.raises(ValueError, match=r"line 3"):
        open_source(str(manifest))


def test_synthetic_source_is_deterministic_and_structured():
    def synthetic(count, seed):
        return open_source("synthetic", synthetic_count=count, synthetic_size=(48, 64), seed=seed)

    source = synthetic(5, seed=7)
    assert isinstance(source, SyntheticImageSource) and len(source) == 5
    first = np.asarray(source.open_image(3))
    assert first.shape == (48, 64, 3) and first.dtype == np.uint8
    np.testing.assert_array_equal(first, np.asarray(synthetic(99, seed=7).open_image(3)))  # count is irrelevant
    assert not np.array_equal(first, np.asarray(source.open_image(4)))
    assert not np.array_equal(first, np.asarray(synthetic(5, seed=8).open_image(3)))
    # Not noise: neighbouring pixels are far more alike than random pairs.
    as_float = first.astype(np.float64)
    neighbour_diff = np.abs(np.diff(as_float, axis=1)).mean()
    shuffled = np.random.default_rng(0).permutation(as_float.reshape(-1, 3)).reshape(as_float.shape)
    random_diff = np.abs(as_float - shuffled).mean()
    assert neighbour_diff < 0.3 * random_diff
    image, valid, index = ImageDataset(source, size=(32, 32))[4]
    assert image.shape == (3, 32, 32) and valid and index == 4


def test_missing_and_empty_sources_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        open_source(str(tmp_path / "nope"))
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "readme.md").write_text("no images")
    with pytest.raises(ValueError, match="no images found in"):
        open_source(str(empty))
    list_file = tmp_path / "empty.txt"
    list_file.write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="no images found in"):
        open_source(str(list_file))
    manifest = tmp_path / "none_kept.jsonl"
    manifest.write_text(json.dumps({"path": "a.png", "kept": False}) + "\n")
    with pytest.raises(ValueError, match="no images found in"):
        open_source(str(manifest))
    other = tmp_path / "data.csv"
    other.write_text("a.png\n")
    with pytest.raises(ValueError, match="unsupported"):
        open_source(str(other))


# ----------------------------------------------------------------------------------------- decoding


def test_resize_covers_and_centre_crops(tmp_path):
    # 20 high x 60 wide: red | green | blue bands of 20 columns; a (20, 20) crop is the green band.
    bands = np.zeros((20, 60, 3), dtype=np.uint8)
    bands[:, :20, 0] = bands[:, 20:40, 1] = bands[:, 40:, 2] = 255
    Image.fromarray(bands).save(tmp_path / "bands.png")
    dataset = ImageDataset(open_source(str(tmp_path)), size=(20, 20))
    image, valid, _ = dataset[0]
    assert valid and image.shape == (3, 20, 20) and image.dtype == torch.uint8
    centre = image[:, :, 5:15]
    assert (centre[1] == 255).all() and (centre[0] == 0).all() and (centre[2] == 0).all()

    # Shrinking a tall image: the width matches, the vertical centre is kept.
    tall = np.zeros((90, 30, 3), dtype=np.uint8)
    tall[30:60] = 200
    Image.fromarray(tall).save(tmp_path / "bands.png")
    image, valid, _ = ImageDataset(open_source(str(tmp_path)), size=(10, 10))[0]
    assert valid and int(image[:, 2:8, 2:8].min()) >= 190


def test_small_image_is_upscaled(tmp_path):
    _write_image(tmp_path / "tiny.png", size_hw=(3, 5), colour=(9, 99, 199))
    image, valid, index = ImageDataset(open_source(str(tmp_path)), size=(24, 32))[0]
    assert valid and index == 0 and image.shape == (3, 24, 32)
    assert image.reshape(3, -1).float().mean(1).round().tolist() == [9.0, 99.0, 199.0]


def test_grey_palette_and_alpha_images_become_rgb(tmp_path):
    Image.new("L", (10, 10), 77).save(tmp_path / "a_grey.png")
    Image.new("RGBA", (10, 10), (1, 2, 3, 0)).save(tmp_path / "b_alpha.png")
    Image.new("P", (10, 10), 5).save(tmp_path / "c_palette.bmp")
    dataset = ImageDataset(open_source(str(tmp_path)), size=(6, 6))
    for i in range(3):
        image, valid, _ = dataset[i]
        assert valid and image.shape == (3, 6, 6)
    assert (dataset[0][0] == 77).all()


def test_exif_orientation_is_applied(tmp_path):
    array = np.zeros((10, 30, 3), dtype=np.uint8)  # stored landscape; EXIF 6 = shown rotated 90 deg
    array[:, :15] = 250
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(array).save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    image, valid, _ = ImageDataset(open_source(str(tmp_path)), size=(30, 10))[0]
    assert valid and image.shape == (3, 30, 10)
    # Rotating 90 deg clockwise turns the bright left half into the top half.
    assert image[:, :12].float().mean() > 200 and image[:, 18:].float().mean() < 50


def _corrupt_folder(root):
    _image_folder(root, count=4)
    (root / "x.jpg").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    noisy = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noisy).save(root / "truncated.png")
    data = (root / "truncated.png").read_bytes()
    (root / "truncated.png").write_bytes(data[: len(data) // 2])
    return open_source(str(root))


def test_corrupt_files_give_invalid_zero_images(tmp_path):
    source = _corrupt_folder(tmp_path)
    names = [p.name for p in source.paths]
    dataset = ImageDataset(source, size=(16, 16))
    for name in ("x.jpg", "truncated.png"):
        image, valid, index = dataset[names.index(name)]
        assert valid is False and index == names.index(name)
        assert image.shape == (3, 16, 16) and image.dtype == torch.uint8 and not image.any()
    assert dataset[names.index("img_00.png")][1] is True


def test_decompression_bomb_is_an_invalid_sample(tmp_path, monkeypatch):
    _write_image(tmp_path / "big.png", size_hw=(32, 32))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1024 pixels > 2 * 100: DecompressionBombError
    image, valid, _ = ImageDataset(open_source(str(tmp_path)), size=(8, 8))[0]
    assert valid is False and not image.any()


def test_corrupt_files_are_counted_by_the_loader(tmp_path):
    source = _corrupt_folder(tmp_path)  # 6 images, 2 bad
    loader = make_loader(
        ImageDataset(source, size=(8, 8)),
        global_batch=3, rank=0, world_size=1, start_step=0, num_steps=4, seed=0, num_workers=0, prefetch=1,
    )
    batches = list(loader)  # 12 samples = two epochs: each bad file twice
    assert [b["step"] for b in batches] == [0, 1, 2, 3]
    assert all(b["images"].shape == (3, 3, 8, 8) for b in batches)  # the batch shape never shrinks
    invalid = torch.cat([b["index"][~b["valid"]] for b in batches])
    bad = {i for i, p in enumerate(source.paths) if p.name in ("x.jpg", "truncated.png")}
    assert sorted(invalid.tolist()) == sorted(list(bad) * 2)
    assert loader.stats.samples == 12 and loader.stats.skipped == 4
    assert set(loader.stats.skipped_examples) == bad
    assert loader.stats.as_log() == {"skipped_images": 4}


def test_data_stats_keeps_a_bounded_list_of_examples():
    stats = DataStats(max_examples=3)
    stats.record(torch.tensor([False, True, False]), torch.tensor([4, 5, 6]))
    stats.record(torch.tensor([False, False]), torch.tensor([7, 8]))
    assert (stats.samples, stats.skipped, stats.skipped_examples) == (5, 4, [4, 6, 7])


# ------------------------------------------------------------------------------------- step batches


def test_batch_indices_is_deterministic_and_seed_dependent():
    first = batch_indices(5, 8, 50, seed=3)
    assert first.dtype == torch.int64 and first.shape == (8,)
    assert torch.equal(first, batch_indices(5, 8, 50, seed=3))
    assert not torch.equal(first, batch_indices(5, 8, 50, seed=4))
    assert not torch.equal(first, batch_indices(6, 8, 50, seed=3))


@pytest.mark.parametrize("n, global_batch", [(12, 4), (10, 4), (7, 3), (5, 12)])
def test_every_index_exactly_once_per_epoch(n, global_batch):
    steps = 6 * n  # whole number of epochs' worth of positions: 6 * global_batch epochs
    stream = torch.cat([batch_indices(s, global_batch, n, seed=1) for s in range(steps)])
    epochs = stream.reshape(-1, n)
    for epoch in epochs:
        assert sorted(epoch.tolist()) == list(range(n))
    assert not all(torch.equal(epochs[0], e) for e in epochs[1:])  # reshuffled every epoch


def test_batch_straddling_two_epochs():
    n, global_batch, seed = 10, 4, 2
    straddle = batch_indices(2, global_batch, n, seed)  # positions 8..11: end of epoch 0, start of epoch 1
    epoch0 = torch.cat([batch_indices(s, global_batch, n, seed) for s in range(2)] + [straddle[:2]])
    assert sorted(epoch0.tolist()) == list(range(n))
    epoch1 = torch.cat([straddle[2:]] + [batch_indices(s, global_batch, n, seed) for s in (3, 4)])
    assert sorted(epoch1.tolist()) == list(range(n))
    # With a global batch of 5 the epochs align with steps: the next epoch is a fresh permutation.
    assert sorted(torch.cat([batch_indices(2, 5, n, seed), batch_indices(3, 5, n, seed)]).tolist()) == list(range(n))


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_rank_slices_concatenate_to_the_global_batch(world_size):
    global_batch, n, seed = 8, 21, 5
    for step in (0, 2, 7):
        shares = [rank_batch_indices(step, global_batch, n, seed, r, world_size) for r in range(world_size)]
        assert all(len(s) == global_batch // world_size for s in shares)
        assert torch.equal(torch.cat(shares), batch_indices(step, global_batch, n, seed))


def test_world_size_must_divide_the_global_batch():
    with pytest.raises(ValueError, match=r"global batch 10 .* world size 4"):
        rank_slice(10, 0, 4)
    with pytest.raises(ValueError, match=r"global batch 10 .* world size 3"):
        make_loader(
            ImageDataset(open_source("synthetic", synthetic_count=4, synthetic_size=(8, 8)), size=(8, 8)),
            global_batch=10, rank=0, world_size=3, start_step=0, num_steps=1, seed=0, num_workers=0, prefetch=1,
        )
    with pytest.raises(ValueError, match="rank"):
        rank_slice(8, 4, 4)


# ------------------------------------------------------------------------------------------- loader


def _loader(dataset, **overrides):
    options = dict(global_batch=4, rank=0, world_size=1, start_step=0, num_steps=5, seed=11, num_workers=0, prefetch=2)
    options.update(overrides)
    return make_loader(dataset, **options)


@pytest.fixture(scope="module")
def synthetic_dataset():
    return ImageDataset(open_source("synthetic", synthetic_count=9, synthetic_size=(20, 28), seed=2), size=(16, 16))


def _assert_same_batches(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a["step"] == b["step"]
        for key in ("images", "valid", "index"):
            assert torch.equal(a[key], b[key]), key


def test_loader_batches_and_types(synthetic_dataset):
    loader = _loader(synthetic_dataset, global_batch=4, rank=1, world_size=2)
    assert len(loader) == 5
    batches = list(loader)
    assert [b["step"] for b in batches] == list(range(5))
    for b in batches:
        assert b["images"].dtype == torch.uint8 and b["images"].shape == (2, 3, 16, 16)
        assert b["valid"].dtype == torch.bool and b["valid"].all()
        assert b["index"].dtype == torch.int64
        assert torch.equal(b["index"], rank_batch_indices(b["step"], 4, 9, 11, 1, 2))
        for image, index in zip(b["images"], b["index"].tolist()):
            assert torch.equal(image, synthetic_dataset[index][0])


def test_loader_with_workers_matches_in_process_and_resume(synthetic_dataset):
    """Workers or not, and resumed at step k or not: the same batches (one worker pool, for speed)."""
    in_process = list(_loader(synthetic_dataset, num_steps=7))
    with_workers = _loader(synthetic_dataset, num_steps=7, num_workers=2)
    _assert_same_batches(list(with_workers), in_process)
    _assert_same_batches(list(with_workers), in_process)  # persistent workers: a second pass restarts at step 0
    assert with_workers.stats.samples == 2 * 7 * 4 and with_workers.stats.skipped == 0
    resumed = _loader(synthetic_dataset, start_step=3, num_steps=4)
    _assert_same_batches(list(resumed), in_process[3:])


def test_resharded_loaders_see_the_same_global_batches(synthetic_dataset):
    one_rank = list(_loader(synthetic_dataset, global_batch=4, num_steps=3))
    per_rank = [list(_loader(synthetic_dataset, global_batch=4, rank=r, world_size=4, num_steps=3)) for r in range(4)]
    for step, batch in enumerate(one_rank):
        assert torch.equal(torch.cat([ranks[step]["images"] for ranks in per_rank]), batch["images"])
        assert torch.equal(torch.cat([ranks[step]["index"] for ranks in per_rank]), batch["index"])


def test_loader_does_not_touch_the_global_rng(synthetic_dataset):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    list(_loader(synthetic_dataset, num_steps=2))
    assert torch.equal(torch.rand(3), expected)
