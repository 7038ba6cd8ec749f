"""A chat history turned into one claudepool prompt, for both front doors: the first turn of a
conversation started from a history (`claudepool.frontdoor.conversation`), and a stateless turn
when a client opts out of conversations.

One user message is the prompt as it is. A longer history is flattened: a head line, then each
message after its role marker, oldest first; the last message must be the user's (no assistant
prefill), and not empty.

>>> flatten([("user", "hi")])
'hi'
>>> print(flatten([("user", "hi"), ("assistant", "hello"), ("user", "and?")]))
(The conversation so far, oldest first; each message follows its role marker. Answer the last user message.)
<BLANKLINE>
[user]
hi
<BLANKLINE>
[assistant]
hello
<BLANKLINE>
[user]
and?
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from claudepool.errors import BadRequest

Role = Literal["user", "assistant"]
_MARKER = {"user": "[user]", "assistant": "[assistant]"}
_HEAD = ("(The conversation so far, oldest first; each message follows its role marker. "
         "Answer the last user message.)")


def flatten(turns: Sequence[tuple[Role, str]]) -> str:
    """The one prompt ``turns`` (role, text) become; `BadRequest` if the last is not a user's text."""
    if not turns or turns[-1][0] != "user":
        raise BadRequest("the last message must be the user's (assistant prefill is not supported)")
    if not turns[-1][1].strip():
        raise BadRequest("the last user message is empty")
    if len(turns) == 1:
        return turns[0][1]
    return "\n\n".join([_HEAD, *(f"{_MARKER[role]}\n{text}" for role, text in turns)])
