"""Data modules for the experiments: Fashion-MNIST (CPU-sized, offline) and CIFAR-10/100, with label noise.

Example:

    from lightning_sam.data import FashionMNISTDataModule, symmetric_label_noise

    datamodule = FashionMNISTDataModule(label_noise=0.2, augment=True)
"""

from lightning_sam.data._common import NoisySplit
from lightning_sam.data.cifar import CIFAR10DataModule, CIFAR100DataModule, CIFARDataModule, Cutout
from lightning_sam.data.fashion_mnist import (
    FashionMNISTDataModule,
    RandomCropFlip,
    TensorImageDataset,
    find_fashion_mnist,
    load_fashion_mnist,
    read_idx,
)
from lightning_sam.data.label_noise import noisy_indices, symmetric_label_noise

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "CIFARDataModule",
    "Cutout",
    "FashionMNISTDataModule",
    "NoisySplit",
    "RandomCropFlip",
    "TensorImageDataset",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "noisy_indices",
    "read_idx",
    "symmetric_label_noise",
]
