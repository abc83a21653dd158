"""Fashion-MNIST from the original gzip IDX files, held in memory, with optional label noise and augmentation."""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_sam.data._common import NoisySplit, check_int, check_split_args, loader_kwargs, split_with_noise

FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's ``dataset-fashion-mnist`` package installs the files."""

FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
IDX_IMAGES_MAGIC = 0x00000803  # 2051: unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 0x00000801  # 2049: unsigned bytes, 1 dimension

# IDX type codes (third byte of the magic number); multi-byte values are big-endian.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

PathLike = Union[str, "os.PathLike[str]"]


# ---------------------------------------------------------------------------------------------------------- IDX files
def read_idx(path: PathLike, magic: Optional[int] = None) -> Tensor:
    """Read a gzip-compressed IDX file (the MNIST / Fashion-MNIST format) into a tensor.

    Args:
        path: The ``.gz`` file.
        magic: The expected magic number (e.g. ``0x803`` for images, ``0x801`` for labels); ``None`` accepts any
            valid IDX header.

    Returns:
        A tensor of the file's shape, in the file's type (``torch.uint8`` for Fashion-MNIST).

    Raises:
        ValueError: if the file is not gzip, not IDX, has another magic number than ``magic``, or is truncated.

    Example:

        labels = read_idx("/usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz", magic=0x801)
        labels.shape  # torch.Size([60000])
    """
    path = Path(path)
    with open(path, "rb") as raw:  # outside the try: a missing file stays a FileNotFoundError
        try:
            data = gzip.decompress(raw.read())
        except (OSError, EOFError) as err:
            raise ValueError(f"{path}: not a readable gzip file ({err})") from err
    if len(data) < 4:
        raise ValueError(f"{path}: too short for an IDX header ({len(data)} bytes)")
    found = int.from_bytes(data[:4], "big")
    type_code, ndim = data[2], data[3]
    if data[0] != 0 or data[1] != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(
            f"{path}: not an IDX file: bad magic number 0x{found:08x} (expected 0x0000TTDD with a type code TT in"
            f" {{{', '.join(f'{code:02x}' for code in _IDX_DTYPES)}}} and DD >= 1 dimensions)"
        )
    if magic is not None and found != magic:
        raise ValueError(f"{path}: magic number 0x{found:08x} ({found}), expected 0x{magic:08x} ({magic})")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(data)} bytes, {ndim} dimensions need {header})")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[type_code])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(
            f"{path}: shape {shape} needs {expected} bytes of data after the header, found {len(data) - header}"
        )
    # Copy into native byte order: torch has no big-endian tensors and needs a writable buffer.
    array = np.frombuffer(data, dtype=dtype, offset=header).astype(dtype.newbyteorder("="))
    return torch.from_numpy(array.reshape(shape))


def find_fashion_mnist(data_dir: Optional[PathLike] = None) -> Path:
    """The folder that holds the four Fashion-MNIST ``.gz`` files.

    Args:
        data_dir: A folder with the four files, or a torchvision root with ``FashionMNIST/raw/*.gz`` (as left by
            ``torchvision.datasets.FashionMNIST(root, download=True)``). ``None``: Debian's
            ``/usr/share/datasets/fashion-mnist``.

    Raises:
        FileNotFoundError: naming every folder looked at, what was missing there, and how to get the data.

    Example:

        folder = find_fashion_mnist()  # PosixPath('/usr/share/datasets/fashion-mnist')
    """
    if data_dir is None:
        candidates = [SYSTEM_DIR]
    else:
        root = Path(data_dir).expanduser()
        candidates = [root, root / "FashionMNIST" / "raw", root / "raw"]
    report = []
    for folder in candidates:
        missing = [name for name in FILES.values() if not (folder / name).is_file()]
        if not missing:
            return folder
        reason = "no such folder" if not folder.is_dir() else "missing " + ", ".join(missing)
        report.append(f"  {folder}: {reason}")
    raise FileNotFoundError(
        "Fashion-MNIST not found: need " + ", ".join(FILES.values()) + ". Looked in:\n" + "\n".join(report) + "\n"
        "To get it: `apt-get install dataset-fashion-mnist` (Debian/Ubuntu; installs to "
        f"{SYSTEM_DIR}), or `python -c \"import torchvision; torchvision.datasets.FashionMNIST('DIR', download=True)\"`"
        " and then pass data_dir=DIR."
    )


