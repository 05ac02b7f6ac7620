"""The image tier: small diffusers UNet teachers on pixels (offline digits, CIFAR-10; the
network and the w-embedding of guidance-conditioned students in ``image.network``), their
training, pretrained DDPM teachers (``image.pretrained``: google/ddpm-cifar10-32's layout), the
backend, image metrics (``image.metrics``), the CIFAR-10 FID-50k protocol (``image.protocol``)
and plots (``image.plots``)."""
from .backend import (NETS, ImageBackend, check_args, load_teacher, num_params,
                      read_teacher_config, teacher_cache_dir, train_teacher)
from .network import CIFAR_NET, DIGITS_NET, SMALL_NET, TINY_NET, GuidanceEmbedding, UNet
from .data import DATASETS, ImageData, load_cifar10, load_digits, make_data
from .pretrained import export_student, load_pretrained, load_student, make_ddpm_folder

__all__ = ["CIFAR_NET", "DATASETS", "DIGITS_NET", "NETS", "SMALL_NET", "TINY_NET",
           "GuidanceEmbedding", "ImageBackend",
           "ImageData", "UNet", "check_args", "export_student", "load_cifar10", "load_digits",
           "load_pretrained", "load_student", "load_teacher", "make_data", "make_ddpm_folder",
           "num_params", "read_teacher_config", "teacher_cache_dir", "train_teacher"]
