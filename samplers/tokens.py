"""Naming prompt words: ``"rabbit:0.7, basketball:0.7"`` → token positions in the prompt.

Tokenizer-neutral: callers pass token id lists, so the same matching serves Hugging Face
tokenizers (CLI) and ComfyUI's CLIP tokenizers (nodes).
"""

from typing import List, Sequence, Tuple


class UnknownWordError(ValueError):
    pass


def parse_strength(text, where: str) -> float:
    """One strength k in [0, 1] from text; ``where`` names it in the error."""
    try:
        k = float(text)
    except ValueError:
        raise ValueError(f"{where}: {str(text).strip()!r} is not a number; write a strength such as 0.7") from None
    if not 0 <= k <= 1:
        raise ValueError(f"{where}: k={k} is outside 0..1: a strength must be between 0 and 1")
    return k


def parse_targets(text: str, default_k: float = 0.7) -> List[Tuple[str, float]]:
    """``"rabbit:0.7, basketball"`` → [("rabbit", 0.7), ("basketball", default_k)]."""
    targets = []
    for part in (p.strip() for p in text.replace("\n", ",").split(",")):
        if not part:
            continue
        word, sep, k = part.rpartition(":")
        if not sep:
            word, k = part, default_k
        targets.append((word.strip(), parse_strength(k, f"target {part!r}")))
    return targets


def locate_word(
    prompt_ids: Sequence[int],
    word_ids: Sequence[int],
    prompt_tokens_for_error: Sequence[str] = (),
    word: str = "",
    occurrence: int = 0,
) -> List[int]:
    """Positions of the ``occurrence``-th appearance of ``word_ids`` as a run in ``prompt_ids``.

    ``occurrence=-1`` returns the positions of every appearance (a repeated word).
    """
    n = len(word_ids)
    hits = [i for i in range(len(prompt_ids) - n + 1) if n and list(prompt_ids[i : i + n]) == list(word_ids)]
    if not hits:
        shown = " ".join(prompt_tokens_for_error) if prompt_tokens_for_error else str(list(prompt_ids))
        raise UnknownWordError(
            f"the word {word!r} is not in the prompt. The prompt's tokens are: {shown}. "
            "Name a word (or several words) of the prompt exactly as written."
        )
    if occurrence == -1:
        return [i + j for i in hits for j in range(n)]
    if occurrence >= len(hits):
        raise UnknownWordError(f"the word {word!r} appears {len(hits)} time(s), not {occurrence + 1}")
    return list(range(hits[occurrence], hits[occurrence] + n))
