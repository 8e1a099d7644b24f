"""The guest kernel command line: the board's defaults, yielding to anything the user said."""

from __future__ import annotations


def _key(word: str) -> str:
    return word.split("=", 1)[0]


def merge_cmdline(user: str, defaults: list[str]) -> str:
    """``defaults`` whose key the user did not give, then the user's words.

    Words after ``--`` belong to init, not the kernel, so the defaults go first and only the user's words
    before ``--`` are searched for keys.
    """
    words = user.split()
    kernel_words = words[: words.index("--")] if "--" in words else words
    given = {_key(w) for w in kernel_words}
    kept = [d for d in defaults if _key(d) not in given]
    return " ".join([*kept, *words])
