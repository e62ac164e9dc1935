"""Conversations for chat finetuning, in the Hub's and TRL's format: a `messages` column of [{"role", "content"}]
turns (system, user, assistant). prepare.py renders each with the tokenizer's chat template into ids and the mask of
the tokens to learn (the assistant's turns and their end-of-turn token), as transformers computes it; the embedded
Shakespeare gives a demo set (consecutive speeches of a scene as user and assistant turns)."""

from __future__ import annotations

import json
import lzma
import re
from typing import Iterator

import datasets
import numpy as np
import pyarrow as pa
from jinja2 import TemplateError

from .common import UserError

CHAT_COLUMN = "messages"
SPEECH = re.compile(r"([A-Z][A-Z' &-]*[A-Z])\.\n(.+)", re.S)  # "HELENA.\nAnd you, monarch!": speaker, speech
TURNS = 4  # speeches per demo conversation: user, assistant, user, assistant


def is_conversational(features, text_column: str = "text") -> bool:  # a `messages` column of turns, no text column
    column = (features or {}).get(CHAT_COLUMN)
    return isinstance(column, (datasets.List, datasets.LargeList, list)) and text_column not in (features or {})


def conversations(array: pa.Array, features=None) -> list[list[dict]]:
    """An Arrow `messages` column as lists of dicts, decoded by its datasets features where known (turns or contents
    that differ from row to row are stored as JSON text)."""
    rows = features.decode_column(array.to_pylist(), CHAT_COLUMN) if features else array.to_pylist()
    return [[json.loads(t) if isinstance(t, str) else t for t in turns or []] for turns in rows]


def contents(array: pa.Array) -> list[str]:
    """Every message's content in an Arrow `messages` column (for a character vocabulary, or to train a BPE)."""
    return [str(t.get("content") or "") for turns in conversations(array) for t in turns]


def render(chat_tokenizer, messages: list[dict]) -> dict:
    """input_ids and assistant_masks of one conversation; one that the template cannot render is named."""
    try:
        return chat_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                  return_assistant_tokens_mask=True)
    except (TemplateError, TypeError) as exc:  # a role the template does not know, a turn without content...
        raise UserError(f"the chat template cannot render the conversation {json.dumps(messages)[:200]}: "
                        f"{exc}; fix or remove it") from None


def encode_conversations(batch, column: str, dtype: str, chat_tokenizer, features=None) -> pa.Table:
    """Arrow batch of conversations -> ids and mask (1: a token to learn) per conversation, from the tokenizer's chat
    template with return_assistant_tokens_mask (its {% generation %} block marks the assistant's tokens)."""
    rows = [render(chat_tokenizer, messages) for messages in conversations(batch.column(column), features)]
    offsets = pa.array(np.cumsum([0] + [len(r["input_ids"]) for r in rows], dtype=np.int64))
    ids = np.fromiter((i for r in rows for i in r["input_ids"]), dtype=dtype)
    mask = np.fromiter((m for r in rows for m in r["assistant_masks"]), dtype=np.uint8, count=len(ids))
    return pa.table({"ids": pa.LargeListArray.from_arrays(offsets, ids),
                     "mask": pa.LargeListArray.from_arrays(offsets, mask)})


def shakespeare_conversations(path: str) -> Iterator[dict]:
    """The demo set: each scene's speeches in groups of TURNS, alternately user and assistant (a group ends with an
    assistant's speech); every other conversation opens with a system line naming the play and its speakers."""
    count = 0
    with lzma.open(path, "rt", encoding="utf-8") as fh:
        for play in map(json.loads, fh):
            for scene in re.split(r"\n\n(?:ACT|SCENE)[^\n]*", play["text"]):
                speeches = [m.groups() for p in scene.split("\n\n") if (m := SPEECH.fullmatch(p.strip("\n")))]
                for i in range(0, len(speeches) - 1, TURNS):
                    group = speeches[i : i + TURNS]
                    group = group[: len(group) // 2 * 2]
                    turns = [{"role": ("user", "assistant")[k % 2], "content": text}
                             for k, (_, text) in enumerate(group)]
                    speakers = ", ".join(dict.fromkeys(name for name, _ in group))
                    system = {"role": "system", "content": f"{play['title']}: {speakers}"}
                    yield {CHAT_COLUMN: [system, *turns] if count % 2 else turns}
                    count += 1