def load_fashion_mnist(folder: PathLike, train: bool) -> tuple[Tensor, Tensor]:
    """The training (60,000) or test (10,000) images and labels of Fashion-MNIST, as stored.

    Args:
        folder: A folder holding the four ``.gz`` files (see ``find_fashion_mnist``).
        train: The training set if True, else the test set.

    Returns:
        ``(images, labels)``: ``uint8`` images of shape ``(N, 28, 28)`` and ``int64`` labels of shape ``(N,)``.

    Example:

        images, labels = load_fashion_mnist(find_fashion_mnist(), train=False)
    """
    split = "train" if train else "test"
    images = read_idx(Path(folder) / FILES[f"{split}_images"], magic=IDX_IMAGES_MAGIC)
    labels = read_idx(Path(folder) / FILES[f"{split}_labels"], magic=IDX_LABELS_MAGIC).long()
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{folder}: {images.shape[0]} {split} images but {labels.shape[0]} labels")
    return images, labels


def normalize(images: Tensor) -> Tensor:
    """``uint8`` images ``(N, H, W)`` to normalized ``float32`` ``(N, 1, H, W)`` (mean 0.2860, std 0.3530)."""
    return images.unsqueeze(1).float().div_(255.0).sub_(FASHION_MNIST_MEAN).div_(FASHION_MNIST_STD)


# ------------------------------------------------------------------------------------- dataset and augmentation
class TensorImageDataset(Dataset):
    """Images and labels held as two tensors; item ``i`` is ``(images[i], targets[i])``.

    Args:
        images: ``(N, C, H, W)`` float tensor.
        targets: ``(N,)`` integer labels.

    Example:

        dataset = TensorImageDataset(torch.zeros(4, 1, 28, 28), torch.arange(4))
        image, label = dataset[0]
    """

    def __init__(self, images: Tensor, targets: Tensor) -> None:
        if images.shape[0] != targets.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {targets.shape[0]} targets")
        self.images = images
        self.targets = targets

    def __len__(self) -> int:
        return self.targets.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.targets[index]


