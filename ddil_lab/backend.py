"""The Backend contract: everything that differs between a 2D mixture, a small image model and
Stable Diffusion, and nothing else (see shared/DESIGN.md).

A backend provides
    schedule                       the teacher's ``Schedule``
    teacher                        a frozen Denoiser ``(x_t, t, cond) -> x0_hat`` (guided, if the
                                   backend distils under classifier-free guidance)
    support                        ``Threshold`` that keeps x0 on the data support (reflection)
    has_data                       False for data-free distillation (prompts only)
    sample_data(n, generator)      (x0, cond) from the data, in the model's space (latents for SD)
    sample_cond(n, generator)      a conditioning batch without data
    sample_noise(n, generator)     x_T ~ N(0, I) of the model's shape
    make_student()                 a trainable Denoiser initialised from the teacher's network
    make_critic()                  a trainable copy of the teacher's network (DMD2's fake critic)
    make_random_critic()           the same network, freshly initialised (DMD2's critic_init)
    decode(x)                      model space -> data space (identity, or the VAE decoder)
Optional: ``plot_samples(x, ax)`` draws samples the way this tier shows them.
"""

from __future__ import annotations

import torch


class Backend:
    schedule = None
    teacher = None
    support = None
    has_data = True
    shape: tuple = ()

    def sample_data(self, n: int, generator: torch.Generator | None = None):
        raise NotImplementedError

    def sample_cond(self, n: int, generator: torch.Generator | None = None):
        return None

    def sample_noise(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn((n, *self.shape), generator=generator)

    def make_student(self) -> torch.nn.Module:
        raise NotImplementedError

    def make_critic(self) -> torch.nn.Module:
        return self.make_student()

    def make_random_critic(self) -> torch.nn.Module:
        """``make_critic()`` with every layer's weights re-drawn (its ``reset_parameters``,
        from torch's global random stream)."""
        net = self.make_critic()
        with torch.no_grad():
            for m in net.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
        return net

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return x
