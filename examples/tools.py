"""Tools of the example workflows: real work on the local notes in ``examples/notes``."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

NOTES_DIR = Path(__file__).parent / "notes"

_STOPWORDS_TEXT = """
a an the and or of to in on at by for with from is are be been it its that this
these those as so not no every each what who which when where how do does did can
may must than then they them their there what while after before into over under
about our your you we i he she his her was were will would should could has have had
but if else also only more most less least just very too same such other others
"""
STOPWORDS = frozenset(_STOPWORDS_TEXT.split())


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z][a-z'-]+", text.lower())


def search_notes(query: str, limit: int = 5) -> list[dict[str, object]]:
    """Search the local notes: sentences ranked by how many query words they contain."""
    terms = {w for w in _words(query) if w not in STOPWORDS}
    hits: list[tuple[int, str, str]] = []
    for path in sorted(NOTES_DIR.glob("*.md")):
        for line in path.read_text(encoding="utf-8").splitlines():
            sentence = line.strip()
            if not sentence or sentence.startswith("#"):
                continue
            score = len(terms & set(_words(sentence)))
            if score:
                hits.append((score, path.stem, sentence))
    hits.sort(key=lambda h: (-h[0], h[1], h[2]))
    return [{"note": note, "score": score, "text": text} for score, note, text in hits[:limit]]


def word_count(text: str) -> dict[str, int]:
    """Count the words, sentences and characters of a text."""
    sentences = [s for s in re.split(r"[.!?]+\s", text.strip()) if s.strip()]
    return {"words": len(_words(text)), "sentences": len(sentences), "characters": len(text)}


def extract_keywords(text: str, k: int = 5) -> list[str]:
    """The k most frequent non-stopwords of a text, ties broken alphabetically."""
    counts = Counter(w for w in _words(text) if w not in STOPWORDS and len(w) > 2)
    return [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:k]]
