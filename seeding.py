"""Seeded noise with one generator per image (seed + i), so image i never depends on the batch
size: shared by the AsynDM API, the CLIs and the demo."""

from typing import List

import torch


def image_generators(seed: int, batch: int, device="cpu") -> List[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(seed + i) for i in range(batch)]


def per_image_randn(generators, shape, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """One (1, *shape[1:]) draw per generator, concatenated: (len(generators), *shape[1:])."""
    return torch.cat([torch.randn((1, *shape[1:]), generator=g, device=device, dtype=dtype) for g in generators])


def seeded_noise(seed: int, shape, device="cpu", dtype=torch.float32) -> torch.Tensor:
    return per_image_randn(image_generators(seed, shape[0], device), shape, device, dtype)
