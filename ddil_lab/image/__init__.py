"""The image tier: small diffusers UNet teachers on pixels (offline digits, CIFAR-10), their
training, the backend, image metrics (``image.metrics``) and plots (``image.plots``)."""
from .backend import (CIFAR_NET, DIGITS_NET, NETS, TINY_NET, ImageBackend, UNet, load_teacher,
                      num_params, read_teacher_config, train_teacher)
from .data import DATASETS, ImageData, load_cifar10, load_digits, make_data

__all__ = ["CIFAR_NET", "DATASETS", "DIGITS_NET", "NETS", "TINY_NET", "ImageBackend",
           "ImageData", "UNet", "load_cifar10", "load_digits", "load_teacher", "make_data",
           "num_params", "read_teacher_config", "train_teacher"]
