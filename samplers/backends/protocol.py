"""The backend protocol: what a model family implements, and the one driver that runs it
(DESIGN.md, "Backend protocol").

A family backend (a ``PixelBackend`` subclass) declares

- ``accepts(dm)``: whether a diffusion model is of its family (by default: its class is ``MODEL``,
  a dotted path imported only then); ``FAMILY``: its words in the one supported-models message
  (``supported()``);
- ``cell``: latent pixels per token side (1 for a UNet, the patch size for a transformer: by
  default the model's ``patch_size``, its last entry for a tuple); the sampler's plan snaps masks to it;
- ``BLOCKS`` (transformers): the block stack whose middle blocks the masks are read from
  (``capture_blocks``, comfy_dit.middle_blocks of ``capture_depth()`` unless given);
- ``per_image_rows``: whether a row of time conditioning is an (image, timestep) pair (per-image
  vectors are added to it) or one timestep;
- ``hooks(dm, fwd, transformer_options)``: how a token's timestep reaches the blocks, as module
  hooks that exist only inside one forward (time embedding / modulation for the distinct rows,
  gathered per token);
- ``patch_replace(call, replace)``: where the text attention is read for masks (and any block
  the family must run itself), as ComfyUI ``patches_replace`` entries for this call.

Which text tokens belong to a prompt word is the tokenizer's business (comfyui/tokens.py): a
family reads the context the tokenizer key it names in ``TEXT`` produces.

Nothing is patched on the MODEL: ``model_options`` returns a copy of the call's model options
with the APPLY_MODEL wrapper and the family's replace patches added (LoRA patches, ControlNet and
other nodes' patches keep working; DESIGN.md invariant 4). Without a PixelCall the wrapper is the
stock code (a constant map is the stock forward, invariant 1).
"""

from abc import ABC, abstractmethod
from typing import ClassVar, List

from . import attention_read
from .comfy_call import FORWARD_KEY, KEY, WRAPPER_KEY, PixelCall, begin_forward, denoised_per_pixel, fold, unfold
from .comfy_dit import middle_blocks
from .pixel_math import UnsupportedModelError

FAMILIES: List[type] = []  # registered family backends, in the order backend_for tries them


def register(cls):
    FAMILIES.append(cls)
    return cls


def supported() -> str:
    """The one supported-models message."""
    names = [f.FAMILY for f in FAMILIES]
    return ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else "".join(names)


def unsupported(what: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"AsynDM supports {supported()}; {what}")


