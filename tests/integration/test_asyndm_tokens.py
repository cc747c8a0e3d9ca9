"""Prompt words → token positions on ComfyUI's real CLIP tokenizers (SD1 'l', SD2 'h', SDXL 'g'+'l')."""

import pytest
import torch

from asyndm_helpers import encode



@pytest.fixture(autouse=True)
def _inference_mode():
    """As ComfyUI's executor runs nodes."""
    with torch.inference_mode():
        yield


@pytest.fixture(scope="module")
def clips(comfy_env, tiny_models):
    return {fam: tiny_models.tiny_checkpoint(fam)[1] for fam in ("sd15", "sd20", "sdxl")}


def _locate(clip, prompt, targets):
    from asyndm_fpdm.samplers.comfyui.tokens import locate_targets

    return locate_targets(clip, prompt, targets)


def _ids(clip, prompt, key):
    return [t[0] for chunk in clip.tokenize(prompt)[key] for t in chunk]


@pytest.mark.parametrize("fam,key", [("sd15", "l"), ("sd20", "h"), ("sdxl", "g")])
def test_asyndm_tokens_simple_and_weighted(clips, fam, key):
    clip = clips[fam]
    info = _locate(clip, "a rabbit playing basketball", "rabbit:0.7, basketball:0.5")
    assert info["positions"] == [[2], [4]] and info["ks"] == [0.7, 0.5] and info["context_len"] == 77
    ids = _ids(clip, "a rabbit playing basketball", key)
    rabbit = _ids(clip, "rabbit", key)[1]
    assert ids[2] == rabbit  # position 0 is the start token
    weighted = _locate(clip, "a (rabbit:1.3) playing (basketball)", "rabbit, basketball")
    assert weighted["positions"] == [[2], [4]] and weighted["ks"] == [0.7, 0.7]


def test_asyndm_tokens_multi_token_repeated_and_long(clips):
    clip = clips["sd15"]
    word = "zyzzogetonian"
    n = len([t for t in clip.tokenize(word)["l"][0] if t[0] not in (49406, 49407)])
    assert n > 1, "pick a word the CLIP vocabulary splits"
    info = _locate(clip, f"a {word} beside a cat and another cat", f"{word}:0.6, cat, cat#2:0.9")
    assert info["positions"][0] == list(range(2, 2 + n))
    cats = info["positions"][1]
    assert len(cats) == 2 and info["positions"][2] == [cats[1]]
    long_prompt = " ".join(["green"] * 90) + " rabbit"
    long = _locate(clip, long_prompt, "rabbit")
    assert long["context_len"] == 154 and long["positions"][0][0] >= 77
    cond = encode(clip, long_prompt, "rabbit")
    assert cond[0][0].shape[1] == long["context_len"]
    assert cond[0][1]["asyndm_targets"]["positions"] == long["positions"]


def test_asyndm_tokens_sdxl_encoders_agree(clips):
    clip = clips["sdxl"]
    prompt = "a (rabbit:1.2) playing basketball on the moon"
    ids_g, ids_l = _ids(clip, prompt, "g"), _ids(clip, prompt, "l")
    info = _locate(clip, prompt, "rabbit, moon")
    for p in info["positions"]:
        assert ids_g[p[0]] == ids_l[p[0]]


def test_asyndm_tokens_unknown_word_lists_the_prompt(clips):
    from asyndm_fpdm.samplers.tokens import UnknownWordError

    with pytest.raises(UnknownWordError) as err:
        _locate(clips["sd15"], "a rabbit playing basketball", "dog:0.7")
    msg = str(err.value)
    assert "'dog'" in msg and "rabbit" in msg and "basketball" in msg
    with pytest.raises(ValueError, match="between 0 and 1"):
        _locate(clips["sd15"], "a rabbit", "rabbit:2")
    with pytest.raises(ValueError, match="empty"):
        _locate(clips["sd15"], "a rabbit", " , ")
