"""Hints for people who type Smalltalk into a Python image (stui-compat.md §2).

STUI's documents are written for a Smalltalk server; its examples
(C{x := 3 + 4}, C{Transcript show: 'hi'}, C{Array with: 1 with: 2}) are
SyntaxErrors here.  When a SyntaxError comes from code that looks like
Smalltalk, the error sentence says that the image evaluates Python.
"""

from __future__ import annotations

import re

LANGUAGE = "python"

_SMALLTALK = re.compile(
    r":="  # assignment
    r"|\bTranscript\s+show:"  # the Transcript
    r"|^\s*\|\s*[A-Za-z_]\w*(\s+[A-Za-z_]\w*)*\s*\|"  # | temporaries |
    r"|\b[A-Z]\w*\s+[a-z]\w*:\s*\S"  # a keyword message to a class: Array with: 1
    r"|\[\s*:\s*[a-z]\w*\s*\|",  # a block with an argument: [:x | ...]
    re.MULTILINE,
)

HINT = (
    " (this looks like Smalltalk; this image evaluates Python: "
    "write x = 3 + 4, print('hi'), [1, 2])"
)


def looks_like_smalltalk(code: str) -> bool:
    """Whether C{code} has a typical Smalltalk construct."""
    return bool(_SMALLTALK.search(code))


def smalltalk_hint(failure: BaseException, code: str) -> str:
    """The hint to add to a SyntaxError's sentence, or C{""}."""
    if isinstance(failure, SyntaxError) and looks_like_smalltalk(code):
        return HINT
    return ""
