"""Prompt words → token positions with ComfyUI's CLIP tokenizers.

``clip.tokenize(text)`` gives ``{key: [[(id, weight, ...), ...77], ...chunks]}`` (``l`` for SD1,
``h`` for SD2, ``g`` and ``l`` for SDXL, whose two tokenizers place words identically). The
cross-attention context is the chunks' hidden states one after another, so a token's position
in the context is its index in the flattened chunk list. Prompt weights ``(rabbit:1.2)`` only
change weights, never ids; a word that splits into several tokens is matched as a run;
``word#2`` picks the second appearance of a repeated word (default: every appearance).

Transformers (DESIGN.md, "Transformers"): the positions index the context the backend reads.
Flux's tokens carry ``l`` and ``t5xxl`` but its joint attention sees only T5's hidden states
(CLIP-L gives the pooled vector): ``t5xxl``. HiDream's (``g``, ``l``, ``t5xxl``, ``llama``): the
masks read its Llama 3.1 hidden states (``conditioning_llama3``), so ``llama``. SD3's (``g``, ``l``, ``t5xxl``) context is
[CLIP-L ‖ CLIP-G (77 per chunk) | T5]: the CLIP positions, which start the context whether or
not T5 is loaded (``t5xxl`` only for a T5-only SD3 text encoder). T5's own tokens (``▁rabbit``)
are listed without the sentencepiece marks when a word is not found.
"""

from typing import List

from ..tokens import UnknownWordError, locate_word, parse_targets

KEY_ORDER = ("l", "g", "h")


def _key(tokens: dict, clip=None) -> str:
    if "llama" in tokens:  # HiDream: its masks read the Llama 3.1 tokens (DESIGN.md, "HiDream")
        return "llama"
    if "t5xxl" in tokens:
        model = getattr(clip, "cond_stage_model", None)
        no_clip = all(getattr(model, f"clip_{k}", True) is None for k in ("l", "g"))
        if "g" not in tokens or no_clip:  # Flux (T5 is its context), or SD3 without CLIP-L/G
            return "t5xxl"
    for k in KEY_ORDER:
        if k in tokens:
            return k
    return next(iter(tokens))


def _sub_tokenizer(clip, key):
    tok = getattr(clip, "tokenizer", None)
    sub = getattr(tok, f"clip_{key}", None) or getattr(tok, key, None)
    if sub is None and tok is not None and isinstance(getattr(tok, "clip", None), str):
        sub = getattr(tok, tok.clip, None)
    return sub


def _ids(chunks) -> List[int]:
    # textual-inversion embeddings appear as tensors instead of ids: they never match a word
    return [t[0] if isinstance(t[0], int) else -1 for chunk in chunks for t in chunk]


def _word_ids(clip, key, sub, word) -> List[int]:
    ids = _ids(clip.tokenize(word)[key][:1])
    start = getattr(sub, "start_token", None)
    end = getattr(sub, "end_token", None)
    if start is not None and ids and ids[0] == start:
        ids = ids[1:]
    if end is not None and end in ids:
        ids = ids[: ids.index(end)]
    pad = getattr(sub, "pad_token", None)
    while ids and pad is not None and ids[-1] == pad:  # a tokenizer padded without an end token (Llama)
        ids.pop()
    return ids


def _bpe_word_ids(sub, word) -> List[List[int]]:
    """A byte-level BPE tokenizer (Qwen2.5, Llama, Gemma) spells a word after a space differently
    from the same word alone ("Ġrabbit"), and a chat-template tokenizer wraps a lone word in its
    template: the word's ids with a leading space, straight from the underlying tokenizer."""
    hf = getattr(sub, "tokenizer", None)
    if hf is None or not callable(hf):
        return []
    try:
        ids = hf(" " + word, add_special_tokens=False)["input_ids"]
    except (TypeError, KeyError):
        return []
    return [list(ids)] if ids else []


