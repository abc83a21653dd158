"""Tests of lightning_sam.data: IDX parsing, label noise, the Fashion-MNIST and CIFAR data modules.

The Fashion-MNIST tests read the real files of Debian's ``dataset-fashion-mnist``; the CIFAR tests never download:
they swap the torchvision dataset for a tiny fake one.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import RandomSampler, SequentialSampler
from torchvision import transforms as T

from lightning_sam.data import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    CIFARDataModule,
    Cutout,
    FashionMNISTDataModule,
    RandomCropFlip,
    find_fashion_mnist,
    load_fashion_mnist,
    noisy_indices,
    read_idx,
    symmetric_label_noise,
)
from lightning_sam.data.fashion_mnist import FILES, IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, SYSTEM_DIR

if not all((SYSTEM_DIR / name).is_file() for name in FILES.values()):
    # Not a silent skip: the data is a requirement of this test suite (see the error for how to install it).
    raise RuntimeError(f"tests/test_data.py needs Fashion-MNIST in {SYSTEM_DIR}: apt-get install dataset-fashion-mnist")


@pytest.fixture(scope="module")
def fashion_train() -> tuple[torch.Tensor, torch.Tensor]:
    return load_fashion_mnist(SYSTEM_DIR, train=True)


@pytest.fixture(scope="module")
def fashion_test_labels() -> torch.Tensor:
    return read_idx(SYSTEM_DIR / FILES["test_labels"], magic=IDX_LABELS_MAGIC).long()


@pytest.fixture(scope="module")
def noisy_datamodule() -> FashionMNISTDataModule:
    datamodule = FashionMNISTDataModule(val_size=5000, label_noise=0.2, noise_seed=3, split_seed=1)
    datamodule.prepare_data()
    datamodule.setup()
    return datamodule


def _write_idx(path: Path, payload: bytes) -> Path:
    path.write_bytes(gzip.compress(payload))
    return path


# ---------------------------------------------------------------------------------------------------------- IDX
def test_read_idx_real_fashion_mnist(fashion_train, fashion_test_labels):
    images, labels = fashion_train
    assert images.shape == (60000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (60000,) and labels.dtype == torch.int64
    assert int(labels.min()) == 0 and int(labels.max()) == 9
    assert torch.bincount(labels).tolist() == [6000] * 10  # Fashion-MNIST is balanced
    assert torch.bincount(fashion_test_labels).tolist() == [1000] * 10
    test_images = read_idx(SYSTEM_DIR / FILES["test_images"], magic=IDX_IMAGES_MAGIC)
    assert test_images.shape == (10000, 28, 28)
    # Known first labels of the training set: ankle boot, T-shirt, T-shirt, dress, T-shirt.
    assert labels[:5].tolist() == [9, 0, 0, 3, 0]
    assert int(images.max()) == 255 and int(images.min()) == 0


def test_read_idx_multibyte_big_endian(tmp_path):
    values = np.array([[1, -2, 300], [40000 - 65536, 5, 6]], dtype=">i2")
    header = bytes([0, 0, 0x0B, 2]) + (2).to_bytes(4, "big") + (3).to_bytes(4, "big")
    tensor = read_idx(_write_idx(tmp_path / "x.gz", header + values.tobytes()))
    assert tensor.dtype == torch.int16 and tensor.tolist() == values.tolist()


@pytest.mark.parametrize(
    "payload, message",
    [
        (bytes([1, 0, 8, 1]) + (2).to_bytes(4, "big") + b"\x00\x01", "bad magic number 0x01000801"),
        (bytes([0, 0, 0x42, 1]) + (2).to_bytes(4, "big") + b"\x00\x01", "bad magic number"),
        (bytes([0, 0, 8]), "too short"),
        (bytes([0, 0, 8, 2]) + (2).to_bytes(4, "big"), "truncated IDX header"),
        (bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + b"\x00" * 5, "needs 10 bytes of data after the header, found"),
    ],
)
def test_read_idx_rejects_bad_files(tmp_path, payload, message):
    with pytest.raises(ValueError, match=message):
        read_idx(_write_idx(tmp_path / "bad.gz", payload))


def test_read_idx_checks_expected_magic_and_gzip(tmp_path):
    with pytest.raises(ValueError, match=r"magic number 0x00000801 \(2049\), expected 0x00000803 \(2051\)"):
        read_idx(SYSTEM_DIR / FILES["test_labels"], magic=IDX_IMAGES_MAGIC)
    plain = tmp_path / "plain.gz"
    plain.write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="not a readable gzip file"):
        read_idx(plain)
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "absent.gz")


# ---------------------------------------------------------------------------------------------------------- locating
def test_find_fashion_mnist_default_and_torchvision_layout(tmp_path):
    assert find_fashion_mnist() == SYSTEM_DIR
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in FILES.values():
        os.symlink(SYSTEM_DIR / name, raw / name)
    assert find_fashion_mnist(tmp_path) == raw
    assert find_fashion_mnist(raw) == raw
    datamodule = FashionMNISTDataModule(data_dir=str(tmp_path), val_size=0)
    datamodule.setup("test")
    assert len(datamodule.test_dataset) == 10000


def test_missing_fashion_mnist_says_where_it_looked_and_how_to_get_it(tmp_path):
    (tmp_path / FILES["train_images"]).write_bytes(b"")  # a partial download
    with pytest.raises(FileNotFoundError) as info:
        find_fashion_mnist(tmp_path)
    message = str(info.value)
    assert f"{tmp_path}: missing train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz" in message
    assert f"{tmp_path / 'FashionMNIST' / 'raw'}: no such folder" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "torchvision.datasets.FashionMNIST('DIR', download=True)" in message and "data_dir=DIR" in message
    datamodule = FashionMNISTDataModule(data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="Fashion-MNIST not found"):
        datamodule.prepare_data()
    with pytest.raises(FileNotFoundError, match="nowhere"):
        datamodule.setup("fit")


# ---------------------------------------------------------------------------------------------------------- label noise
@pytest.mark.parametrize("n, rate", [(1000, 0.37), (55000, 0.2), (7, 0.5), (10, 0.0), (0, 0.3), (3, 0.99)])
def test_symmetric_label_noise_rate_is_exact(n, rate):
    clean = torch.arange(n) % 10
    noisy = symmetric_label_noise(clean, rate, num_classes=10, seed=0)
    changed = noisy != clean
    assert int(changed.sum()) == round(rate * n)
    assert changed.nonzero().flatten().tolist() == sorted(noisy_indices(n, rate, seed=0).tolist())
    assert ((noisy >= 0) & (noisy < 10)).all()


def test_symmetric_label_noise_is_reproducible_and_seeded():
    clean = torch.randint(0, 10, (5000,), generator=torch.Generator().manual_seed(1))
    before = clean.clone()
    rng = torch.random.get_rng_state()
    first = symmetric_label_noise(clean, 0.3, 10, seed=7)
    assert torch.equal(torch.random.get_rng_state(), rng)  # own generator: the global RNG is untouched
    assert torch.equal(clean, before)  # input not modified
    assert torch.equal(first, symmetric_label_noise(clean, 0.3, 10, seed=7))
    other = symmetric_label_noise(clean, 0.3, 10, seed=8)
    assert not torch.equal(first, other)
    assert int((other != clean).sum()) == 1500
    zero = symmetric_label_noise(clean, 0.0, 10, seed=7)
    assert torch.equal(zero, clean) and zero is not clean


def test_symmetric_label_noise_draws_uniformly_from_the_other_classes():
    clean = torch.zeros(90000, dtype=torch.long)
    noisy = symmetric_label_noise(clean, 0.5, num_classes=10, seed=0)
    counts = torch.bincount(noisy, minlength=10)
    assert int(counts[0]) == 45000  # the corrupted half never keeps class 0
    expected = 45000 / 9
    assert ((counts[1:] - expected).abs() < 0.06 * expected).all(), counts.tolist()


def test_symmetric_label_noise_keeps_dtype_and_handles_uint8():
    clean = torch.full((100,), 255, dtype=torch.uint8)
    noisy = symmetric_label_noise(clean, 0.5, num_classes=256, seed=0)
    assert noisy.dtype == torch.uint8 and int((noisy != clean).sum()) == 50


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rate=1.0), r"label noise rate must be a float in \[0, 1\), got 1.0"),
        (dict(rate=-0.1), r"in \[0, 1\), got -0.1"),
        (dict(rate=True), "got True"),
        (dict(num_classes=1), "num_classes must be an int >= 2"),
        (dict(targets=torch.tensor([0, 10])), r"targets must lie in \[0, 10\), got values in \[0, 10\]"),
        (dict(targets=torch.zeros(2, 2, dtype=torch.long)), "1-D integer tensor"),
        (dict(targets=torch.zeros(3)), "1-D integer tensor"),
        (dict(targets=[0, 1]), "must be a torch.Tensor"),
        (dict(seed=1.5), "seed must be an int"),
    ],
)
def test_symmetric_label_noise_rejects_bad_arguments(kwargs, message):
    args = dict(targets=torch.tensor([0, 1, 2]), rate=0.2, num_classes=10, seed=0) | kwargs
    with pytest.raises(ValueError, match=message):
        symmetric_label_noise(**args)


# ----------------------------------------------------------------------------------------------- FMNIST module
def test_fashion_mnist_split_and_noise_only_on_training_labels(noisy_datamodule, fashion_train, fashion_test_labels):
    _, labels = fashion_train
    dm = noisy_datamodule
    split = dm.split
    assert len(dm.train_dataset) == 55000 and len(dm.val_dataset) == 5000 and len(dm.test_dataset) == 10000
    assert sorted(torch.cat([split.train_indices, split.val_indices]).tolist()) == list(range(60000))
    # The validation set is the tail of the permutation drawn with split_seed.
    assert torch.equal(split.val_indices, torch.randperm(60000, generator=torch.Generator().manual_seed(1))[55000:])
    # Validation and test labels are the true ones.
    assert torch.equal(dm.val_dataset.targets, labels[split.val_indices])
    assert torch.equal(dm.test_dataset.targets, fashion_test_labels)
    # Training labels: exactly 20% corrupted, at the positions noisy_indices names.
    clean = labels[split.train_indices]
    assert torch.equal(split.clean_train_targets, clean)
    changed = dm.train_dataset.targets != clean
    assert int(changed.sum()) == 11000
    assert torch.equal(changed, split.noisy_mask)
    assert changed.nonzero().flatten().tolist() == sorted(noisy_indices(55000, 0.2, seed=3).tolist())


def test_fashion_mnist_images_are_normalized_and_aligned(noisy_datamodule, fashion_train):
    images, _ = fashion_train
    dm = noisy_datamodule
    x = dm.train_dataset.images
    assert x.shape == (55000, 1, 28, 28) and x.dtype == torch.float32
    assert abs(float(x.mean())) < 0.01 and abs(float(x.std()) - 1.0) < 0.01
    index = int(dm.split.train_indices[123])
    expected = (images[index].float() / 255 - 0.2860) / 0.3530
    assert torch.allclose(x[123, 0], expected, atol=1e-6)


def test_fashion_mnist_seeds_reproduce_and_differ(noisy_datamodule):
    def build(**kwargs):
        dm = FashionMNISTDataModule(**(dict(val_size=5000, label_noise=0.2, noise_seed=3, split_seed=1) | kwargs))
        dm.setup("fit")
        return dm

    same = build()
    assert torch.equal(same.train_dataset.targets, noisy_datamodule.train_dataset.targets)
    assert torch.equal(same.split.val_indices, noisy_datamodule.split.val_indices)
    other_noise = build(noise_seed=4)
    assert torch.equal(other_noise.split.train_indices, noisy_datamodule.split.train_indices)
    assert not torch.equal(other_noise.split.noisy_mask, noisy_datamodule.split.noisy_mask)
    assert int(other_noise.split.noisy_mask.sum()) == 11000
    other_split = build(split_seed=2)
    assert not torch.equal(other_split.split.val_indices, noisy_datamodule.split.val_indices)


def test_fashion_mnist_train_subset_and_no_validation():
    dm = FashionMNISTDataModule(val_size=0, train_subset=1000, label_noise=0.3, batch_size=64)
    dm.setup("fit")
    assert len(dm.train_dataset) == 1000 and dm.split.val_indices.numel() == 0
    assert int(dm.split.noisy_mask.sum()) == 300  # noise is applied to the subset actually trained on
    assert dm.val_dataloader() == []
    assert len(dm.train_dataloader()) == 16  # ceil(1000 / 64): drop_last=False


def test_fashion_mnist_loaders(noisy_datamodule):
    dm = noisy_datamodule
    train, val = dm.train_dataloader(), dm.val_dataloader()
    test, predict = dm.test_dataloader(), dm.predict_dataloader()
    assert isinstance(train.sampler, RandomSampler) and not train.drop_last
    for loader in (val, test, predict):
        assert isinstance(loader.sampler, SequentialSampler)
    x, y = next(iter(train))
    assert x.shape == (128, 1, 28, 28) and x.dtype == torch.float32 and y.shape == (128,) and y.dtype == torch.int64
    x, y = next(iter(val))
    assert torch.equal(x, dm.val_dataset.images[:128]) and torch.equal(y, dm.val_dataset.targets[:128])
    assert train.persistent_workers is False and train.num_workers == 0
    workers = FashionMNISTDataModule(num_workers=2, train_subset=10)
    workers.setup("fit")
    assert workers.train_dataloader().persistent_workers and workers.train_dataloader().num_workers == 2
    assert FashionMNISTDataModule.num_classes == 10 and FashionMNISTDataModule.dims == (1, 28, 28)


def test_fashion_mnist_augmentation_is_on_training_batches_only():
    dm = FashionMNISTDataModule(val_size=256, train_subset=256, augment=True, batch_size=256)
    dm.setup("fit")
    torch.manual_seed(0)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (256, 1, 28, 28) and x.dtype == torch.float32
    # Without augmentation every image would be one of the dataset's; a crop is unchanged only for the centre offset
    # without a flip (1 in 50).
    unchanged = (torch.cdist(x.flatten(1), dm.train_dataset.images.flatten(1)) < 1e-3).any(1)
    assert int(unchanged.sum()) < 30
    x_val, _ = next(iter(dm.val_dataloader()))
    assert torch.equal(x_val, dm.val_dataset.images)  # validation untouched


def test_random_crop_flip_is_a_padded_crop_or_its_mirror():
    torch.manual_seed(0)
    images = torch.randn(32, 2, 8, 8)
    fill = -0.81
    out = RandomCropFlip(padding=2, fill=fill)(images)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2), value=fill)
    flips = 0
    for image, result in zip(padded, out):
        crops = [image[:, dy : dy + 8, dx : dx + 8] for dy in range(5) for dx in range(5)]
        plain = any(torch.equal(result, crop) for crop in crops)
        mirrored = any(torch.equal(result, crop.flip(-1)) for crop in crops)
        assert plain or mirrored
        flips += mirrored and not plain
    assert 4 < flips < 28  # about half are flipped
    for image, result in zip(images, RandomCropFlip(padding=0)(images)):  # padding 0: only flips
        assert torch.equal(result, image) or torch.equal(result, image.flip(-1))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(batch_size=0), "batch_size must be >= 1, got 0"),
        (dict(batch_size=True), "batch_size must be an int, got True"),
        (dict(num_workers=-1), "num_workers must be >= 0"),
        (dict(val_size=-1), r"val_size must be in \[0, 59999\], got -1"),
        (dict(val_size=60000), r"val_size must be in \[0, 59999\], got 60000"),
        (dict(label_noise=1.0), r"label_noise must be a float in \[0, 1\), got 1.0"),
        (dict(label_noise=-0.2), r"label_noise must be a float in \[0, 1\)"),
        (dict(noise_seed=-1), "noise_seed must be >= 0"),
        (dict(split_seed=0.5), "split_seed must be an int"),
        (dict(train_subset=0), r"train_subset must be in \[1, 55000\], got 0"),
        (dict(train_subset=55001), r"train_subset must be in \[1, 55000\], got 55001"),
        (dict(augment="yes"), "augment must be a bool"),
        (dict(data_dir=3), "data_dir must be a path or None"),
    ],
)
def test_fashion_mnist_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FashionMNISTDataModule(**kwargs)


def test_fashion_mnist_dataloader_before_setup_is_an_error():
    with pytest.raises(RuntimeError, match=r"call setup\('fit'\)"):
        FashionMNISTDataModule().train_dataloader()


# ---------------------------------------------------------------------------------------------------------- CIFAR
class FakeCIFAR(torch.utils.data.Dataset):
    """A torchvision-CIFAR look-alike: uint8 HWC images in ``data``, a list of ints in ``targets``."""

    base_folder = "fake-cifar-batches"
    url = "https://example.invalid/fake.tar.gz"
    calls: list[dict] = []

    def __init__(self, root, train=True, transform=None, download=False):
        type(self).calls.append(dict(root=root, train=train, download=download))
        n = 200 if train else 50
        rng = np.random.default_rng(0 if train else 1)
        self.data = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        self.targets = [int(t) for t in rng.integers(0, 10, n)]
        self.transform = transform

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        return self.transform(Image.fromarray(self.data[index])), self.targets[index]


@pytest.fixture
def fake_cifar(monkeypatch):
    FakeCIFAR.calls = []
    monkeypatch.setattr(CIFAR10DataModule, "dataset_cls", FakeCIFAR)
    return FakeCIFAR


def test_cifar_label_noise_replaces_training_targets_only(fake_cifar):
    dm = CIFAR10DataModule(data_dir="unused", batch_size=16, num_workers=0, label_noise=0.25, noise_seed=5, val_size=40)
    dm.setup()
    clean = torch.tensor(FakeCIFAR("x").targets)
    split = dm.split
    assert len(dm.train_dataset) == 160 and len(dm.val_dataset) == 40 and len(dm.test_dataset) == 50
    assert all(not call["download"] for call in fake_cifar.calls)  # setup never downloads
    train_targets = torch.tensor(dm.train_dataset.dataset.targets)
    assert torch.equal(train_targets[split.train_indices], split.train_targets)
    assert int((train_targets != clean).sum()) == 40  # exactly 25% of the 160 training labels
    assert torch.equal(train_targets[split.val_indices], clean[split.val_indices])
    assert dm.val_dataset.dataset.targets == clean.tolist()  # a separate, clean instance
    assert dm.test_dataset.targets == FakeCIFAR("x", train=False).targets
    # Items follow the split: train_dataset[i] is example train_indices[i] with its (possibly noisy) label.
    _, label = dm.train_dataset[7]
    assert label == int(split.train_targets[7])
    again = CIFAR10DataModule(data_dir="unused", label_noise=0.25, noise_seed=5, val_size=40)
    again.setup("fit")
    assert again.train_dataset.dataset.targets == dm.train_dataset.dataset.targets


def test_cifar_transforms_and_batches(fake_cifar):
    dm = CIFAR10DataModule(num_workers=0, batch_size=8, cutout=16)
    steps = dm.train_transform().transforms
    assert [type(step) for step in steps] == [T.RandomCrop, T.RandomHorizontalFlip, T.ToTensor, T.Normalize, Cutout]
    assert steps[0].size == (32, 32) and steps[0].padding == 4 and steps[4].size == 16
    assert tuple(steps[3].mean) == (0.4914, 0.4822, 0.4465) and tuple(steps[3].std) == (0.2470, 0.2435, 0.2616)
    assert [type(step) for step in dm.eval_transform().transforms] == [T.ToTensor, T.Normalize]
    assert Cutout not in [type(step) for step in CIFAR10DataModule().train_transform().transforms]
    dm.setup("fit")
    assert dm.val_dataloader() == []
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, RandomSampler)
    x, y = next(iter(loader))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (8,)
    # A mean-coloured image normalizes to zero.
    mean_image = Image.fromarray(np.full((32, 32, 3), [round(m * 255) for m in dm.mean], dtype=np.uint8))
    assert dm.eval_transform()(mean_image).abs().max() < 0.01


def test_cifar100_shares_the_base_class():
    assert issubclass(CIFAR10DataModule, CIFARDataModule) and issubclass(CIFAR100DataModule, CIFARDataModule)
    assert CIFAR10DataModule.num_classes == 10 and CIFAR100DataModule.num_classes == 100
    assert CIFAR100DataModule.mean != CIFAR10DataModule.mean
    assert CIFAR100DataModule().train_transform().transforms[3].mean == CIFAR100DataModule.mean
    with pytest.raises(TypeError, match="base class"):
        CIFARDataModule()


def test_cifar_prepare_data_downloads_only_there(fake_cifar, tmp_path):
    CIFAR10DataModule(data_dir=str(tmp_path), download=True).prepare_data()
    assert fake_cifar.calls == [
        dict(root=str(tmp_path), train=True, download=True),
        dict(root=str(tmp_path), train=False, download=True),
    ]


def test_cifar_missing_data_without_download(tmp_path):
    dm = CIFAR10DataModule(data_dir=str(tmp_path), download=False)  # the real torchvision dataset
    with pytest.raises(FileNotFoundError) as info:
        dm.prepare_data()
    message = str(info.value)
    assert "CIFAR-10 not found" in message and str(tmp_path) in message
    assert "download=True" in message and "cifar-10-batches-py" in message and "cifar-10-python.tar.gz" in message
    with pytest.raises(FileNotFoundError, match="download=True"):
        dm.setup("fit")
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        CIFAR100DataModule(data_dir=str(tmp_path), download=False).setup("test")
    assert list(tmp_path.iterdir()) == []  # nothing was downloaded


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(cutout=-1), r"cutout must be in \[0, 32\], got -1"),
        (dict(cutout=33), r"cutout must be in \[0, 32\], got 33"),
        (dict(label_noise=1), r"label_noise must be a float in \[0, 1\), got 1"),
        (dict(val_size=50000), r"val_size must be in \[0, 49999\], got 50000"),
        (dict(batch_size=0), "batch_size must be >= 1"),
        (dict(download="no"), "download must be a bool"),
        (dict(data_dir=None), "data_dir must be a path"),
    ],
)
def test_cifar_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CIFAR10DataModule(**kwargs)


def test_cutout_zeroes_one_clipped_square():
    torch.manual_seed(0)
    image = torch.randn(3, 32, 32) + 10.0  # no zeros of its own
    full_squares = 0
    for _ in range(200):
        out = Cutout(8)(image)
        zero = out == 0
        assert torch.equal(zero[0], zero[1]) and torch.equal(zero[0], zero[2])  # same hole in every channel
        rows, cols = zero[0].any(1).nonzero().flatten(), zero[0].any(0).nonzero().flatten()
        assert 4 <= rows.numel() <= 8 and 4 <= cols.numel() <= 8  # clipped at a border, never below size/2
        assert rows.numel() == int(rows[-1] - rows[0]) + 1 and cols.numel() == int(cols[-1] - cols[0]) + 1
        assert int(zero[0].sum()) == rows.numel() * cols.numel()  # a solid rectangle
        assert torch.equal(out[~zero], image[~zero])  # nothing else changes
        full_squares += rows.numel() == 8 and cols.numel() == 8
    assert 100 < full_squares < 200  # mostly inside, sometimes clipped
    assert not (image == 0).any()  # the input is not modified
    with pytest.raises(ValueError, match="cutout size must be >= 1, got 0"):
        Cutout(0)
