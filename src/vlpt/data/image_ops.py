"""Batched image augmentations on float images [B,3,H,W] on the 0-255 scale, on any device.

Each random operation draws its per-example parameters from a CPU generator (so the result does not depend
on the device) and applies them to the whole batch at once: the examples an operation touches are picked
by index on the CPU and changed with one `index_select` / `index_copy`, never in a loop over examples.
The colour operations follow torchvision's tensor functions (ColorJitter's factors, random order and
formulas); grayscale uses PIL's luma weights (0.299, 0.587, 0.114), as SLIP's and clip-rocket's PIL
pipelines do (torchvision's tensor path rounds the first to 0.2989).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LUMA = (0.299, 0.587, 0.114)


def random_resized_crop(
    images: torch.Tensor,
    scale: tuple[float, float],
    generator: torch.Generator,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: float = 0.0,
) -> torch.Tensor:
    """Per example: a crop of area fraction in `scale` and aspect ratio in `ratio`, resized back to the input
    size (bilinear), mirrored with probability `flip`. Returns float images on the 0-255 scale."""
    b, _, h, w = images.shape
    x = images.float()
    mirror = torch.rand(b, generator=generator) < flip if flip > 0 else None
    if scale[0] >= 1.0:
        if mirror is None:
            return x
        return torch.where(mirror.to(x.device)[:, None, None, None], x.flip(-1), x)
    area = torch.empty(b).uniform_(scale[0], scale[1], generator=generator)
    log_r = torch.empty(b).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    r = log_r.exp()
    cw = (area * r).sqrt().clamp(max=1.0)  # crop width/height as fractions of the image
    ch = (area / r).sqrt().clamp(max=1.0)
    cx = (torch.rand(b, generator=generator) * 2 - 1) * (1 - cw)  # centre, in [-1, 1] coordinates
    cy = (torch.rand(b, generator=generator) * 2 - 1) * (1 - ch)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = cw, cx, ch, cy
    if mirror is not None:  # a flip is a negative horizontal scale of the same sampling grid
        theta[:, 0, 0] = torch.where(mirror, -cw, cw)
    grid = F.affine_grid(theta.to(x.device), [b, 3, h, w], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


# ------------------------------------------------------------------------ deterministic, per-example factors
def luma(x: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] -> [B,1,H,W]."""
    r, g, b = x.unbind(1)
    return (LUMA[0] * r + LUMA[1] * g + LUMA[2] * b).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """factor * x + (1 - factor) * other, clamped to [0, 255]; `factor` [B]."""
    return torch.lerp(other, x, factor.view(-1, 1, 1, 1)).clamp_(0, 255)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """A blend with black."""
    return (x * factor.view(-1, 1, 1, 1)).clamp_(0, 255)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blends with the mean luma of each image."""
    return _blend(x, luma(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blends with each pixel's luma."""
    return _blend(x, luma(x), factor)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotates the HSV hue of every pixel by `shift` [B] turns, keeping saturation and value (torchvision's
    adjust_hue; hue is scale-free, so this works on the 0-255 values directly)."""
    r, g, b = x.unbind(1)
    v = x.amax(1)
    c = v - x.amin(1)  # value and chroma
    div = torch.where(c > 0, c, torch.ones_like(c))
    on_r = r == v  # the channel that holds the maximum picks the hue's sector (red first on ties)
    on_g = ~on_r & (g == v)
    sixths = torch.where(on_r, (g - b) / div, torch.where(on_g, 2 + (b - r) / div, 4 + (r - g) / div))
    hue6 = torch.remainder(sixths + 6 * shift.view(-1, 1, 1), 6.0)  # in sixths of a turn
    # back to RGB: channel n (5, 3, 1 for R, G, B) is v - c * clamp(min(k, 4 - k), 0, 1), k = (n + hue6) mod 6
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device).view(1, 3, 1, 1)
    k = torch.remainder(n + hue6.unsqueeze(1), 6.0)
    return v.unsqueeze(1) - c.unsqueeze(1) * torch.minimum(k, 4 - k).clamp_(0, 1)


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Separable Gaussian blur, sigma [B] per image, kernel 2 * radius + 1 (normalised), edges replicated."""
    n, c, h, w = x.shape
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-(t**2) / (2 * sigma.to(x).view(-1, 1) ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, dim=0)  # [n*c, K]: one per channel
    y = F.pad(x.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="replicate")
    y = F.conv2d(y, kernel.view(n * c, 1, 1, -1), groups=n * c)
    y = F.conv2d(y, kernel.view(n * c, 1, -1, 1), groups=n * c)
    return y.view(n, c, h, w)


def solarize(x: torch.Tensor, threshold: float = 128.0) -> torch.Tensor:
    """PIL's ImageOps.solarize: every value >= threshold becomes 255 - value."""
    return torch.where(x >= threshold, 255 - x, x)


# ------------------------------------------------------------------------------------ random operations
def _apply(x: torch.Tensor, chosen: torch.Tensor, fn, *factors: torch.Tensor) -> torch.Tensor:
    """x with fn(x[i], factors[i]) at the examples where `chosen` (CPU bool [B]) holds."""
    idx = chosen.nonzero().squeeze(1)
    if len(idx) == 0:
        return x
    on = idx.to(x.device)
    return x.index_copy(0, on, fn(x.index_select(0, on), *(f[idx].to(x.device) for f in factors)))


def random_color_jitter(x: torch.Tensor, strength: list[float], p: float, g: torch.Generator) -> torch.Tensor:
    """torchvision's RandomApply([ColorJitter(b, c, s, h)], p): with probability p an image gets brightness,
    contrast and saturation factors uniform in [max(0, 1 - x), 1 + x] and a hue shift uniform in [-h, h],
    applied in a random order of its own. An operation of strength 0 is left out, as torchvision does."""
    n = x.shape[0]
    chosen = torch.rand(n, generator=g) < p
    order = torch.rand(n, 4, generator=g).argsort(1)  # a random permutation of the 4 operations per image
    factors = [torch.empty(n).uniform_(max(0.0, 1 - s), 1 + s, generator=g) for s in strength[:3]]
    factors.append(torch.empty(n).uniform_(-strength[3], strength[3], generator=g))
    for position in range(4):
        for op, fn in enumerate(JITTER_OPS):
            if strength[op] > 0:
                x = _apply(x, chosen & (order[:, position] == op), fn, factors[op])
    return x


def random_grayscale(x: torch.Tensor, p: float, g: torch.Generator) -> torch.Tensor:
    return _apply(x, torch.rand(x.shape[0], generator=g) < p, lambda y: luma(y).expand_as(y))


def random_blur(x: torch.Tensor, p: float, sigma: tuple[float, float], g: torch.Generator) -> torch.Tensor:
    """With probability p, a Gaussian blur with sigma uniform in `sigma`. The kernel reaches 3 sigma_max each
    side: PIL's GaussianBlur(radius=sigma), which SLIP and clip-rocket use, is not cut off by the image size,
    and SimCLR's kernel (10% of a 224-pixel side: 23) reaches past 3 sigma for every sigma <= 2 too."""
    n = x.shape[0]
    chosen = torch.rand(n, generator=g) < p
    s = torch.empty(n).uniform_(sigma[0], sigma[1], generator=g)
    radius = math.ceil(3 * sigma[1])
    return _apply(x, chosen, lambda y, sd: gaussian_blur(y, sd, radius), s)


def random_solarize(x: torch.Tensor, p: float, g: torch.Generator) -> torch.Tensor:
    return _apply(x, torch.rand(x.shape[0], generator=g) < p, solarize)
