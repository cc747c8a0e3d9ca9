"""Tiny random diffusers models with fixed seeds, for the demo and the tests (no downloads).

The UNet is SD-shaped (three cross-attention levels + one plain level) but a few hundred
kilobytes, with a 16x16 latent so the latent/4 attention grid is 4x4. diffusers zero-inits
some output layers; every parameter is re-drawn so outputs and attention are non-trivial.
``save_tiny_pipeline`` writes a whole Stable Diffusion folder, with a CLIP tokenizer whose
vocabulary and BPE merges are made here for a handful of words.
"""

import json
import os

import torch

CROSS_DIM = 32


def tiny_unet(seed=0, *, sdxl=False, sample_size=16):
    from diffusers import UNet2DConditionModel

    kwargs = dict(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        layers_per_block=1,
        cross_attention_dim=CROSS_DIM,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    if sdxl:
        kwargs.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=CROSS_DIM + 6 * 8,
            cross_attention_dim=CROSS_DIM,
        )
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**kwargs)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unet.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return unet.eval().requires_grad_(False)


def sd_scheduler_config(prediction_type="epsilon"):
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        set_alpha_to_one=False,
        clip_sample=False,
        prediction_type=prediction_type,
    )


def alphas_cumprod(config=None):
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(config or sd_scheduler_config()).alphas_cumprod


def embeds(batch=1, seed=1, length=8):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, CROSS_DIM, generator=gen)


def latents(batch=1, seed=2, size=16):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, size, size, generator=gen)


WORDS = ["a", "rabbit", "playing", "basketball", "cat", "eating", "sandwich", "dog", "the", "red"]


def write_clip_tokenizer(folder):
    os.makedirs(folder, exist_ok=True)
    vocab, merges = {}, []
    chars = sorted({c for w in WORDS for c in w})
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    for w in WORDS:
        pieces = list(w[:-1]) + [w[-1] + "</w>"]
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            if " ".join(pair) not in merges:
                merges.append(" ".join(pair))
            pieces = ["".join(pair)] + pieces[2:]
            vocab.setdefault(pieces[0], len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return len(vocab)


def save_tiny_pipeline(folder, prediction_type="epsilon"):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab_size = write_clip_tokenizer(os.path.join(folder, "_tok"))
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(folder, "_tok"), model_max_length=77)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=CROSS_DIM, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77,
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
    )).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=4, sample_size=128,
    ).eval()
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=tiny_unet(),
        scheduler=DDIMScheduler.from_config(sd_scheduler_config(prediction_type)),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder
