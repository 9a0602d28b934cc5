"""The prompt vocabulary of the Fashion-MNIST denoiser.

A prompt is a short sequence of tokens. Each token is one row of a learned table
(``nn.Embedding``) that plays the part of a text encoder: the denoiser reads
``table(ids)`` through cross-attention. Every prompt is padded with the ``null`` token to
``CONTEXT_LENGTH`` positions, as text encoders pad to a fixed length; the all-``null``
prompt is the unconditional one used for classifier-free guidance.

The rows are: ``null``, the ten class names, then rare tokens (``sks`` and others) that
pre-training never uses, kept for binding subjects as in DreamBooth.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

NULL = "null"
CLASS_NAMES = ("t-shirt", "trouser", "pullover", "dress", "coat",
               "sandal", "shirt", "sneaker", "bag", "boot")
RARE_TOKENS = ("sks", "zwx", "ohwx", "qlo", "vbn", "pfk", "xjy", "kdr")
VOCAB = (NULL,) + CLASS_NAMES + RARE_TOKENS
CONTEXT_LENGTH = 4

NULL_ID = 0
CLASS_OFFSET = 1
RARE_OFFSET = CLASS_OFFSET + len(CLASS_NAMES)
_INDEX = {name: i for i, name in enumerate(VOCAB)}


def token_id(token: str | int) -> int:
    """The row of one token.

    Args:
        token: a token name from ``VOCAB`` or its integer id.

    Returns:
        The id, an int in ``range(len(VOCAB))``.

    Raises:
        KeyError: for an unknown name.
        ValueError: for an id outside the vocabulary.
    """
    if isinstance(token, str):
        if token not in _INDEX:
            raise KeyError(f"unknown token {token!r}; the vocabulary is {VOCAB}")
        return _INDEX[token]
    i = int(token)
    if not 0 <= i < len(VOCAB):
        raise ValueError(f"token id {i} outside [0, {len(VOCAB)})")
    return i


def prompt_ids(prompt: Sequence[str | int]) -> list[int]:
    """One prompt as ``CONTEXT_LENGTH`` ids, padded with ``null``.

    Args:
        prompt: token names or ids, at most ``CONTEXT_LENGTH`` of them; empty for the
            unconditional prompt.

    Returns:
        A list of ``CONTEXT_LENGTH`` ints.

    Raises:
        ValueError: when the prompt is longer than ``CONTEXT_LENGTH``.
        KeyError: for an unknown token name.
    """
    if isinstance(prompt, (str, int)):
        prompt = [prompt]
    ids = [token_id(t) for t in prompt]
    if len(ids) > CONTEXT_LENGTH:
        raise ValueError(f"prompt {list(prompt)} has {len(ids)} tokens; at most {CONTEXT_LENGTH}")
    return ids + [NULL_ID] * (CONTEXT_LENGTH - len(ids))


def batch_ids(prompts: Iterable[Sequence[str | int]]) -> torch.Tensor:
    """Several prompts as a (B, CONTEXT_LENGTH) int64 tensor.

    Args:
        prompts: an iterable of prompts, each as ``prompt_ids`` takes it.

    Returns:
        The padded ids.

    Raises:
        ValueError, KeyError: as ``prompt_ids``.
    """
    return torch.tensor([prompt_ids(p) for p in prompts], dtype=torch.long)


def class_prompt(label: int) -> list[str]:
    """The prompt naming one class, e.g. ``["dress"]``.

    Args:
        label: a Fashion-MNIST class index, 0..9.

    Returns:
        A one-token prompt.

    Raises:
        IndexError: for a label outside 0..9.
    """
    return [CLASS_NAMES[label]]


def subject_prompt(rare: str, label: int) -> list[str]:
    """The prompt of a subject bound to a rare token, e.g. ``["sks", "dress"]``.

    Args:
        rare: one of ``RARE_TOKENS``.
        label: the subject's class index, 0..9.

    Returns:
        A two-token prompt.

    Raises:
        ValueError: when ``rare`` is not a rare token.
        IndexError: for a label outside 0..9.
    """
    if rare not in RARE_TOKENS:
        raise ValueError(f"{rare!r} is not a rare token; choose from {RARE_TOKENS}")
    return [rare, CLASS_NAMES[label]]


def class_ids(labels: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
    """Padded class prompts for a batch of labels, optionally dropped to the null prompt.

    Args:
        labels: int64 class indices, shape (B,), on any device.
        drop: optional bool mask, shape (B,); where true, the prompt is all ``null``.

    Returns:
        Int64 ids of shape (B, CONTEXT_LENGTH) on ``labels``' device.
    """
    ids = torch.full((labels.shape[0], CONTEXT_LENGTH), NULL_ID, dtype=torch.long, device=labels.device)
    first = labels.long() + CLASS_OFFSET
    if drop is not None:
        first = torch.where(drop, torch.full_like(first, NULL_ID), first)
    ids[:, 0] = first
    return ids
