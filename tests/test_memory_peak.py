"""fastlm.benchmarking.memory_peak on a hand-made allocator snapshot: the peak, what is live at
it (by the site that asked for it), memory from before the trace, and the private pools."""

from __future__ import annotations

from fastlm.benchmarking.memory_peak import BEFORE, format_breakdown, peak_breakdown, site

_LAYER = [{"filename": "/x/site-packages/fastlm/offload/checkpoint.py", "line": 9, "name": "f"}]
_LOSS = [
    {"filename": "/x/site-packages/torch/nn/functional.py", "line": 1, "name": "linear"},
    {"filename": "/x/site-packages/fastlm/autograd/cross_entropy.py", "line": 5, "name": "g"},
]


def _alloc(addr, size, frames):
    return {"action": "alloc", "addr": addr, "size": size, "frames": frames}


def _free(addr, size):
    return {"action": "free_requested", "addr": addr, "size": size}


def _snapshot(events, pool_segment=0):
    segments = [{"total_size": 100, "segment_pool_id": (0, 0)}]
    if pool_segment:
        segments.append({"total_size": pool_segment, "segment_pool_id": (1, 0)})
    return {"device_traces": [events], "segments": segments}


def test_the_peak_is_the_moment_of_most_live_memory_with_its_sites():
    events = [
        _alloc(1, 30, _LAYER),
        _free(1, 30),
        _alloc(2, 20, _LOSS),
        _alloc(3, 25, _LOSS),  # peak: 50 before + 45 live
        _free(99, 10),  # a block from before the trace
        _free(2, 20),
        _alloc(4, 30, _LAYER),  # 50 - 10 + 25 + 30 = 95: not above 95
    ]
    breakdown = peak_breakdown(_snapshot(events, pool_segment=64), before=50)
    assert breakdown["peak"] == 95 and breakdown["event"] == 3
    assert breakdown["sites"] == [(BEFORE, 50), ("fastlm/autograd/cross_entropy.py:5 g", 45)]
    assert breakdown["pool"] == 64
    assert "cross_entropy.py:5" in format_breakdown(breakdown)


def test_memory_from_before_the_trace_freed_before_the_peak_is_not_counted():
    events = [_free(7, 40), _alloc(1, 30, _LAYER), _alloc(2, 30, _LAYER)]
    breakdown = peak_breakdown(_snapshot(events), before=50)
    assert breakdown["peak"] == 70  # 50 - 40 + 60
    assert dict(breakdown["sites"]) == {BEFORE: 10, "fastlm/offload/checkpoint.py:9 f": 60}


def test_the_site_is_the_innermost_frame_of_the_step_s_libraries():
    assert site(_LOSS) == "fastlm/autograd/cross_entropy.py:5 g"
    assert site(_LOSS[:1]) == "torch/nn/functional.py:1 linear"
    assert site([]) == "?"
    unwound = [{"filename": "??", "line": 0, "name": "torch::unwind::unwind()"}]
    optimizer = {"filename": "/x/site-packages/torch/optim/adamw.py", "line": 7, "name": "step"}
    assert site([*unwound, optimizer]) == "torch/optim/adamw.py:7 step"  # not the unwinder
    assert site(unwound) == "??:0 torch::unwind::unwind()"
