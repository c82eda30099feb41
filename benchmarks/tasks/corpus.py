"""Real English text from installed packages (no network): Debian `fortunes` and `wordnet-base`;
or local text/JSONL files; or a hub dataset for users who are online.

A *document* is one quote / gloss / example sentence / line, cleaned of markup and runs of whitespace.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

FORTUNES_DIR = Path("/usr/share/games/fortunes")
WORDNET_DIR = Path("/usr/share/wordnet")

_INSTALL_HINT = (
    "install it with `sudo apt-get install {pkg}` (or `make setup`, which does it where apt-get exists), "
    "or point task.corpus.sources at other text: local *.txt / *.jsonl files or folders, or 'hf:<dataset>'."
)


class CorpusError(RuntimeError):
    """A configured text source is missing or unreadable."""


_WS = re.compile(r"\s+")
_ATTRIBUTION = re.compile(r"\s+(--|~~)\s*[A-Z].{0,100}$")


def clean(text: str) -> str:
    text = text.replace("\t", " ")
    text = _WS.sub(" ", text).strip()
    text = _ATTRIBUTION.sub("", text)  # trailing "-- Author, Book" of fortunes
    return text


def _fortunes(limit: int) -> Iterator[str]:
    if not FORTUNES_DIR.is_dir():
        raise CorpusError(f"text source 'fortunes' not found at {FORTUNES_DIR}: " + _INSTALL_HINT.format(pkg="fortunes"))
    files = sorted(p for p in FORTUNES_DIR.iterdir() if p.is_file() and not p.suffix and not p.is_symlink())
    if not files:
        raise CorpusError(f"text source 'fortunes': {FORTUNES_DIR} holds no fortune files: " + _INSTALL_HINT.format(pkg="fortunes"))
    n = 0
    for p in files:
        raw = p.read_bytes().decode("utf-8", errors="replace")
        for rec in raw.split("\n%\n"):
            # skip ASCII art / code-like records: most characters must be letters or spaces
            if not rec.strip() or sum(c.isalpha() or c.isspace() for c in rec) < 0.85 * len(rec):
                continue
            yield rec
            n += 1
            if limit and n >= limit:
                return


def _wordnet(limit: int) -> Iterator[str]:
    files = [WORDNET_DIR / f"data.{pos}" for pos in ("noun", "verb", "adj", "adv")]
    if not all(f.exists() for f in files):
        raise CorpusError(f"text source 'wordnet' not found at {WORDNET_DIR}: " + _INSTALL_HINT.format(pkg="wordnet-base"))
    n = 0
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("  ") or " | " not in line:  # licence header
                    continue
                gloss = line.split(" | ", 1)[1].strip()
                # "definition; "example one"; "example two""
                for part in gloss.split(";"):
                    part = part.strip().strip('"').strip()
                    if part:
                        part = part[0].upper() + part[1:]
                        yield part if part.endswith((".", "!", "?")) else part + "."
                        n += 1
                        if limit and n >= limit:
                            return


def _local(path: Path, limit: int) -> Iterator[str]:
    files = sorted(p for p in path.rglob("*") if p.suffix in {".txt", ".jsonl", ".json"}) if path.is_dir() else [path]
    if not files:
        raise CorpusError(f"text source '{path}': folder holds no *.txt / *.jsonl / *.json files")
    n = 0
    for f in files:
        if f.suffix == ".txt":
            chunks = re.split(r"\n\s*\n", f.read_text(encoding="utf-8", errors="replace"))  # paragraphs
        else:
            lines = f.read_text(encoding="utf-8", errors="replace").splitlines()
            chunks = []
            for i, line in enumerate(lines):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise CorpusError(f"text source '{f}': line {i + 1} is not valid JSON") from None
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise CorpusError(f"text source '{f}': line {i + 1} needs a string field 'text'")
                chunks.append(row["text"])
        for c in chunks:
            yield c
            n += 1
            if limit and n >= limit:
                return


def _hub(spec: str, limit: int) -> Iterator[str]:
    parts = spec[3:].split(":")
    name, split, column = parts[0], (parts[1] if len(parts) > 1 else "train"), (parts[2] if len(parts) > 2 else "text")
    import datasets

    ds = datasets.load_dataset(name, split=split)
    if column not in ds.column_names:
        raise CorpusError(f"text source '{spec}': dataset has no column '{column}' (columns: {ds.column_names})")
    for i, t in enumerate(ds[column]):
        if limit and i >= limit:
            return
        yield t


def read_source(spec: str, limit: int = 0) -> Iterator[str]:
    """Raw documents of one source spec (see CorpusConfig.sources)."""
    if spec == "fortunes":
        return _fortunes(limit)
    if spec == "wordnet":
        return _wordnet(limit)
    if spec.startswith("hf:"):
        return _hub(spec, limit)
    p = Path(spec).expanduser()
    if p.exists():
        return _local(p, limit)
    raise CorpusError(
        f"text source '{spec}' is neither a known package source ('fortunes', 'wordnet'), an existing local "
        "file/folder, nor 'hf:<dataset>'; fix task.corpus.sources"
    )


def load_documents(spec: str, *, min_chars: int, max_chars: int, limit: int = 0) -> list[str]:
    """Cleaned, length-filtered, de-duplicated documents of one source, in a stable order."""
    seen: set[str] = set()
    out = []
    for raw in read_source(spec, limit):
        doc = clean(raw)
        if min_chars <= len(doc) <= max_chars and doc not in seen:
            seen.add(doc)
            out.append(doc)
    if not out:
        raise CorpusError(f"text source '{spec}' gave no documents of {min_chars}-{max_chars} characters")
    return out