class RandomCropFlip:
    """Random crop after zero-padding and random horizontal flip, for a whole batch at once.

    Each image gets its own offset (uniform in ``[0, 2 * padding]`` on both axes, as torchvision's
    ``RandomCrop(size, padding)``) and its own coin for the flip. Both are done by one gather, so a batch of 128
    Fashion-MNIST images takes well under a millisecond. Uses the global torch RNG (seeded per DataLoader worker).

    Args:
        padding: Pixels of padding on each side.
        fill: Value of the padding: that of a black pixel after normalization.

    Example:

        augment = RandomCropFlip(padding=2, fill=-FASHION_MNIST_MEAN / FASHION_MNIST_STD)
        batch = augment(torch.randn(128, 1, 28, 28))  # same shape
    """

    def __init__(self, padding: int = 2, fill: float = 0.0) -> None:
        check_int("padding", padding, minimum=0)
        self.padding = padding
        self.fill = fill

    def __call__(self, images: Tensor) -> Tensor:
        b, c, h, w = images.shape
        p = self.padding
        padded = F.pad(images, (p, p, p, p), value=self.fill)
        rows = torch.randint(0, 2 * p + 1, (b, 1)) + torch.arange(h)
        cols = torch.randint(0, 2 * p + 1, (b, 1)) + torch.arange(w)
        flip = torch.rand(b, 1) < 0.5
        cols = torch.where(flip, cols.flip(1), cols)  # a flip is the crop's columns read backwards
        # One flat gather per image: much faster than 4-D advanced indexing.
        index = (rows[:, :, None] * (w + 2 * p) + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
        return padded.flatten(2).gather(2, index).view(b, c, h, w)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(padding={self.padding}, fill={self.fill:.4f})"


class StackCollate:
    """Collate ``(image, label)`` pairs into ``(images, labels)`` and apply an optional whole-batch transform.

    A class rather than a closure, so that DataLoader workers can pickle it under any start method.
    """

    def __init__(self, transform: Optional[Callable[[Tensor], Tensor]] = None) -> None:
        self.transform = transform

    def __call__(self, samples: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        images = torch.stack([sample[0] for sample in samples])
        targets = torch.stack([sample[1] for sample in samples])
        if self.transform is not None:
            images = self.transform(images)
        return images, targets


# ------------------------------------------------------------------------------------------------------- data module
class FashionMNISTDataModule(LightningDataModule):
    """Fashion-MNIST (Xiao et al., 2017), read from the original gzip IDX files and held in memory.

    The 60,000 training images are split by a permutation drawn with ``split_seed``: its last ``val_size`` positions
    are the validation set, the rest the training set. Symmetric label noise (see
    ``symmetric_label_noise``) then corrupts the training labels only; the validation and
    test labels are always the true ones. After ``setup``, ``self.split`` (a ``NoisySplit``) records the
    split, the clean training labels and which of them were corrupted. Batches are ``(images, labels)`` with images
    ``(B, 1, 28, 28)`` normalized with mean 0.2860 and std 0.3530.

    Args:
        data_dir: A folder with the four ``.gz`` files or a torchvision root with ``FashionMNIST/raw/``; ``None``:
            ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist``).
        batch_size: Examples per batch (every loader).
        num_workers: DataLoader worker processes (0: load in the main process, the fastest for in-memory data).
        val_size: Training images held out for validation; 0: no validation loader.
        label_noise: Fraction of training labels replaced by another class, in ``[0, 1)``.
        noise_seed: Seed of the label noise.
        split_seed: Seed of the train/validation permutation.
        train_subset: Keep only the first ``train_subset`` training examples of the permutation (for fast runs);
            the noise is applied to these, so the realised rate is still ``label_noise``.
        augment: Random crop (padding 2) and horizontal flip of the training images, on the fly.

    Raises:
        ValueError: for an argument out of range (at construction).
        FileNotFoundError: in ``prepare_data`` / ``setup``, when the files are nowhere to be found.

    Example:

        from lightning.pytorch import Trainer
        from lightning_sam.data import FashionMNISTDataModule

        datamodule = FashionMNISTDataModule(batch_size=128, label_noise=0.2)
        Trainer(max_epochs=2).fit(model, datamodule=datamodule)
    """

    num_classes = 10
    dims = (1, 28, 28)
    train_size = 60_000

    def __init__(
        self,
        data_dir: Optional[str] = None,
        batch_size: int = 128,
        num_workers: int = 0,
        val_size: int = 5000,
        label_noise: float = 0.0,
        noise_seed: int = 0,
        split_seed: int = 0,
        train_subset: Optional[int] = None,
        augment: bool = False,
    ) -> None:
        super().__init__()
        if data_dir is not None and not isinstance(data_dir, (str, os.PathLike)):
            raise ValueError(f"data_dir must be a path or None, got {data_dir!r}")
        check_split_args(
            batch_size=batch_size,
            num_workers=num_workers,
            val_size=val_size,
            train_size=self.train_size,
            label_noise=label_noise,
            noise_seed=noise_seed,
            split_seed=split_seed,
        )
        if train_subset is not None:
            check_int("train_subset", train_subset, minimum=1, maximum=self.train_size - val_size)
        if not isinstance(augment, bool):
            raise ValueError(f"augment must be a bool, got {augment!r}")
        self.save_hyperparameters()
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_size = val_size
        self.label_noise = label_noise
        self.noise_seed = noise_seed
        self.split_seed = split_seed
        self.train_subset = train_subset
        self.augment = augment

        self.split: Optional[NoisySplit] = None
        self.train_dataset: Optional[TensorImageDataset] = None
        self.val_dataset: Optional[TensorImageDataset] = None
        self.test_dataset: Optional[TensorImageDataset] = None

    def prepare_data(self) -> None:
        # Nothing to download: fail here, before any model is built, if the files are missing.
        find_fashion_mnist(self.data_dir)

    def setup(self, stage: Optional[str] = None) -> None:
        folder = find_fashion_mnist(self.data_dir)
        if stage in (None, "fit", "validate") and self.train_dataset is None:
            images, labels = load_fashion_mnist(folder, train=True)
            self.split = split_with_noise(
                labels,
                val_size=self.val_size,
                split_seed=self.split_seed,
                label_noise=self.label_noise,
                noise_seed=self.noise_seed,
                num_classes=self.num_classes,
                train_subset=self.train_subset,
            )
            # Index the uint8 images before converting: only what is used becomes float.
            self.train_dataset = TensorImageDataset(
                normalize(images[self.split.train_indices]), self.split.train_targets
            )
            if self.val_size > 0:
                val = self.split.val_indices
                self.val_dataset = TensorImageDataset(normalize(images[val]), labels[val])
        if stage in (None, "test", "predict") and self.test_dataset is None:
            images, labels = load_fashion_mnist(folder, train=False)
            self.test_dataset = TensorImageDataset(normalize(images), labels)

    def train_dataloader(self) -> DataLoader:
        augment = RandomCropFlip(padding=2, fill=-FASHION_MNIST_MEAN / FASHION_MNIST_STD) if self.augment else None
        return self._loader(self._ready(self.train_dataset, "fit"), shuffle=True, transform=augment)

    def val_dataloader(self) -> Union[DataLoader, list]:
        if self.val_size == 0:
            return []  # Lightning skips validation for an empty list
        return self._loader(self._ready(self.val_dataset, "fit"))

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._ready(self.test_dataset, "test"))

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self._ready(self.test_dataset, "predict"))

    def _loader(
        self, dataset: Dataset, shuffle: bool = False, transform: Optional[Callable[[Tensor], Tensor]] = None
    ) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=False,
            collate_fn=StackCollate(transform),
            **loader_kwargs(self.num_workers),
        )

    @staticmethod
    def _ready(dataset: Optional[Dataset], stage: str) -> Dataset:
        if dataset is None:
            raise RuntimeError(f"call setup({stage!r}) before asking for this dataloader")
        return dataset

    def __repr__(self) -> str:
        args: dict[str, Any] = dict(self.hparams)
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in args.items())})"
