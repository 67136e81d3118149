"""Refusal ("I don't know") answers used as targets by the refusal methods and by UniErase.

Written for this project. A fixed list so that runs are reproducible; each forget example gets the
answer at ``index % len(REFUSALS)``.
"""

REFUSALS: tuple[str, ...] = (
    "I don't know.",
    "I'm not sure about that.",
    "I don't have that information.",
    "I can't answer that, I'm afraid.",
    "That is something I don't know.",
    "I have no information on that.",
    "Sorry, I don't know the answer.",
    "I'm unable to say.",
    "I don't have any details about that.",
    "I'm not aware of that.",
    "I can't recall anything about that.",
    "That's not something I can tell you.",
    "I have no knowledge of that.",
    "I don't know much about that, sorry.",
    "I couldn't tell you.",
    "I'm not familiar with that.",
)


def refusal_for(index: int) -> str:
    return REFUSALS[index % len(REFUSALS)]
