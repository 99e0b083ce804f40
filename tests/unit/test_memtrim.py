"""A worker gives freed C-heap memory back to the system (extproc.memtrim): glibc otherwise keeps
it, and a pod's memory limit and the scale bench count RSS."""

from pathlib import Path

from signalbox.extproc import memtrim


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_freed_heap_memory_goes_back_to_the_system():
    # 2 KB blocks come from malloc's heap (not pymalloc, not mmap); the last one, kept, pins the
    # heap's top so that glibc cannot shrink it on its own.
    blocks = [bytearray(2048) for _ in range(60_000)]  # ~120 MB
    pin = bytearray(2048)
    del blocks
    held = rss_mb()
    memtrim.release_free_memory()
    assert rss_mb() < held - 60
    assert len(pin) == 2048
