"""Prompt words → token positions with ComfyUI's CLIP tokenizers.

``clip.tokenize(text)`` gives ``{key: [[(id, weight, ...), ...77], ...chunks]}`` (``l`` for SD1,
``h`` for SD2, ``g`` and ``l`` for SDXL, whose two tokenizers place words identically). The
cross-attention context is the chunks' hidden states one after another, so a token's position
in the context is its index in the flattened chunk list. Prompt weights ``(rabbit:1.2)`` only
change weights, never ids. A word is found by its spelling: the prompt's tokens spelled out as
the bytes they stand for, the word matched there as a whole word, its tokens those that overlap
it — so a word split into several tokens, or glued to a quote (``"OPEN"``: quoted text is
ordinary text for every family; HunyuanImage also sends it to byT5 glyph tokens, which the masks
do not read, so a quoted word resolves to its Qwen2.5 tokens), is found as written. ``word#2``
picks the second appearance of a repeated word (default: every appearance).

Transformers (DESIGN.md, "Transformers"): the positions index the context the backend reads.
Flux's tokens carry ``l`` and ``t5xxl`` but its joint attention sees only T5's hidden states
(CLIP-L gives the pooled vector): ``t5xxl``. HiDream's (``g``, ``l``, ``t5xxl``, ``llama``): the
masks read its Llama 3.1 hidden states (``conditioning_llama3``), so ``llama``. SD3's (``g``, ``l``, ``t5xxl``) context is
[CLIP-L ‖ CLIP-G (77 per chunk) | T5]: the CLIP positions, which start the context whether or
not T5 is loaded (``t5xxl`` only for a T5-only SD3 text encoder). T5's own tokens (``▁rabbit``)
are listed without the sentencepiece marks when a word is not found.
"""

import re
from bisect import bisect_left, bisect_right
from typing import List, Optional

from ..tokens import UnknownWordError, parse_targets

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


def _id_hits(clip, key, sub, ids, word) -> List[List[int]]:
    """Each appearance of the word's own ids as a run in ``ids``: for a tokenizer without a
    vocabulary to spell by, and for words the vocabulary cannot spell (a sentencepiece model
    without byte fallback gives <unk> for a character it lacks; the word's own <unk> matches)."""
    wids = _word_ids(clip, key, sub, word)
    n = len(wids)
    return [list(range(i, i + n)) for i in range(len(ids) - n + 1) if n and list(ids[i:i + n]) == wids]


# -- words by their spelling ------------------------------------------------------------------
# A word's tokens depend on what precedes it: "rabbit" after a space is one token ("Ġrabbit",
# "▁rabbit"), right after a quote another ('"' + "rabbit", or '"The' merged with the quote), so
# a word's ids alone miss quoted text ('a sign that says "OPEN"'). Spelling every prompt token
# out as the bytes it stands for and finding the word in that text, at word boundaries, finds
# it wherever it is written; its tokens are those whose bytes overlap it.
_CONTROL = re.compile(r"<\|[^|]*\|>|</?[A-Za-z_][A-Za-z0-9_]*>")  # <|im_start|>, </s>, <pad>, <bos>
_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # sentencepiece byte fallback


