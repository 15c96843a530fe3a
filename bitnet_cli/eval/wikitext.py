"""WikiText-2 raw text as lm-eval's ``wikitext`` task reads it, without lm-eval.

Kept apart from ``tasks.py`` (which needs lm-eval) so that scoring scripts on machines without
lm-eval (``benchmarks/convert_fp.py`` on the GPU machine) split the articles the same way.
"""

from __future__ import annotations

import re


def wikitext_pages(text: str) -> list[str]:
    """Split raw WikiText into articles: each begins at a top-level heading line ' = Title = '."""
    pages, current = [], []
    for line in text.split("\n"):
        if re.fullmatch(r" = [^=].* = ", line) and current:
            pages.append("\n".join(current))
            current = []
        current.append(line)
    if any(l.strip() for l in current):
        pages.append("\n".join(current))
    return [p for p in pages if p.strip()]


def wikitext_detokenizer(page: str) -> str:
    """lm-eval's tasks/wikitext/preprocess_wikitext.wikitext_detokenizer, verbatim in effect."""
    s = page.replace("s '", "s'")
    s = re.sub(r"/' [0-9]/", r"/'[0-9]/", s)
    s = s.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    for p in (":", ";", ".", "!", "?", ","):
        s = s.replace(f" {p} ", f"{p} ")
    s = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", s)
    s = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", s)
    s = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", s)
    s = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', s)
    s = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", s)
    s = s.replace("= = = =", "====").replace("= = =", "===").replace("= =", "==")
    s = s.replace(" " + chr(176) + " ", chr(176)).replace(" \n", "\n").replace("\n ", "\n")
    return s.replace(" N ", " 1 ").replace(" 's", "'s")
