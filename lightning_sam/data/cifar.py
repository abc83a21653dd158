"""CIFAR-10 and CIFAR-100 with the SAM paper's augmentation, optional Cutout and symmetric label noise."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Optional, Union

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import datasets
from torchvision import transforms as T

from lightning_sam.data._common import NoisySplit, check_int, check_split_args, loader_kwargs, split_with_noise


class Cutout:
    """Cutout (DeVries & Taylor, 2017): zero one ``size`` x ``size`` square of an image tensor.

    The square's centre is uniform over the image, and the square is clipped at the borders (so it can be smaller
    than ``size`` near an edge). Put it after ``Normalize``: the hole is then 0, the dataset mean. Uses the global
    torch RNG, which DataLoader seeds per worker.

    Args:
        size: Side of the square, in pixels (>= 1).

    Example:

        transform = T.Compose([T.ToTensor(), T.Normalize(mean, std), Cutout(16)])
    """

    def __init__(self, size: int) -> None:
        check_int("cutout size", size, minimum=1)
        self.size = size

    def __call__(self, image: Tensor) -> Tensor:
        """Return a copy of ``image`` (``(..., H, W)``) with the square set to 0."""
        h, w = image.shape[-2:]
        cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
        top, left = cy - self.size // 2, cx - self.size // 2
        out = image.clone()
        out[..., max(top, 0) : top + self.size, max(left, 0) : left + self.size] = 0  # slicing clips the far side
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"


class CIFARDataModule(LightningDataModule):
    """The data module shared by ``CIFAR10DataModule`` and ``CIFAR100DataModule``.

    A subclass sets ``dataset_cls`` (a torchvision CIFAR dataset class), ``name``, ``num_classes``, ``mean`` and
    ``std``. Training images get the SAM paper's augmentation (``RandomCrop(32, padding=4)``,
    ``RandomHorizontalFlip``), then ``ToTensor``, ``Normalize`` and, if ``cutout > 0``, ``Cutout``; validation
    and test images only ``ToTensor`` and ``Normalize``. The validation set (``val_size > 0``) is the last
    ``val_size`` positions of a permutation of the training set drawn with ``split_seed``. Symmetric label noise
    (``symmetric_label_noise``) replaces the training examples' ``targets`` in the training
    dataset; the validation and test labels stay clean. After ``setup``, ``self.split`` (a
    ``NoisySplit``) records the split, the clean labels and the corrupted positions, and
    ``self.train_dataset[i]`` is the example at ``self.split.train_indices[i]``.

    Args:
        data_dir: Root folder of the torchvision dataset (holding ``cifar-10-batches-py`` / ``cifar-100-python``).
        batch_size: Examples per batch (every loader).
        num_workers: DataLoader worker processes (PIL augmentation is CPU-bound: use several).
        download: Download the data in ``prepare_data`` if missing.
        cutout: Side of the Cutout square; 0 disables it (16 is usual for CIFAR-10, 8 for CIFAR-100).
        label_noise: Fraction of training labels replaced by another class, in ``[0, 1)``.
        noise_seed: Seed of the label noise.
        val_size: Training images held out for validation; 0: no validation loader.
        split_seed: Seed of the train/validation permutation.

    Raises:
        ValueError: for an argument out of range (at construction).
        FileNotFoundError: in ``prepare_data`` / ``setup`` when the data are missing and ``download=False``.

    Example:

        datamodule = CIFAR10DataModule(data_dir="data", batch_size=128, cutout=16, label_noise=0.2)
        Trainer(max_epochs=200).fit(model, datamodule=datamodule)
    """

    dataset_cls: ClassVar[Optional[type[datasets.CIFAR10]]] = None
    name: ClassVar[str] = "CIFAR"
    num_classes: ClassVar[int] = 0
    mean: ClassVar[tuple[float, float, float]] = (0.0, 0.0, 0.0)
    std: ClassVar[tuple[float, float, float]] = (1.0, 1.0, 1.0)
    dims = (3, 32, 32)
    train_size: ClassVar[int] = 50_000

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 128,
        num_workers: int = 4,
        download: bool = True,
        cutout: int = 0,
        label_noise: float = 0.0,
        noise_seed: int = 0,
        val_size: int = 0,
        split_seed: int = 0,
    ) -> None:
        super().__init__()
        if self.dataset_cls is None:
            raise TypeError(f"{type(self).__name__} is a base class: use CIFAR10DataModule or CIFAR100DataModule")
        if not isinstance(data_dir, (str, Path)):
            raise ValueError(f"data_dir must be a path, got {data_dir!r}")
        check_split_args(
            batch_size=batch_size,
            num_workers=num_workers,
            val_size=val_size,
            train_size=self.train_size,
            label_noise=label_noise,
            noise_seed=noise_seed,
            split_seed=split_seed,
        )
        if not isinstance(download, bool):
            raise ValueError(f"download must be a bool, got {download!r}")
        check_int("cutout", cutout, minimum=0, maximum=self.dims[1])
        self.save_hyperparameters()
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.download = download
        self.cutout = cutout
        self.label_noise = label_noise
        self.noise_seed = noise_seed
        self.val_size = val_size
        self.split_seed = split_seed

        self.split: Optional[NoisySplit] = None
        self.train_dataset: Optional[Dataset] = None
        self.val_dataset: Optional[Dataset] = None
        self.test_dataset: Optional[Dataset] = None

    # ------------------------------------------------------------------ transforms
    def train_transform(self) -> T.Compose:
        """Random crop (padding 4), horizontal flip, ``ToTensor``, ``Normalize`` and the optional Cutout."""
        steps: list[Any] = [
            T.RandomCrop(32, padding=4),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(self.mean, self.std),
        ]
        if self.cutout > 0:
            steps.append(Cutout(self.cutout))
        return T.Compose(steps)

    def eval_transform(self) -> T.Compose:
        """``ToTensor`` and ``Normalize``."""
        return T.Compose([T.ToTensor(), T.Normalize(self.mean, self.std)])

    # ------------------------------------------------------------------ data
    def prepare_data(self) -> None:
        if self.download:
            for train in (True, False):
                self.dataset_cls(self.data_dir, train=train, download=True)
        elif not (Path(self.data_dir) / self.dataset_cls.base_folder).is_dir():
            raise FileNotFoundError(self._missing_message())

    def setup(self, stage: Optional[str] = None) -> None:
        if stage in (None, "fit", "validate") and self.train_dataset is None:
            train_set = self._dataset(train=True, transform=self.train_transform())
            targets = torch.as_tensor(train_set.targets, dtype=torch.long)
            self.split = split_with_noise(
                targets,
                val_size=self.val_size,
                split_seed=self.split_seed,
                label_noise=self.label_noise,
                noise_seed=self.noise_seed,
                num_classes=self.num_classes,
            )
            noisy = targets.clone()
            noisy[self.split.train_indices] = self.split.train_targets
            train_set.targets = noisy.tolist()  # torchvision keeps a list of ints
            self.train_dataset = Subset(train_set, self.split.train_indices.tolist())
            if self.val_size > 0:
                # A second instance of the training set: no augmentation, and its targets are the clean ones.
                val_set = self._dataset(train=True, transform=self.eval_transform())
                self.val_dataset = Subset(val_set, self.split.val_indices.tolist())
        if stage in (None, "test", "predict") and self.test_dataset is None:
            self.test_dataset = self._dataset(train=False, transform=self.eval_transform())

    def _dataset(self, train: bool, transform: Any) -> datasets.CIFAR10:
        try:
            # Never download here: setup runs on every rank, prepare_data on one.
            return self.dataset_cls(self.data_dir, train=train, transform=transform, download=False)
        except RuntimeError as err:  # torchvision: "Dataset not found or corrupted"
            raise FileNotFoundError(self._missing_message()) from err

    def _missing_message(self) -> str:
        root = Path(self.data_dir).expanduser().resolve()
        folder = getattr(self.dataset_cls, "base_folder", "?")
        url = getattr(self.dataset_cls, "url", "the dataset's site")
        return (
            f"{self.name} not found (or corrupted) under {root}: expected the folder {folder!r} there. Set"
            f" download=True to fetch it, or download {url} and extract it into {root}."
        )

    # ------------------------------------------------------------------ loaders
    def train_dataloader(self) -> DataLoader:
        return self._loader(self._ready(self.train_dataset, "fit"), shuffle=True)

    def val_dataloader(self) -> Union[DataLoader, list]:
        if self.val_size == 0:
            return []  # Lightning skips validation for an empty list
        return self._loader(self._ready(self.val_dataset, "fit"))

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._ready(self.test_dataset, "test"))

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self._ready(self.test_dataset, "predict"))

    def _loader(self, dataset: Dataset, shuffle: bool = False) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=False,
            pin_memory=torch.cuda.is_available(),  # host-to-GPU copies from pinned memory overlap with compute
            **loader_kwargs(self.num_workers),
        )

    @staticmethod
    def _ready(dataset: Optional[Dataset], stage: str) -> Dataset:
        if dataset is None:
            raise RuntimeError(f"call setup({stage!r}) before asking for this dataloader")
        return dataset


class CIFAR10DataModule(CIFARDataModule):
    """CIFAR-10 (10 classes, 50,000 training and 10,000 test images); see ``CIFARDataModule`` for the args.

    Example:

        datamodule = CIFAR10DataModule(data_dir="data", cutout=16)
    """

    dataset_cls = datasets.CIFAR10
    name = "CIFAR-10"
    num_classes = 10
    # Per-channel mean and standard deviation of the training pixels.
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)


class CIFAR100DataModule(CIFARDataModule):
    """CIFAR-100 (100 classes, 50,000 training and 10,000 test images); see ``CIFARDataModule`` for the args.

    Example:

        datamodule = CIFAR100DataModule(data_dir="data", cutout=8, label_noise=0.4)
    """

    dataset_cls = datasets.CIFAR100
    name = "CIFAR-100"
    num_classes = 100
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)
