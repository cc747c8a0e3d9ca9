"""The FPDM / DiT network: a DiT whose middle may be one implicit fixed-point block.

Parameter names follow the reference train.py checkpoints (timm-style ``attn.qkv``,
``mlp.fc1`` ...), so its state dicts load unchanged. The position embedding is not a
parameter: it is a fixed 2-D sin-cos table, regenerated for whatever latent grid comes in.
The fixed-point loop itself lives in ``solver.py``; this module only defines the map
``z -> block(proj(cat(z, injection)))`` that the solver iterates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, asdict
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

# DiT's published configs: (depth, hidden size, heads). Heads cannot be read from shapes.
DIT_CONFIGS = {
    "DiT-XL": (28, 1152, 16),
    "DiT-L": (24, 1024, 16),
    "DiT-B": (12, 768, 12),
    "DiT-S": (12, 384, 6),
}


@dataclass
class FPDMConfig:
    """Everything needed to build the network and interpret its output."""

    hidden_size: int = 1152
    patch_size: int = 2
    in_channels: int = 4
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    learn_sigma: bool = True
    input_size: int = 32  # training latent grid; any grid divisible by patch_size works
    depth: int = 28  # plain DiT only
    fixed_point: bool = False
    pre_depth: int = 1
    post_depth: int = 1
    # True: pre/post blocks see timestep+class; False (train.py default): class only.
    pre_post_timestep_conditioning: bool = False
    prediction: str = "eps"  # "eps" or "v"
    zero_terminal_snr: bool = False
    default_iterations: Optional[int] = None  # per sampling step; None -> 28 - pre - post

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def iterations(self) -> int:
        if self.default_iterations:
            return int(self.default_iterations)
        return max(1, 28 - self.pre_depth - self.post_depth)  # the reference sample.py default

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- embeddings


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, dim) [sin | cos] table, float64 like MAE/DiT."""
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = positions.reshape(-1).double()[:, None] * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """(grid_h*grid_w, dim) table, row-major tokens. First half encodes the column (w)
    coordinate, second half the row: the DiT convention, extended to non-square grids."""
    if dim % 4:
        raise ValueError(f"hidden size {dim} must be divisible by 4 for the sin-cos position embedding")
    rows, cols = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float32), torch.arange(grid_w, dtype=torch.float32), indexing="ij"
    )
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1).float()


def timestep_frequencies(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """GLIDE sinusoidal timestep features, [cos | sin]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t):
        return self.mlp(timestep_frequencies(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class table with one extra row: index ``num_classes`` is the null class for guidance."""

    def __init__(self, num_classes: int, hidden: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden)

    def forward(self, labels):
        return self.embedding_table(labels)


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, in_ch: int, hidden: int):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(in_ch, hidden, kernel_size=patch, stride=patch, bias=True)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, T, D)


# ----------------------------------------------------------------------------- blocks


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden size {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + g1.unsqueeze(1) * self.attn(modulate(self.norm1(x), sh1, sc1))
        return x + g2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), sh2, sc2))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch: int, out_ch: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch * patch * out_ch)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# ----------------------------------------------------------------------------- the network


@dataclass
class FixedPointCall:
    """How to run the fixed-point block for one network call, and what happened.

    ``solve(f, z0) -> (z, info)`` is the solver (see ``solver.make_solver``); ``initial`` maps
    the default first guess (a copy of the pre-block output, as in the reference) to the one
    to use, which is how solution reuse plugs in; ``on_solution`` receives the solution.
    """

    solve: Callable
    initial: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    on_solution: Optional[Callable[[torch.Tensor], None]] = None
    info: dict = field(default_factory=dict)


