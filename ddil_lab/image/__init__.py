"""The image tier: small diffusers UNet teachers on pixels (offline digits, CIFAR-10), their
training, pretrained DDPM teachers (``image.pretrained``: google/ddpm-cifar10-32's layout), the
backend, image metrics (``image.metrics``), the CIFAR-10 FID-50k protocol (``image.protocol``)
and plots (``image.plots``)."""
from .backend import (CIFAR_NET, DIGITS_NET, NETS, SMALL_NET, TINY_NET, ImageBackend, UNet,
                      check_args, load_teacher, num_params, read_teacher_config, train_teacher)
from .data import DATASETS, ImageData, load_cifar10, load_digits, make_data
from .pretrained import export_student, load_pretrained, load_student, make_ddpm_folder

__all__ = ["CIFAR_NET", "DATASETS", "DIGITS_NET", "NETS", "SMALL_NET", "TINY_NET", "ImageBackend",
           "ImageData", "UNet", "check_args", "export_student", "load_cifar10", "load_digits",
           "load_pretrained", "load_student", "load_teacher", "make_data", "make_ddpm_folder",
           "num_params", "read_teacher_config", "train_teacher"]
