"""The FPDM / DiT network: a DiT whose middle may be one implicit fixed-point block.

Parameter names follow the reference train.py checkpoints (timm-style ``attn.qkv``,
``mlp.fc1`` ...), so its state dicts load unchanged. The position embedding is not a
parameter: it is a fixed 2-D sin-cos table, regenerated for whatever latent grid comes in.
The fixed-point loop itself lives in ``solver.py``: ``DiT.solve`` takes a solver in and gives the
output, the fixed-point solution and the solver's counts back (``FixedPointOutput``). Train-only
parts sit beside the model as in DiT's own models.py: the size table (``model_config``), label
dropout for guidance (``drop_labels``) and DiT's initialisation (``initialize_weights``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, asdict
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint

from .solver import make_solver

# DiT's published configs: (depth, hidden size, heads). Heads cannot be read from shapes.
DIT_CONFIGS = {
    "DiT-XL": (28, 1152, 16),
    "DiT-L": (24, 1024, 16),
    "DiT-B": (12, 768, 12),
    "DiT-S": (12, 384, 6),
}
PATCH_SIZES = (2, 4, 8)


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
        return rearrange(self.proj(x), "n d h w -> n (h w) d")  # (N, T, D), row-major tokens


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
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(rearrange(x, "b h n d -> b n (h d)"))


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
class FixedPointOutput:
    """What one network call gives back: the prediction, the fixed-point solution (None for a plain
    DiT; the state solution reuse carries to the next step) and the solver's counts."""

    out: torch.Tensor
    solution: Optional[torch.Tensor] = None
    info: Optional[dict] = None


class DiT(nn.Module):
    """DiT (``config.fixed_point`` False) or FPDM (True).

    ``forward(x, t, y, solver=None, init=None)`` -> prediction; ``solve(...)`` -> ``FixedPointOutput``.
    ``solver(f, z0) -> (z, info)`` runs the fixed-point block (``solver.make_solver``; training uses
    ``solver.stochastic_solver``); None = ``config.iterations`` plain iterations. ``init``: the first
    guess per equal chunk of the batch (a tensor, or None for the pre-block output, the reference's
    default) — how solution reuse plugs in.
    """

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
        self.gradient_checkpointing = False  # training: recompute blocks (and fixed-point iterations) in backward
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
        p = self.config.patch_size
        return rearrange(x, "n (h w) (p q c) -> n c (h p) (w q)", h=grid_h, w=grid_w, p=p, q=p)

    def embed(self, x, t, y):
        p = self.config.patch_size
        if x.shape[-2] % p or x.shape[-1] % p:
            raise ValueError(f"latent size {tuple(x.shape[-2:])} is not divisible by the patch size {p}")
        gh, gw = x.shape[-2] // p, x.shape[-1] // p
        tokens = self.x_embedder(x) + self.pos_embed(gh, gw, x.device, self.dtype)
        return tokens, self.t_embedder(t), self.y_embedder(y), (gh, gw)

    def _block(self, block, x, c):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, c, use_reentrant=False)
        return block(x, c)

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

    def solve(self, x, t, y, solver: Optional[Callable] = None,
              init: Optional[Sequence[Optional[torch.Tensor]]] = None) -> FixedPointOutput:
        tokens, t_emb, y_emb, grid = self.embed(x, t, y)
        c = t_emb + y_emb
        if not self.config.fixed_point:
            for block in self.blocks:
                tokens = self._block(block, tokens, c)
            return FixedPointOutput(self.unpatchify(self.final_layer(tokens, c), *grid))

        solver = solver or make_solver(self.config.iterations)
        c_outer = c if self.config.pre_post_timestep_conditioning else y_emb
        for block in self.blocks_pre:
            tokens = self._block(block, tokens, c_outer)
        injection = self.block_pre_projection(tokens)
        z0 = tokens.clone()
        if init is not None:
            chunks = list(z0.chunk(len(init)))
            z0 = torch.cat([g if g is not None and g.shape == d.shape else d for g, d in zip(init, chunks)])
        f = self.fixed_point_map(injection, c)
        if self.gradient_checkpointing:  # each with-grad iteration keeps only its input for backward
            raw = f

            def f(z, index=None):
                return checkpoint(raw, z, index, use_reentrant=False) if torch.is_grad_enabled() else raw(z, index)
        z, info = solver(f, z0)
        out = z
        for block in self.blocks_post:
            out = self._block(block, out, c_outer)
        return FixedPointOutput(self.unpatchify(self.final_layer(out, c_outer), *grid), z, info)

    def forward(self, x, t, y, solver: Optional[Callable] = None, init=None):
        return self.solve(x, t, y, solver, init).out


# ----------------------------------------------------------------------------- configs and training parts


def model_config(name: str, **overrides) -> FPDMConfig:
    """DiT's size table by name: 'DiT-XL/2' (plain DiT) or 'FPDM-XL/2' (fixed point; its pre/post depth
    from ``overrides``), S/B/L/XL x /2 /4 /8. ``overrides``: any FPDMConfig field (custom sizes too)."""
    family, _, patch = name.partition("/")
    size = family.split("-", 1)[-1]
    if not family.startswith(("DiT-", "FPDM-")) or f"DiT-{size}" not in DIT_CONFIGS or int(patch or 0) not in PATCH_SIZES:
        known = ", ".join(f"{k}/{p}" for k in DIT_CONFIGS for p in PATCH_SIZES)
        raise ValueError(f"unknown model {name!r}: use one of {known} (or FPDM-... for the fixed-point model)")
    depth, hidden, heads = DIT_CONFIGS[f"DiT-{size}"]
    base = dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=int(patch),
                fixed_point=family.startswith("FPDM-"))
    base.update(overrides)
    return FPDMConfig(**base)


def drop_labels(labels: torch.Tensor, prob: float, null_class: int, uniform: torch.Tensor):
    """Label dropout for classifier-free guidance (DiT's ``token_drop``): label i becomes the null
    class when its draw ``uniform[i]`` in [0, 1) is below ``prob``. The caller draws (training draws
    for the global batch from one seeded generator, so data-parallel ranks agree)."""
    drop = uniform.to(labels.device) < prob
    return torch.where(drop, torch.full_like(labels, null_class), labels)


def initialize_weights(model: DiT) -> DiT:
    """DiT's initialisation: xavier linears, zero biases, N(0, 0.02) label/timestep embeddings,
    adaLN-Zero (every block's modulation and the output layer start at zero)."""

    def basic(m):
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    model.apply(basic)
    w = model.x_embedder.proj.weight.data
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.zeros_(model.x_embedder.proj.bias)
    nn.init.normal_(model.y_embedder.embedding_table.weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(model.t_embedder.mlp[2].weight, std=0.02)
    blocks = ([*model.blocks_pre, model.block_fixed_point, *model.blocks_post] if model.config.fixed_point
              else list(model.blocks))
    for block in [*blocks, model.final_layer]:
        nn.init.zeros_(block.adaLN_modulation[-1].weight)
        nn.init.zeros_(block.adaLN_modulation[-1].bias)
    nn.init.zeros_(model.final_layer.linear.weight)
    nn.init.zeros_(model.final_layer.linear.bias)
    return model


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
