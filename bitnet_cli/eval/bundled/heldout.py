"""Rows of the ``tinyshakespeare_heldout`` task (lm-eval loads this file through ``!function``).

The text is the tail of the bundled corpus: ``HELDOUT_CHARS`` characters, starting at a line,
cut into documents of about ``DOC_CHARS`` characters at blank lines (between speeches), so that
each document is scored with lm-eval's rolling windows as WikiText's pages are.
"""

from __future__ import annotations

import re

from bitnet_cli.files import bundled

# 4.5% of the corpus's 1,115,394 characters: inside the last 5% of its tokens, which recipes hold
# out for validation (data.val_fraction 0.05; tokens per character vary little across the text).
HELDOUT_CHARS = 50_000
DOC_CHARS = 2_000


def heldout_text() -> str:
    text = bundled("data", "tinyshakespeare.txt").read_text(encoding="utf-8")
    tail = text[-HELDOUT_CHARS:]
    return tail[tail.index("\n") + 1:]  # from the start of a line


def documents(text: str) -> list[str]:
    docs, current = [], ""
    for speech in re.split(r"\n\n+", text.strip()):
        current = f"{current}\n\n{speech}" if current else speech
        if len(current) >= DOC_CHARS:
            docs.append(current)
            current = ""
    if current:
        docs.append(current)
    return docs


def dataset(**_metadata):
    import datasets

    rows = [{"page": doc} for doc in documents(heldout_text())]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def process_results(doc, results):
    """lm-eval's perplexity metrics, counted as its wikitext task counts them (words, UTF-8 bytes)."""
    (loglikelihood,) = results
    words = len(re.split(r"\s+", doc["page"]))
    size = len(doc["page"].encode("utf-8"))
    return {"word_perplexity": (loglikelihood, words), "byte_perplexity": (loglikelihood, size),
            "bits_per_byte": (loglikelihood, size)}
