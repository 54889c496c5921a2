"""Writing the new captions without ever losing an old one: the mode decides the text, every file is written
atomically, and each caption a run replaces is first copied to DATASET/.sdlora-caption-backup/ with a manifest, so
`undo_last_run` puts the dataset back as it was (scans never look into hidden folders, so the backup is not trained on).

The manifest is a JSON-lines file: a header, then one line per caption, appended (and synced) before the caption is
written, so even a run that was killed half-way can be undone."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..data.captions import is_trigger_tag, split_tags, write_caption
from ..fileio import UserFileError, atomic_path, read_user_bytes
from ..safetext import shown
from .options import CaptioningError

BACKUP_DIR = ".sdlora-caption-backup"
MANIFEST = "manifest.jsonl"


def compose(existing: str, parts: list[str], mode: str, trigger_word: str = "") -> str:
    """The caption to write. overwrite (and skip, for an image without a caption): the new parts; append / prepend:
    the old caption's tags with the new ones after / before them, none twice. The trigger word is kept as training
    reads it (data/captions.build_caption): an old caption whose first tag is the trigger ("sks person") keeps that
    tag first in every mode, and the new text never repeats it. It is not added where it was not: training puts it
    in front of every caption anyway."""
    old_tags = split_tags(existing)
    trigger = trigger_word.strip()
    head = old_tags[:1] if trigger and old_tags and is_trigger_tag(old_tags[0], trigger) else []
    old = old_tags[len(head):] if mode in ("append", "prepend") else []
    if trigger:
        parts = [p for p in parts if p.strip() != trigger and p.strip() not in head]
    new = [p for p in dict.fromkeys(p.strip() for p in parts) if p and p not in old]
    body = old + new if mode == "append" else new + old if mode == "prepend" else new
    return ", ".join(head + body)


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class CaptionWriter:
    """Writes captions inside one dataset root, backing up what it replaces. The first real change of a run replaces
    the previous run's backup (undo is for the last run that changed something)."""

    def __init__(self, root: Path, *, description: str = ""):
        self.root = Path(root)
        self.backup = self.root / BACKUP_DIR
        self.description = description
        self._started = False
        self._count = 0

    def _start(self) -> None:
        if self.backup.is_symlink() or (self.backup.exists() and not self.backup.is_dir()):
            raise CaptioningError(f"'{shown(self.backup)}' is in the way of the caption backup; move it away and run again.")
        shutil.rmtree(self.backup, ignore_errors=True)
        (self.backup / "files").mkdir(parents=True, exist_ok=True)
        header = {"sdlora_caption_backup": 1, "time": time.strftime("%Y-%m-%d %H:%M:%S"), "run": self.description}
        self._append(header)
        self._started = True

    def _append(self, record: dict) -> None:
        with open(self.backup / MANIFEST, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def write(self, caption_path: Path, text: str) -> str:
        """"created" or "replaced" (the old file backed up first), or "unchanged" when the text is what is there."""
        path = Path(caption_path)
        if not path.resolve().is_relative_to(self.root.resolve()):
            # e.g. a caption file linked to somewhere else: never read (into the backup) nor written through
            raise CaptioningError(f"The caption '{shown(path)}' links outside the dataset folder; it was left unchanged.")
        old = None
        if path.exists():
            try:
                old = read_user_bytes(path)
            except (UserFileError, OSError) as exc:
                raise CaptioningError(f"Cannot back up the caption '{shown(path)}' before replacing it "
                                      f"({getattr(exc, 'reason', None) or exc}); it was left unchanged.") from None
            if old.decode("utf-8", errors="replace").strip() == text.strip():
                return "unchanged"
        if not self._started:
            self._start()
        rel = path.relative_to(self.root).as_posix()
        record: dict = {"caption": rel}
        if old is not None:
            self._count += 1
            backup_name = f"files/{self._count:06d}{path.suffix}"
            with atomic_path(self.backup / backup_name) as tmp:
                tmp.write_bytes(old)
            record.update(action="replaced", backup=backup_name, mode=path.stat().st_mode & 0o777)
        else:
            record["action"] = "created"
        self._append(record)  # before the write: a run killed between the two is still undone
        written = write_caption(path, text, root=self.root)
        # What was written, so that undo can tell a caption edited since the run (and leave it alone).
        self._append({"caption": rel, "written": _digest(read_user_bytes(written))})
        return record["action"]


@dataclass
class UndoReport:
    restored: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # edited after the run: left as they are
    description: str = ""

    def summary(self) -> str:
        text = (f"Undid the last captioning run ({self.description or 'no description'}): {len(self.restored)} caption(s) "
                f"restored, {len(self.removed)} removed.")
        if self.kept:
            names = ", ".join(self.kept[:5]) + (f" and {len(self.kept) - 5} more" if len(self.kept) > 5 else "")
            text += f" {len(self.kept)} changed since that run and were left as they are: {names}."
        return shown(text)


def read_manifest(root: Path) -> tuple[dict, list[dict]]:
    path = Path(root) / BACKUP_DIR / MANIFEST
    if not path.is_file():
        raise CaptioningError(f"Nothing to undo in '{shown(root)}': no captioning run left a backup there "
                              f"({BACKUP_DIR}/{MANIFEST}).")
    try:
        lines = read_user_bytes(path, 256 << 20).decode("utf-8").splitlines()
        records = [json.loads(line) for line in lines if line.strip()]
    except (UserFileError, OSError, ValueError) as exc:
        raise CaptioningError(f"The caption backup manifest '{shown(path)}' is unreadable ({exc}); the backed-up "
                              f"captions are in {BACKUP_DIR}/files.") from None
    if not records or records[0].get("sdlora_caption_backup") != 1:
        raise CaptioningError(f"'{shown(path)}' is not an sdlora caption backup manifest.")
    return records[0], records[1:]


def undo_last_run(root) -> UndoReport:
    """Put back every caption the last run replaced and remove the ones it created, then remove the backup. A caption
    edited since the run is left as it is (and named), so an undo never loses newer work."""
    root = Path(root).resolve()
    header, lines = read_manifest(root)
    backup = root / BACKUP_DIR
    report = UndoReport(description=str(header.get("run", "")))
    records: list[dict] = []
    for line in lines:  # an action, then (once the caption was written) its digest
        if "action" in line:
            records.append(dict(line))
        elif "written" in line and records and records[-1].get("caption") == line.get("caption"):
            records[-1]["written"] = line["written"]
    for rec in reversed(records):
        rel = str(rec.get("caption", ""))
        path = (root / rel).resolve()
        if not rel or not path.is_relative_to(root) or path.suffix.lower() not in (".txt", ".caption"):
            continue  # a hand-edited manifest never makes undo touch anything but captions in the dataset
        try:
            current = read_user_bytes(path) if path.exists() else None
        except (UserFileError, OSError):
            current = b""
        if current is not None and rec.get("written") and _digest(current) != rec["written"]:
            report.kept.append(rel)
            continue
        if rec.get("action") == "created":
            path.unlink(missing_ok=True)
            report.removed.append(rel)
        elif rec.get("action") == "replaced":
            source = (backup / str(rec.get("backup", ""))).resolve()
            if not source.is_relative_to(backup.resolve()) or not source.is_file():
                raise CaptioningError(f"The backup of '{shown(rel)}' is missing from '{shown(backup)}'; nothing more "
                                      "was undone.")
            with atomic_path(path) as tmp:
                tmp.write_bytes(read_user_bytes(source))
                os.chmod(tmp, int(rec.get("mode", 0o644)) & 0o777)  # as readable as it was before the run
            report.restored.append(rel)
    shutil.rmtree(backup, ignore_errors=True)
    return report
