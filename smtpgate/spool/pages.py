"""Pages: the raw b-tree pages of a SQLite spool, as its file and WAL hold them.

Only salvage uses this, to learn which row a quick_check complaint ("On tree page P
cell C") is about when SQLite itself reads that row without an error. Format:
https://www.sqlite.org/fileformat2.html (b-tree pages, 2.x; the WAL, 4.x).
"""

from __future__ import annotations

import contextlib
import struct
from pathlib import Path

TABLE_LEAF, TABLE_INTERIOR = 0x0D, 0x05
_WAL_HEADER, _FRAME_HEADER = 32, 24


class Pages:
    """Reads page N (from 1) as a reader would see it: the newest committed WAL frame
    for it, else the main file."""

    def __init__(self, path: Path) -> None:
        self._path = path
        header = _head(path)
        (size,) = struct.unpack(">H", header[16:18])
        self.size = 65536 if size == 1 else size
        self._wal_path = Path(f"{path}-wal")
        self._frames = self._committed_frames()

    def _committed_frames(self) -> dict[int, int]:
        """Page -> offset of its newest frame in a committed transaction. Frames count
        while their salts match the WAL header's, and only up to the last commit frame."""
        frames: dict[int, int] = {}
        if not self._wal_path.exists():
            return frames
        with self._wal_path.open("rb") as wal:
            header = wal.read(_WAL_HEADER)
            if len(header) < _WAL_HEADER:
                return frames
            salts = header[16:24]
            pending: dict[int, int] = {}
            offset = _WAL_HEADER
            while True:
                wal.seek(offset)
                frame = wal.read(_FRAME_HEADER)
                if len(frame) < _FRAME_HEADER or frame[8:16] != salts:
                    return frames
                page, commit = struct.unpack(">II", frame[:8])
                pending[page] = offset + _FRAME_HEADER
                if commit:
                    frames.update(pending)
                    pending.clear()
                offset += _FRAME_HEADER + self.size

    def page(self, number: int) -> bytes:
        if number in self._frames:
            source, offset = self._wal_path, self._frames[number]
        else:
            source, offset = self._path, (number - 1) * self.size
        with source.open("rb") as file:
            file.seek(offset)
            return file.read(self.size)

    def rowid_of_cell(self, number: int, cell: int) -> int | None:
        """The rowid of cell `cell` on table leaf page `number`, if it is one."""
        data = self.page(number)
        start = 100 if number == 1 else 0
        if len(data) < start + 8 or data[start] != TABLE_LEAF:
            return None
        (count,) = struct.unpack(">H", data[start + 3 : start + 5])
        if cell >= count:
            return None
        (at,) = struct.unpack(">H", data[start + 8 + 2 * cell : start + 10 + 2 * cell])
        with contextlib.suppress(IndexError):
            _, at = varint(data, at)  # the payload's size
            rowid, _ = varint(data, at)
            return rowid - (1 << 64) if rowid >= 1 << 63 else rowid
        return None

    def table_of_leaf(self, number: int, roots: dict[str, int]) -> str | None:
        """Which table's b-tree holds leaf page `number` (walked from each root)."""
        for table, root in roots.items():
            stack, seen = [root], set()
            while stack:
                page = stack.pop()
                if page in seen or page < 1:
                    continue
                seen.add(page)
                if page == number:
                    return table
                data = self.page(page)
                start = 100 if page == 1 else 0
                if len(data) < start + 12 or data[start] != TABLE_INTERIOR:
                    continue
                (count,) = struct.unpack(">H", data[start + 3 : start + 5])
                stack.append(struct.unpack(">I", data[start + 8 : start + 12])[0])
                for n in range(count):
                    (at,) = struct.unpack(">H", data[start + 12 + 2 * n : start + 14 + 2 * n])
                    stack.append(struct.unpack(">I", data[at : at + 4])[0])
        return None


def _head(path: Path) -> bytes:
    with path.open("rb") as file:
        return file.read(100)


def varint(data: bytes, at: int) -> tuple[int, int]:
    """SQLite's big-endian varint at `at`: its value and where the next field starts."""
    value = 0
    for n in range(9):
        byte = data[at + n]
        if n == 8:
            return (value << 8) | byte, at + 9
        value = (value << 7) | (byte & 0x7F)
        if byte < 0x80:
            return value, at + n + 1
    raise AssertionError("unreachable")