class PixelBackend(ABC):
    FAMILY: ClassVar[str] = ""
    MODEL: ClassVar[str] = ""  # dotted path of the diffusion model's class
    TEXT: ClassVar[str] = ""  # the tokenizer key whose context the masks read
    BLOCKS: ClassVar[str] = ""  # a transformer's block stack the masks read (its middle blocks)
    per_image_rows: ClassVar[bool] = True
    flow_only: ClassVar[bool] = True  # needs flow-matching (CONST) model sampling
    cell: int = 1

    def __init__(self, model_patcher, capture_blocks=None):
        self.dm = self.check_supported(model_patcher)
        if self.BLOCKS:  # a transformer: a token is one patch
            p = self.dm.patch_size
            self.cell = p if isinstance(p, int) else p[-1]
            self.capture_blocks = list(capture_blocks if capture_blocks is not None else middle_blocks(
                self.capture_depth()))

    # --- what a family implements ---------------------------------------------------------
    @classmethod
    def accepts(cls, dm) -> bool:
        import importlib

        module, name = cls.MODEL.rsplit(".", 1)
        return type(dm) is getattr(importlib.import_module(module), name)

    def capture_depth(self) -> int:
        """How many blocks of ``BLOCKS`` the masks may be read from."""
        return len(getattr(self.dm, self.BLOCKS))

    def validate(self, model_patcher, dm):
        """Family-specific refusals (raise ``unsupported(...)``)."""

    @abstractmethod
    def hooks(self, dm, fwd, transformer_options) -> list:
        """Module hook handles that make this forward per token."""

    def patch_replace(self, call: PixelCall, replace: dict) -> None:
        """Add this call's ``patches_replace`` entries (a copy, free to edit)."""

    # --- shared -----------------------------------------------------------------------------
    def check_supported(self, model_patcher):
        import comfy.model_sampling as ms

        dm = getattr(getattr(model_patcher, "model", None), "diffusion_model", None)
        if not self.accepts(dm):
            raise unsupported(f"this MODEL is {type(dm).__name__}, not {self.FAMILY}")
        sampling = model_patcher.get_model_object("model_sampling")
        if self.flow_only and not isinstance(sampling, ms.CONST):
            raise unsupported(f"this {self.FAMILY} MODEL's sampling is not flow matching (remove model-sampling "
                              "patches)")
        self.validate(model_patcher, dm)
        return dm

    def model_options(self, base: dict, call: PixelCall) -> dict:
        import comfy.patcher_extension as pe

        opts = dict(base)
        to = dict(opts.get("transformer_options", {}))
        to[KEY] = call
        wrappers = {kind: {k: list(v) for k, v in d.items()} for kind, d in to.get("wrappers", {}).items()}
        wrappers.setdefault(pe.WrappersMP.APPLY_MODEL, {}).setdefault(WRAPPER_KEY, []).append(self._apply_model)
        to["wrappers"] = wrappers
        replace = {k: dict(v) for k, v in to.get("patches_replace", {}).items()}
        self.patch_replace(call, replace)
        to["patches_replace"] = {k: v for k, v in replace.items() if v}
        if not to["patches_replace"]:
            del to["patches_replace"]
        opts["transformer_options"] = to
        return opts

    def _apply_model(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                     **kwargs):
        call = transformer_options.get(KEY)
        if call is None:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        base = executor.class_obj
        sampling, dm = base.model_sampling, base.diffusion_model
        video = x.ndim == 5  # frames stacked along the height, as the sampler's plan sees them
        x4 = fold(x)
        fwd, scale = begin_forward(call, sampling, dm, x4, t, transformer_options, self.cell, self.per_image_rows)
        fwd.frames = x.shape[2] if video else 1

        def keep_raw(module, args, output):
            fwd.raw = fold(output)

        handles = [dm.register_forward_hook(keep_raw)]
        try:
            handles += self.hooks(dm, fwd, transformer_options)
            to = dict(transformer_options, **{FORWARD_KEY: fwd})
            if fwd.call.capture and fwd.capture_rows:  # masks read inside the read blocks' attention
                to = attention_read.install(fwd, to)
            stock = executor(unfold(x4 * scale, x.shape[2]) if video else x * scale, t, c_concat, c_crossattn,
                             control, to, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        if fwd.raw is None:
            raise RuntimeError(f"AsynDM: the {self.FAMILY} model did not run (another patch bypassed it)")
        out = denoised_per_pixel(sampling, fwd, x4, t, scale, fold(stock))
        return unfold(out, x.shape[2]) if video else out


def chain(fn, previous):
    """Our ``dit`` block patch inside any earlier replace patch of the same block."""
    if previous is None:
        return lambda args, extra: fn(args, extra["original_block"])

    def chained(args, extra):
        return previous(args, dict(extra, original_block=lambda a: fn(a, extra["original_block"])))

    return chained


def chain_blocks(replace: dict, kind: str, indices, make) -> None:
    """Our ``dit`` patch ``make(i)`` on each block ``(kind, i)``, inside any earlier patch of it."""
    dit = replace.setdefault("dit", {})
    for i in indices:
        dit[(kind, i)] = chain(make(i), dit.get((kind, i)))


__all__ = ["FAMILIES", "PixelBackend", "PixelCall", "chain", "chain_blocks", "register", "supported", "unsupported"]
