"""What one ext_proc process captured, counted in a file that survives its SIGKILL.

The shipper's queue lives in memory: a process that is killed (SIGKILL, OOM killer, a crash) loses
the observations it had not delivered yet, and with them its own counters. So each process keeps
three counters in a small memory-mapped file (``<state_dir>/extproc-ledgers/<pid>-<random>.ledger``):

* ``captured`` — observations it created (one per response, counted when offered to the queue),
* ``acked`` — of those, acknowledged by the controller as stored,
* ``dropped`` — of those, dropped and counted (queue full, or still queued at a clean shutdown).

An increment is a store into a shared mapping of the file (tens of ns, no system call): the kernel
keeps the page when the process dies, so a killed process's counts are exact up to its last
observation. (A power loss may lose the last few seconds of counts: the page is not fsynced.)

The process holds an exclusive ``flock`` on its file while it lives. The next ext_proc process
that starts on the same state directory claims every ledger whose lock it can take (its owner is
gone), reports the counts to the controller (``ObservationBatch.ended_sources``), and deletes the
file once the controller acknowledged the report. The controller knows how many observations it
stored from that source, so the loss it counts is exact — ``captured − dropped − stored`` — also for
a batch it stored but could not acknowledge before the sender died (see
:meth:`lockgate.controller.ingest.observations.ObservationStore.record_ended_sources`).
A clean shutdown whose observations were all acknowledged deletes its own ledger.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("lockgate.extproc.ledger")

MAGIC = b"LGLEDG01"
SIZE = 4096
#: u64 slots of the file (after the 8-byte magic): pid, started (f64 bits), captured, acked, dropped,
#: dropped_reported (the ``dropped_total`` of the last batch the controller acknowledged)
PID, STARTED, CAPTURED, ACKED, DROPPED, DROPPED_REPORTED = range(1, 7)
SOURCE_OFFSET = 64
SOURCE_MAX = 256
SUFFIX = ".ledger"


@dataclass(frozen=True)
class LedgerCounts:
    """The counts in one ledger file."""

    source: str
    pid: int
    started_ts: float
    captured: int
    acked: int
    dropped: int
    dropped_reported: int

    @property
    def unacked(self) -> int:
        """Observations neither acknowledged nor counted as dropped: lost, unless the controller stored
        some of them without the acknowledgement reaching the process."""
        return max(0, self.captured - self.acked - self.dropped)

    @property
    def settled(self) -> bool:
        """Nothing for a successor to report: all acknowledged or dropped, and the drops reported."""
        return self.unacked == 0 and self.dropped_reported >= self.dropped


def _read(buf) -> LedgerCounts | None:
    if len(buf) < SIZE or bytes(buf[:8]) != MAGIC:
        return None
    slots = struct.unpack_from("<7Q", buf, 0)
    started = struct.unpack("<d", struct.pack("<Q", slots[STARTED]))[0]
    raw = bytes(buf[SOURCE_OFFSET:SOURCE_OFFSET + SOURCE_MAX]).split(b"\0", 1)[0]
    return LedgerCounts(raw.decode("utf-8", "replace"), slots[PID], started, slots[CAPTURED], slots[ACKED],
                        slots[DROPPED], slots[DROPPED_REPORTED])


class Ledger:
    """This process's ledger file. ``add_captured``/``add_dropped`` are called from the event loop's
    thread, ``add_acked`` from the sender thread: each slot has one writer, so no lock is needed."""

    def __init__(self, directory: Path, source: str):
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"{os.getpid()}-{os.urandom(4).hex()}{SUFFIX}"
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.ftruncate(fd, SIZE)
            self._mm = mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            raise
        self._fd = fd
        name = source.encode("utf-8")[:SOURCE_MAX - 1]
        self._mm[SOURCE_OFFSET:SOURCE_OFFSET + len(name)] = name
        self.slots = memoryview(self._mm).cast("Q")  #: u64 counters, indexed by the slot constants
        self.slots[PID] = os.getpid()
        self.slots[STARTED] = struct.unpack("<Q", struct.pack("<d", time.time()))[0]
        self._mm[:8] = MAGIC  # last: a file without it was never in use (its process died while creating it)
        self.source = source

    def add_captured(self, n: int = 1) -> None:
        self.slots[CAPTURED] += n

    def add_dropped(self, n: int) -> None:
        self.slots[DROPPED] += n

    def add_acked(self, n: int, dropped_reported: int) -> None:
        self.slots[ACKED] += n
        if dropped_reported > self.slots[DROPPED_REPORTED]:
            self.slots[DROPPED_REPORTED] = dropped_reported

    def counts(self) -> LedgerCounts:
        counts = _read(self._mm)
        assert counts is not None
        return counts

    def close(self) -> LedgerCounts:
        """Unlock and close; the file is deleted when it is settled, else left for the next process."""
        counts = self.counts()
        self.slots.release()
        self._mm.close()
        if counts.settled:
            self.path.unlink(missing_ok=True)
        else:
            log.warning("ext_proc %s ends with %d observations unacknowledged and %d drops the controller was not "
                        "told of; its ledger %s stays for the next ext_proc process to report", self.source,
                        counts.unacked, counts.dropped - counts.dropped_reported, self.path)
        os.close(self._fd)  # releases the lock
        return counts


class ClaimedLedger:
    """The ledger of a process that is gone, held (locked) by this process until its report is acknowledged."""

    def __init__(self, path: Path, fd: int, counts: LedgerCounts):
        self.path = path
        self.fd = fd
        self.counts = counts

    def release(self, delete: bool) -> None:
        if self.fd < 0:
            return
        if delete:
            self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = -1


def claim_ended(directory: Path, own: Path | None = None) -> list[ClaimedLedger]:
    """Lock and read every ledger in ``directory`` whose process is gone (its lock is free). Files that
    were never completed (no magic) or that are settled are deleted at once; the others are returned,
    still locked, for their report."""
    out: list[ClaimedLedger] = []
    try:
        names = sorted(p for p in directory.iterdir() if p.name.endswith(SUFFIX))
    except FileNotFoundError:
        return out
    for path in names:
        if own is not None and path == own:
            continue
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            continue  # claimed and deleted by another process meanwhile
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)  # its process (or another claimant) holds it
            continue
        if os.fstat(fd).st_nlink == 0:  # deleted between our open and our lock
            os.close(fd)
            continue
        counts = _read(os.pread(fd, SIZE, 0))
        if counts is None or counts.settled:
            path.unlink(missing_ok=True)
            os.close(fd)
            continue
        out.append(ClaimedLedger(path, fd, counts))
    return out


__all__ = ["ClaimedLedger", "Ledger", "LedgerCounts", "claim_ended"]