def _byte_decoder() -> dict:
    """Byte-level BPE's printable stand-ins for bytes (GPT-2's ``bytes_to_unicode``) → byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    cs, n = list(bs), 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTES_OF = _byte_decoder()


def _piece_bytes(name: str, sentencepiece: bool) -> Optional[bytes]:
    """The bytes one vocabulary entry stands for; None for a control token (a separator)."""
    byte = _BYTE.fullmatch(name)
    if byte:
        return bytes([int(byte[1], 16)])
    if _CONTROL.fullmatch(name):
        return None
    if name.endswith("</w>"):  # CLIP: a word's last piece
        return (_piece_bytes(name[:-4], sentencepiece) or b"") + b" "
    if sentencepiece:
        return name.replace("\u2581", " ").encode()
    return b"".join(bytes([_BYTES_OF[c]]) if c in _BYTES_OF else c.encode() for c in name)


def _is_sentencepiece(inv: dict) -> bool:
    return any(v.startswith("\u2581") for v in inv.values())


def _spelled(sub, ids) -> Optional[List[bytes]]:
    """Each token's bytes (a separator for control tokens, padding and embeddings), or None
    without a vocabulary."""
    inv = getattr(sub, "inv_vocab", None)
    if not inv:
        return None
    sentencepiece = _is_sentencepiece(inv)
    out = []
    for i in ids:
        b = _piece_bytes(inv[i], sentencepiece) if i in inv else None
        out.append(b if b else b"\0")
    return out


def _is_word_byte(b: int) -> bool:
    return chr(b).isalnum() if b < 128 else False


def _word_hits(pieces: List[bytes], word: str) -> List[List[int]]:
    """Token indices of each appearance of ``word`` as a whole word of the spelled tokens (exact
    case first, then any case: CLIP lowercases)."""
    text = b"".join(pieces)
    ends, n = [], 0
    for p in pieces:
        n += len(p)
        ends.append(n)
    target = word.encode()
    for hay, needle in ((text, target), (text.lower(), target.lower())):
        hits, at = [], hay.find(needle)
        while needle and at >= 0:
            stop = at + len(needle)
            left = at == 0 or not (_is_word_byte(needle[0]) and _is_word_byte(hay[at - 1]))
            right = stop == len(hay) or not (_is_word_byte(needle[-1]) and _is_word_byte(hay[stop]))
            if left and right:
                hits.append(list(range(bisect_right(ends, at), bisect_left(ends, stop) + 1)))
            at = hay.find(needle, at + 1)
        if hits:
            return hits
    return []


def _whole_word(pieces: List[bytes], run: List[int]) -> bool:
    """Whether the tokens ``run`` of the spelled prompt start and end a word ('rab' 'bit' of
    'jackrabbit' do not)."""
    before = pieces[run[0] - 1][-1] if run[0] > 0 else ord(" ")
    after = pieces[run[-1] + 1][0] if run[-1] + 1 < len(pieces) else ord(" ")
    return not (_is_word_byte(before) and _is_word_byte(pieces[run[0]][0])) and \
        not (_is_word_byte(pieces[run[-1]][-1]) and _is_word_byte(after))


def _pick(hits, word, occurrence, missing):
    if not hits:
        raise missing()
    if occurrence == -1:
        return sorted({p for h in hits for p in h})
    if occurrence >= len(hits):
        raise UnknownWordError(f"the word {word!r} appears {len(hits)} time(s), not {occurrence + 1}")
    return hits[occurrence]


def _token_names(sub, ids):
    """The prompt's tokens as the user wrote them, for an error (control tokens and padding left out)."""
    inv = getattr(sub, "inv_vocab", None) or {}
    sentencepiece = _is_sentencepiece(inv)
    pad = getattr(sub, "pad_token", None)
    names = []
    for i in ids:
        spelled = _piece_bytes(inv[i], sentencepiece) if i in inv and i != pad else None
        name = spelled.decode("utf-8", "replace").strip() if spelled else ""
        if name:
            names.append(name)
    return names


def split_occurrence(word: str):
    """``"cat#2"`` → ("cat", 1); ``"cat"`` → ("cat", -1) meaning every appearance."""
    base, sep, n = word.rpartition("#")
    if sep and n.strip().isdigit() and base.strip():
        return base.strip(), max(int(n) - 1, 0)
    return word.strip(), -1


def _find(clip, key, sub, ids, pieces, drop, word, occurrence):
    """Positions of ``word`` in ``ids[drop:]`` (the part the model receives); ``pieces``: the
    tokens spelled out (``_spelled``), None without a vocabulary."""
    hits = _word_hits(pieces[drop:], word) if pieces is not None else []
    if not hits:  # the word's own ids (a character the vocabulary lacks), where they stand as a whole word
        hits = [h for h in _id_hits(clip, key, sub, ids[drop:], word)
                if pieces is None or _whole_word(pieces[drop:], h)]

    def missing():
        if pieces is not None and _word_hits(pieces, word):  # only in the prefix the encoder drops (a template)
            return UnknownWordError(
                f"the word {word!r} is only in the text encoder's template, which it drops before the model: "
                "name a word of your own prompt (write it in the prompt if it is not there)")
        return _not_in_prompt(word, _token_names(sub, ids[drop:]) or [str(i) for i in ids[drop:]])
    return _pick(hits, word, occurrence, missing)


def _not_in_prompt(word, shown):
    return UnknownWordError(f"the word {word!r} is not in the prompt. The prompt's tokens are: {' '.join(shown)}. "
                            "Name a word (or several words) of the prompt exactly as written.")


def locate_targets(clip, prompt: str, targets_text: str, context_len: Optional[int] = None) -> dict:
    """The targets dict the AsynDM nodes carry on CONDITIONING:
    {"words", "ks", "positions" (per word), "context_len"}.

    ``context_len``: the length of the context the model receives (``context_length``). An
    encoder may drop a prefix of the tokens (Qwen-Image's and HunyuanImage's drop their chat
    template before the prompt): the context is then the tokens' last ``context_len``; words are
    found there and the positions index it. A longer context (SD3's [CLIP | T5]) keeps them."""
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
    drop = max(len(prompt_ids) - int(context_len), 0) if context_len is not None else 0
    pieces = _spelled(sub, prompt_ids)
    words, ks, positions = [], [], []
    for raw, k in targets:
        word, occurrence = split_occurrence(raw)
        positions.append(_find(clip, key, sub, prompt_ids, pieces, drop, word, occurrence))
        words.append(raw)
        ks.append(k)
    length = int(context_len) if context_len is not None else len(prompt_ids)
    return {"words": words, "ks": ks, "positions": positions, "context_len": length}


def context_length(cond) -> int:
    """The length of the encoded context the masks read: HiDream's Llama hidden states (B, layers, L, D)
    under ``conditioning_llama3``, else the cross-attention context."""
    context, extra = cond[0][0], cond[0][1]
    llama = extra.get("conditioning_llama3")
    return int(llama.shape[2]) if llama is not None else int(context.shape[1])
