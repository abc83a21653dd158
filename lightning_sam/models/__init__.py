"""Networks and the LightningModule used in the experiments.

Example:

    from lightning_sam.models import ImageClassifier, SmallCNN, WideResNet

    module = ImageClassifier(WideResNet(depth=28, widen_factor=10, num_classes=10))
"""

from lightning_sam.models.classifier import ImageClassifier, default_optimizer, infer_num_classes
from lightning_sam.models.resnet import BasicBlock, ResNet18
from lightning_sam.models.small_cnn import SmallCNN
from lightning_sam.models.wide_resnet import WideBasicBlock, WideResNet

__all__ = [
    "BasicBlock",
    "ImageClassifier",
    "ResNet18",
    "SmallCNN",
    "WideBasicBlock",
    "WideResNet",
    "default_optimizer",
    "infer_num_classes",
]