def _locate(prompt_ids, candidates, shown, word, occurrence):
    """The first spelling of the word that is in the prompt."""
    for wids in candidates[1:]:
        try:
            return locate_word(prompt_ids, wids, shown, word=word, occurrence=occurrence)
        except UnknownWordError:
            continue
    return locate_word(prompt_ids, candidates[0], shown, word=word, occurrence=occurrence)


def _token_names(sub, ids):
    inv = getattr(sub, "inv_vocab", None) or {}
    names = []
    pad = getattr(sub, "pad_token", None)
    for i in ids:
        if i == pad:  # padding (Llama's <|eot_id|>): not part of what the user wrote
            continue
        name = inv.get(i, str(i))
        if name in ("<|startoftext|>", "<|endoftext|>", "</s>", "<pad>"):
            continue
        names.append(name.replace("</w>", "").replace("\u2581", "").replace("\u0120", "").replace("\u010a", ""))
    return names


def split_occurrence(word: str):
    """``"cat#2"`` → ("cat", 1); ``"cat"`` → ("cat", -1) meaning every appearance."""
    base, sep, n = word.rpartition("#")
    if sep and n.strip().isdigit() and base.strip():
        return base.strip(), max(int(n) - 1, 0)
    return word.strip(), -1


def locate_targets(clip, prompt: str, targets_text: str) -> dict:
    """The targets dict the AsynDM nodes carry on CONDITIONING:
    {"words", "ks", "positions" (per word), "context_len"}."""
    targets = parse_targets(targets_text)
    if not targets:
        raise ValueError("targets is empty: name the prompt's key objects, e.g. 'rabbit:0.7, basketball:0.7'")
    tokens = clip.tokenize(prompt)
    key = _key(tokens, clip)
    if key == "llama" and getattr(getattr(clip, "cond_stage_model", None), "llama", True) is None:
        raise UnknownWordError("HiDream's masks read the Llama 3.1 tokens and this CLIP has no Llama text encoder: "
                               "load llama_3.1_8b_instruct as the fourth file of the QuadrupleCLIPLoader")
    sub = _sub_tokenizer(clip, key)
    prompt_ids = _ids(tokens[key])
    shown = _token_names(sub, prompt_ids)
    words, ks, positions = [], [], []
    for raw, k in targets:
        word, occurrence = split_occurrence(raw)
        wids = _word_ids(clip, key, sub, word)
        if not wids:
            raise UnknownWordError(f"the target {raw!r} has no tokens; name a word of the prompt")
        positions.append(_locate(prompt_ids, [wids] + _bpe_word_ids(sub, word), shown, word, occurrence))
        words.append(raw)
        ks.append(k)
    return {"words": words, "ks": ks, "positions": positions, "context_len": len(prompt_ids)}


def context_length(cond) -> int:
    """The length of the encoded context the masks read: HiDream's Llama hidden states (B, layers, L, D)
    under ``conditioning_llama3``, else the cross-attention context."""
    context, extra = cond[0][0], cond[0][1]
    llama = extra.get("conditioning_llama3")
    return int(llama.shape[2]) if llama is not None else int(context.shape[1])


def fit_to_context(info: dict, context_len: int) -> dict:
    """The targets dict on the context the model receives. An encoder may drop a prefix of the
    tokens (Qwen-Image's drops its chat template before the prompt): the context is then the
    tokens' last ``context_len``, and every position moves back by the dropped count. A longer
    context (SD3's [CLIP | T5]) keeps the positions."""
    drop = int(info["context_len"]) - int(context_len)
    if drop <= 0:
        return dict(info, context_len=int(context_len))
    positions = [[p - drop for p in ps] for ps in info["positions"]]
    if any(p < 0 for ps in positions for p in ps):
        raise UnknownWordError("a target word lies in the part of the prompt the text encoder drops (its "
                               "template); name words of your own prompt")
    return dict(info, positions=positions, context_len=int(context_len))
