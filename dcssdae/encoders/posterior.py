"""The latent distribution every encoder returns (`Posterior`) and the input check every encoder runs (`check_image`).

Imported by the encoder networks (`encoders/dc_ae.py`, `encoders/kl_f8.py`); imports nothing of ours.
"""

import torch

# ----------------------------------------------------------------------------------------------------------------
# Diagonal Gaussian posterior q(z|x) = N(mean, exp(logvar)) (Kingma & Welling, "Auto-Encoding Variational Bayes",
# ICLR 2014, Appendix B: closed-form KL to N(0, I)), or a deterministic latent when logvar is None.


class Posterior:
    """Latent distribution returned by every encoder.

    `mean` and `logvar` are float32 tensors of shape (B, c, H/f, W/f). `logvar` is None for a deterministic encoder:
    then `sample()` and `mode()` both return `mean` and `kl()` is zero. `logvar` is clamped to [-30, 20] (std between
    3e-7 and 2.2e4), as in the LDM posterior, so that exp() can neither underflow to a zero std nor overflow.
    """

    LOGVAR_RANGE = (-30.0, 20.0)

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor | None = None):
        if logvar is not None and logvar.shape != mean.shape:
            raise ValueError(f"Posterior: logvar shape {tuple(logvar.shape)} != mean shape {tuple(mean.shape)}")
        self.mean = mean.float()
        self.logvar = None if logvar is None else logvar.float().clamp(*self.LOGVAR_RANGE)

    @property
    def deterministic(self) -> bool:
        return self.logvar is None

    @property
    def std(self) -> torch.Tensor:
        if self.logvar is None:
            return torch.zeros_like(self.mean)
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + std * noise (reparameterisation trick); the mean itself when deterministic."""
        if self.logvar is None:
            return self.mean
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q(z|x) || N(0, I)) in nats, summed over all latent elements (C, H, W): shape (B,), float32.

        0.5 * sum(mean^2 + var - 1 - logvar). Not averaged over anything: the caller takes the batch mean and applies
        the loss weight (and any per-element normalisation it wants). Zeros for a deterministic posterior.
        """
        if self.logvar is None:
            return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=torch.float32)
        terms = self.mean.square() + torch.exp(self.logvar) - 1.0 - self.logvar
        return 0.5 * terms.flatten(1).sum(dim=1)


# ----------------------------------------------------------------------------------------------------------------
# Input check shared by the encoders.


def check_image(x: torch.Tensor, in_channels: int, factor: int, who: str) -> None:
    """Raise a clear error for a batch the encoder cannot take (wrong rank, channels, or size not divisible by f)."""
    if x.ndim != 4:
        raise ValueError(f"{who}: expected an image batch (B, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != in_channels:
        raise ValueError(f"{who}: expected {in_channels} input channels, got {x.shape[1]} (shape {tuple(x.shape)})")
    H, W = x.shape[-2:]
    if H % factor or W % factor:
        raise ValueError(f"{who}: image size {H}x{W} is not divisible by the downsample factor {factor}")
