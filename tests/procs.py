"""Process trees read from /proc (Linux), for tests that check what a run leaves behind or exposes."""
import os


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid``."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def named(prefix: str, below: int | None = None) -> list[int]:
    """Live processes below ``below`` (default: this one) whose command line starts with ``prefix``.

    Ray names a busy actor's process ``ray::Class.method``: this finds an
    actor's pid without calling it (a busy actor answers only after its call).
    """
    found = []
    for pid in sorted(descendants(os.getpid() if below is None else below)):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cmdline.startswith(prefix):
            found.append(pid)
    return found


def exit_within(prefix: str, timeout: float = 30.0) -> list[int]:
    """Poll until no process ``named(prefix)`` is left (killed actors exit asynchronously) or ``timeout``
    seconds passed; returns those still alive then (``[]``: all gone)."""
    import time

    deadline = time.monotonic() + timeout
    while (alive := named(prefix)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive
