"""The resumable on-disk store of generated knowledge: one JSON record per item.

``<knowledge_dir>/knowledge-<key>.jsonl``, keyed by the item's ORIGINAL token (``"242"``), so
one cache serves every filtering of the dataset; a ``.meta.json`` beside it says what made it.
Generation appends complete records to ``knowledge-<key>.part-<rank>of<world>.jsonl`` and
flushes after each batch, so an interrupted run resumes where it stopped; a truncated last
line (a crash mid-write) is ignored and cut off before appending. When every item is done,
the records are merged into the final file through a temp file and a rename, so a
half-written final file is never read; a corrupt final file is detected line by line, its
good records kept and the rest regenerated.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from recbole_llm.cache_io import atomic_target


class KnowledgeCache:
    """``knowledge-<key>.jsonl`` (final, written by rename) plus per-rank progress files."""

    def __init__(self, directory: str | os.PathLike, key: str, meta: dict | None = None, logger=None):
        self.directory = Path(directory)
        self.key = key
        self.meta = dict(meta or {})
        self.final = self.directory / f"knowledge-{key}.jsonl"
        self.meta_path = self.directory / f"knowledge-{key}.meta.json"
        self.logger = logger or logging.getLogger("recbole_llm")
        self.corrupt_lines = 0

    def part(self, rank: int = 0, world_size: int = 1) -> Path:
        return self.directory / f"knowledge-{self.key}.part-{rank}of{world_size}.jsonl"

    def parts(self) -> list[Path]:
        return sorted(self.directory.glob(f"knowledge-{self.key}.part-*.jsonl"))

    @staticmethod
    def _read(path: Path) -> tuple[dict, int]:
        """Records of one JSONL file and the number of unreadable lines (a truncated last line included)."""
        records, bad = {}, 0
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return records, 0
        for line in text.split("\n"):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                records[str(record["token"])] = record
            except (ValueError, KeyError, TypeError):
                bad += 1
        return records, bad

    def load(self) -> dict[str, dict]:
        """Every complete record: the final file's, then the progress files' (newer wins)."""
        records, bad = self._read(self.final)
        if bad:
            self.logger.warning(f"knowledge cache {self.final} is corrupt ({bad} unreadable lines): "
                                "its good records are kept, the rest is regenerated")
        self.corrupt_lines = bad
        for part in self.parts():
            part_records, part_bad = self._read(part)
            if part_bad:
                self.logger.info(f"{part}: ignoring {part_bad} incomplete line(s) (an interrupted run)")
            records.update(part_records)
        return records

    def open_part(self, rank: int = 0, world_size: int = 1):
        """The progress file opened for appending, cut back to its last complete line first."""
        path = self.part(rank, world_size)
        self.directory.mkdir(parents=True, exist_ok=True)
        if path.is_file():
            data = path.read_bytes()
            if data and not data.endswith(b"\n"):
                with open(path, "r+b") as f:
                    f.truncate(data.rfind(b"\n") + 1)
        return open(path, "a", encoding="utf-8")

    @staticmethod
    def append(handle, records: Sequence[dict]) -> None:
        """Append complete records (one line each) and flush them to disk."""
        handle.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        handle.flush()
        os.fsync(handle.fileno())

    def finalize(self, records: dict[str, dict], stats: dict | None = None) -> None:
        """Write all records to the final file (temp + rename), then drop the progress files."""
        self.directory.mkdir(parents=True, exist_ok=True)
        ordered = sorted(records.values(), key=lambda r: (len(str(r["token"])), str(r["token"])))
        with atomic_target(self.final) as tmp:
            tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ordered), encoding="utf-8")
        meta = {**self.meta, "key": self.key, "items": len(records), **(stats or {})}
        with atomic_target(self.meta_path) as tmp:
            tmp.write_text(json.dumps(meta, indent=2, sort_keys=True, default=str), encoding="utf-8")
        for part in self.parts():
            part.unlink(missing_ok=True)