class DiT(nn.Module):
    """DiT (``config.fixed_point`` False) or FPDM (True). ``forward(x, t, y, fp=None)``."""

    def __init__(self, config: FPDMConfig):
        super().__init__()
        c = self.config = config
        d, h, r = c.hidden_size, c.num_heads, c.mlp_ratio
        self.x_embedder = PatchEmbed(c.patch_size, c.in_channels, d)
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder = LabelEmbedder(c.num_classes, d)
        if c.fixed_point:
            self.blocks_pre = nn.ModuleList(DiTBlock(d, h, r) for _ in range(c.pre_depth))
            self.block_pre_projection = nn.Linear(d, d)
            self.block_fixed_point_projection_fc1 = nn.Linear(2 * d, 2 * d)
            self.block_fixed_point_projection_act = nn.GELU(approximate="tanh")
            self.block_fixed_point_projection_fc2 = nn.Linear(2 * d, d)
            self.block_fixed_point = DiTBlock(d, h, r)
            self.blocks_post = nn.ModuleList(DiTBlock(d, h, r) for _ in range(c.post_depth))
        else:
            self.blocks = nn.ModuleList(DiTBlock(d, h, r) for _ in range(c.depth))
        self.final_layer = FinalLayer(d, c.patch_size, c.out_channels)
        self._pos_cache: dict = {}

    @property
    def dtype(self):
        return self.x_embedder.proj.weight.dtype

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def pos_embed(self, grid_h: int, grid_w: int, device, dtype) -> torch.Tensor:
        key = (grid_h, grid_w, str(device), dtype)
        if key not in self._pos_cache:
            table = sincos_2d(self.config.hidden_size, grid_h, grid_w)
            self._pos_cache[key] = table.to(device=device, dtype=dtype).unsqueeze(0)
        return self._pos_cache[key]

    def unpatchify(self, x, grid_h: int, grid_w: int):
        p, ch = self.config.patch_size, self.config.out_channels
        x = x.reshape(x.shape[0], grid_h, grid_w, p, p, ch)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], ch, grid_h * p, grid_w * p)

    def embed(self, x, t, y):
        p = self.config.patch_size
        if x.shape[-2] % p or x.shape[-1] % p:
            raise ValueError(f"latent size {tuple(x.shape[-2:])} is not divisible by the patch size {p}")
        gh, gw = x.shape[-2] // p, x.shape[-1] // p
        tokens = self.x_embedder(x) + self.pos_embed(gh, gw, x.device, self.dtype)
        return tokens, self.t_embedder(t), self.y_embedder(y), (gh, gw)

    def fixed_point_map(self, injection, c):
        """The map the solver iterates: z -> block(fc2(act(fc1([z, injection])))).

        Returned as ``f(z, index=None)``; ``index`` evaluates a subset of the batch, so a
        tolerance-stopped sample costs nothing more."""

        def f(z, index=None):
            inj, cc = (injection, c) if index is None else (injection[index], c[index])
            z = torch.cat((z, inj), dim=-1)
            z = self.block_fixed_point_projection_fc2(
                self.block_fixed_point_projection_act(self.block_fixed_point_projection_fc1(z))
            )
            return self.block_fixed_point(z, cc)

        return f

    def forward(self, x, t, y, fp: Optional[FixedPointCall] = None):
        tokens, t_emb, y_emb, grid = self.embed(x, t, y)
        c = t_emb + y_emb
        if not self.config.fixed_point:
            for block in self.blocks:
                tokens = block(tokens, c)
            return self.unpatchify(self.final_layer(tokens, c), *grid)

        if fp is None:
            from .solver import make_solver

            fp = FixedPointCall(solve=make_solver(self.config.iterations))
        c_outer = c if self.config.pre_post_timestep_conditioning else y_emb
        for block in self.blocks_pre:
            tokens = block(tokens, c_outer)
        injection = self.block_pre_projection(tokens)
        z0 = tokens.clone()
        if fp.initial is not None:
            z0 = fp.initial(z0)
        z, info = fp.solve(self.fixed_point_map(injection, c), z0)
        fp.info.update(info)
        if fp.on_solution is not None:
            fp.on_solution(z)
        for block in self.blocks_post:
            z = block(z, c_outer)
        return self.unpatchify(self.final_layer(z, c_outer), *grid)


def init_random_(model: DiT, seed: int = 0, std: float = 0.02) -> DiT:
    """Random weights with every layer active (no adaLN-zero), for tests and benchmarks."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model
