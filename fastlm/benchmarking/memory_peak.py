"""Where a step's GPU memory peaks, and what is live at that moment, from a CUDA allocator
snapshot (``torch.cuda.memory._record_memory_history`` on, then ``_dump_snapshot``).

The snapshot's trace lists every allocation and free with the Python frames that made it.
Replaying it gives the allocated bytes after each event; the peak is the largest. What is live
then is grouped by its *site*: the first frame in fastlm, transformers, PEFT, bitsandbytes or
Unsloth (the code that asked for the memory), else the innermost frame. Memory allocated before
the recording began is one line of its own (``before the trace``). A CUDA graph's private pool
is not in the trace once captured (replays allocate nothing): it is read from the snapshot's
segments and reported beside the peak, as ``LayerGraphs.peak_bytes`` adds it.

Stdlib only: the snapshot is a plain dict (``pickle.load`` of the dumped file).

Usage: ``print(format_breakdown(peak_breakdown(pickle.load(open("step.pickle", "rb")))))``.
"""

from __future__ import annotations

from collections import Counter

BEFORE = "before the trace"
_OWN_CODE = ("/fastlm/", "/transformers/", "/peft/", "/bitsandbytes/", "/unsloth")
_FREE = ("free_requested",)  # when the allocator's allocated-bytes statistic drops


def site(frames: list[dict]) -> str:
    """``file:line function`` of the frame that asked for the memory: the innermost frame in a
    library of the step (``_OWN_CODE``), else the innermost Python frame (a torch optimizer's,
    say: the C++ frames before it name only the unwinder), else the innermost frame; "?"
    without frames."""
    if not frames:
        return "?"
    python = next((f for f in frames if f["filename"].endswith(".py")), frames[0])
    chosen = next((f for f in frames if any(k in f["filename"] for k in _OWN_CODE)), python)
    name = chosen["filename"].rsplit("/site-packages/", 1)[-1]
    return f"{name}:{chosen['line']} {chosen['name']}"


def peak_breakdown(snapshot: dict, device: int = 0, before: int = 0, top: int = 12) -> dict:
    """The trace's peak of allocated bytes and what is live at it, by site.

    ``before``: bytes allocated when the recording began (``torch.cuda.memory_allocated()``
    then), which the trace does not list. Returns ``{"peak": bytes, "event": index of the
    peak's event, "sites": [(site, bytes), ...] largest first (``top``, the rest summed as
    "other"), "pool": bytes of private-pool segments}``.
    """
    events = snapshot["device_traces"][device]
    peak, peak_index, current = before, -1, before
    for index, event in enumerate(events):
        current += _change(event)
        if current > peak:
            peak, peak_index = current, index
    live: dict[int, tuple[int, str]] = {}
    outside = before  # bytes allocated before the trace and not yet freed
    for event in events[: peak_index + 1]:
        if event["action"] == "alloc":
            live[event["addr"]] = (event["size"], site(event.get("frames", [])))
        elif event["action"] in _FREE and live.pop(event["addr"], None) is None:
            outside -= event["size"]  # a block allocated before the trace
    by_site: Counter[str] = Counter()
    for size, where in live.values():
        by_site[where] += size
    if outside:
        by_site[BEFORE] += outside
    ranked = by_site.most_common()
    sites = ranked[:top]
    if len(ranked) > top:
        sites.append(("other", sum(size for _, size in ranked[top:])))
    return {"peak": peak, "event": peak_index, "sites": sites, "pool": _pool_bytes(snapshot)}


def format_breakdown(breakdown: dict) -> str:
    """The breakdown as lines of MiB: the peak, the private pool, then each site."""
    mib = 2**20
    lines = [
        f"allocated peak {breakdown['peak'] / mib:.1f} MiB (trace event {breakdown['event']}); "
        f"private pools (CUDA graphs) {breakdown['pool'] / mib:.1f} MiB beside it"
    ]
    lines += [f"  {size / mib:9.1f} MiB  {where}" for where, size in breakdown["sites"]]
    return "\n".join(lines)


def _change(event: dict) -> int:
    if event["action"] == "alloc":
        return event["size"]
    if event["action"] in _FREE:
        return -event["size"]
    return 0


def _pool_bytes(snapshot: dict) -> int:
    """Bytes of the segments that belong to a private pool (a pool id other than (0, 0))."""
    return sum(
        segment["total_size"]
        for segment in snapshot.get("segments", [])
        if tuple(segment.get("segment_pool_id", (0, 0))) != (0, 0)
    )
