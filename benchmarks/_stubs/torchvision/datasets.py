"""Stub of ``torchvision.datasets``: the classes ``timm.data.dataset_factory`` imports unconditionally."""

from torchvision import unavailable

CIFAR10 = unavailable("CIFAR10")
CIFAR100 = unavailable("CIFAR100")
MNIST = unavailable("MNIST")
KMNIST = unavailable("KMNIST")
FashionMNIST = unavailable("FashionMNIST")
ImageFolder = unavailable("ImageFolder")
