"""Training data: sources, transforms, channel conversion, reproducible augmentation and resumable order."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from deme_cli.engine.data import EpochBatches, augment_rng, build_dataset, epoch_permutation, to_tensor
from deme_cli.engine.errors import UsageError


def _dataset(recipe, **kw):
    """The training images of a recipe: its [data] with its seed."""
    return build_dataset(recipe.data, recipe.seed, **kw)


def _recipe(make_recipe, **data):
    return make_recipe(data=data)


def test_imagefolder_shapes_range_and_channels(make_recipe, tiny_images):
    r = make_recipe()
    ds = build_dataset(r.data, r.seed, channels=3)
    assert len(ds) == 32
    x = ds[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0 and float(x.max()) > 0.0   # uses the range
    g = build_dataset(r.data, r.seed, channels=1)[0]
    assert g.shape == (1, 16, 16)
    with pytest.raises(UsageError, match="2 input channels"):
        build_dataset(r.data, r.seed, channels=2)


def test_imagefolder_recursive_extensions_and_max_samples(make_recipe, tmp_path):
    rng = np.random.default_rng(0)
    for k, ext in enumerate(["png", "jpg", "jpeg", "webp", "bmp"]):
        sub = tmp_path / "imgs" / f"sub{k % 2}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(sub / f"{k}.{ext.upper()}")
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    ds = _dataset(_recipe(make_recipe, path=str(tmp_path / "imgs"), resolution=8), channels=3)
    assert len(ds) == 5 and ds[4].shape == (3, 8, 8)
    assert len(_dataset(_recipe(make_recipe, path=str(tmp_path / "imgs"), max_samples=2))) == 2


def test_empty_or_missing_folder_is_usage_error(make_recipe, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="holds no images"):
        _dataset(_recipe(make_recipe, path=str(tmp_path / "empty")))
    with pytest.raises(UsageError, match="not a folder"):
        _dataset(_recipe(make_recipe, path=str(tmp_path / "nope")))


def test_resize_shorter_side_then_center_crop():
    # a 40x20 image: left half black, right half white -> shorter side 20 -> 8: 16x8, centre crop keeps cols 4..12
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, 20:] = 255
    x = to_tensor(Image.fromarray(arr), 8, 3, center_crop=True, random_flip=False, rng=None)
    assert x.shape == (3, 8, 8)
    assert torch.allclose(x[:, :, 0], torch.full((3, 8), -1.0)) and torch.allclose(x[:, :, -1], torch.ones(3, 8))


def test_random_crop_and_flip_are_a_function_of_seed_epoch_index():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (16, 48, 3), dtype=np.uint8))

    def item(seed, epoch, index):
        return to_tensor(img, 16, 3, center_crop=False, random_flip=True, rng=augment_rng(seed, epoch, index))

    assert torch.equal(item(0, 3, 5), item(0, 3, 5))
    crops = {tuple(item(0, e, 5)[0, 0, :4].tolist()) for e in range(12)}
    assert len(crops) > 3     # different epochs crop and flip differently
    # flips happen about half the time, and a flip is an exact mirror
    center = np.asarray(img)[:, 16:32]
    flipped = sum(torch.equal(to_tensor(Image.fromarray(center), 16, 3, False, True, augment_rng(0, e, 0)),
                              to_tensor(Image.fromarray(center[:, ::-1].copy()), 16, 3, False, False, None))
                  for e in range(200))
    assert 70 < flipped < 130


def test_dataset_keys_give_reproducible_items(make_recipe):
    ds = _dataset(make_recipe(data={"center_crop": False, "random_flip": True}), channels=3)
    assert torch.equal(ds[(3, 7)], ds[(3, 7)])
    assert torch.equal(ds[3], ds[(3, 0)])


def test_epoch_order_is_a_permutation_and_resumes_exactly():
    n, B = 23, 4
    full = [b for e in range(3) for b in EpochBatches(n, B, seed=5, epoch=e)]
    assert len(full) == 3 * (n // B)
    ep0 = [i for b in full[:n // B] for i, _ in b]
    assert len(set(ep0)) == len(ep0) == (n // B) * B
    assert not np.array_equal(epoch_permutation(n, 5, 0), epoch_permutation(n, 5, 1))
    # resuming at batch 3 of epoch 1 gives the rest of the same stream
    resumed = list(EpochBatches(n, B, seed=5, epoch=1, start=3)) + list(EpochBatches(n, B, seed=5, epoch=2))
    assert resumed == full[n // B + 3:]
    # two processes split each global batch without overlap
    r0, r1 = list(EpochBatches(n, B, 5, 0, rank=0, num_processes=2)), list(EpochBatches(n, B, 5, 0, rank=1,
                                                                                          num_processes=2))
    assert len(r0) == len(r1) == n // (2 * B)
    assert not {i for b in r0 for i, _ in b} & {i for b in r1 for i, _ in b}
    with pytest.raises(UsageError, match="fewer than one batch"):
        EpochBatches(3, 4, 0, 0)


def test_hf_local_dataset_and_missing_column(make_recipe, tmp_path):
    import datasets

    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)) for _ in range(6)]
    ds = datasets.Dataset.from_dict({"img": imgs, "label": list(range(6))}).cast_column("img", datasets.Image())
    ds.save_to_disk(str(tmp_path / "saved"))
    r = make_recipe(data={"source": "hf", "name": str(tmp_path / "saved"), "image_column": "img", "resolution": 8,
                          "path": None})
    out = build_dataset(r.data, r.seed, channels=3)     # grayscale source converted to the model's 3 channels
    assert len(out) == 6 and out[0].shape == (3, 8, 8)
    assert torch.equal(out[0][0], out[0][1])
    bad = make_recipe(data={"source": "hf", "name": str(tmp_path / "saved"), "image_column": "image", "path": None})
    with pytest.raises(UsageError, match=r"no column 'image' \(columns: img, label\)"):
        build_dataset(bad.data, bad.seed)


def test_hf_local_image_folder_by_path(make_recipe, tiny_images):
    r = make_recipe(data={"source": "hf", "name": str(tiny_images), "path": None, "max_samples": 5})
    ds = build_dataset(r.data, r.seed, channels=3)
    assert len(ds) == 5 and ds[0].shape == (3, 16, 16)


def test_hf_unreachable_dataset_is_usage_error(make_recipe):
    r = make_recipe(data={"source": "hf", "name": "no-such-user/no-such-dataset", "path": None})
    with pytest.raises(UsageError, match="could not load dataset"):
        build_dataset(r.data, r.seed)


def test_dataset_pickles_for_spawned_workers(make_recipe):
    import pickle

    ds = _dataset(make_recipe(data={"random_flip": True}), channels=3)
    assert torch.equal(pickle.loads(pickle.dumps(ds))[(5, 2)], ds[(5, 2)])
