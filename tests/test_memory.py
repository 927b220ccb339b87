"""No full-size temporaries: with ``out=`` a call allocates O(C), not O(x).

tracemalloc sees NumPy's array allocations (and Python's), not the kernels'
malloc'd O(threads x C) work space, which is what the design allows. Each
function runs on a 32 MB input; the peak of the traced allocations during
the call must stay under 1% of the input. A call without ``out`` is also
measured, to show that the measurement does see a new full-size array.
"""

import numpy as np
import pytest

import fastbn

from helpers import layout_id, peak_bytes, under_asan

INPUT_BYTES = 32 * 2**20
LIMIT = INPUT_BYTES // 100

LAYOUTS = [
    ((8, 64, 128, 128), 1, np.float32),     # planar
    ((4, 64, 128, 128), 1, np.float64),     # planar
    ((32768, 256), 1, np.float32),          # columnar
    ((8, 128, 128, 32), -1, np.float64),    # channels last
]


@pytest.fixture(scope="module", params=[
    pytest.param(p, id=f"{np.dtype(p[2]).name}-{layout_id(p[0], p[1])}") for p in LAYOUTS])
def big(request):
    """x, dy, out and per-channel arrays for a 32 MB input."""
    shape, channel_axis, dtype = request.param
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape, dtype=dtype)
    assert x.nbytes == INPUT_BYTES
    C = shape[channel_axis]
    return dict(x=x, dy=rng.standard_normal(shape, dtype=dtype), out=np.empty_like(x),
                channel_axis=channel_axis, gamma=np.ones(C, dtype), beta=np.zeros(C, dtype),
                rm=np.zeros(C, dtype), rv=np.ones(C, dtype))


def test_forward_with_out_allocates_no_temporaries(big):
    """batch_norm_forward with out=, running stats included."""
    b = big
    peak = peak_bytes(lambda: fastbn.batch_norm_forward(
        b["x"], b["gamma"], b["beta"], running_mean=b["rm"], running_var=b["rv"],
        channel_axis=b["channel_axis"], out=b["out"]))
    assert peak < LIMIT, f"peak {peak} bytes >= {LIMIT}"


def test_inference_with_out_allocates_no_temporaries(big):
    """batch_norm_inference with out=."""
    b = big
    peak = peak_bytes(lambda: fastbn.batch_norm_inference(
        b["x"], b["gamma"], b["beta"], b["rm"], b["rv"], channel_axis=b["channel_axis"],
        out=b["out"]))
    assert peak < LIMIT, f"peak {peak} bytes >= {LIMIT}"


def test_backward_with_out_allocates_no_temporaries(big):
    """batch_norm_backward with out=."""
    b = big
    peak = peak_bytes(lambda: fastbn.batch_norm_backward(
        b["dy"], b["x"], b["gamma"], b["rm"], b["rv"], channel_axis=b["channel_axis"],
        out=b["out"]))
    assert peak < LIMIT, f"peak {peak} bytes >= {LIMIT}"


def test_in_place_allocates_no_temporaries(big):
    """out=x (forward, inference) and out=dy (backward) allocate nothing full-size either."""
    b = big
    x, dy, ca = b["out"], b["dy"].copy(), b["channel_axis"]
    x[...] = b["x"]
    for call in (
        lambda: fastbn.batch_norm_forward(x, b["gamma"], b["beta"], channel_axis=ca, out=x),
        lambda: fastbn.batch_norm_inference(x, None, None, b["rm"], b["rv"], channel_axis=ca,
                                            out=x),
        lambda: fastbn.batch_norm_backward(dy, b["x"], None, b["rm"], b["rv"],
                                           channel_axis=ca, out=dy),
    ):
        peak = peak_bytes(call)
        assert peak < LIMIT, f"peak {peak} bytes >= {LIMIT}"


def test_measurement_sees_a_new_result(big):
    """Without out=, the new result shows up in the peak (the check above can fail)."""
    b = big
    peak = peak_bytes(lambda: fastbn.batch_norm_inference(
        b["x"], None, None, b["rm"], b["rv"], channel_axis=b["channel_axis"]))
    assert peak >= INPUT_BYTES


# ------------------------------------------- the kernels' own work space ----

HUGE_C_CHILD = r"""
import json, resource
import numpy as np
import fastbn

x = np.random.default_rng(0).standard_normal((2, 2**20), dtype=np.float32)
dy, out = x.copy(), np.empty_like(x)
g, b = np.ones(2**20, np.float32), np.zeros(2**20, np.float32)
_, mean, invstd = fastbn.batch_norm_forward(x, g, b, out=out)
calls = {
    "forward": lambda: fastbn.batch_norm_forward(x, g, b, out=out),
    "inference": lambda: fastbn.batch_norm_inference(x, g, b, mean, invstd, out=out),
    "backward": lambda: fastbn.batch_norm_backward(dy, x, g, mean, invstd, out=out),
}
faults = {}
for name, call in calls.items():
    call()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        call()
    faults[name] = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
print(json.dumps(faults))
"""


def test_huge_c_with_tiny_n_touches_little_new_memory():
    """(2, 2**20) float32 with out=: the columnar work space (about 120
    bytes a column) is one chunk's, not C's. The pages a call touches for
    the first time (minor page faults; its C-sized outputs included) stay
    below those of x itself: before chunking, a call faulted in 30 times x."""
    import json
    import subprocess
    import sys

    from helpers import same_fastbn
    done = subprocess.run([sys.executable, "-c", HUGE_C_CHILD], capture_output=True,
                          text=True, timeout=120, **same_fastbn())
    assert done.returncode == 0, done.stderr[-3000:]
    x_pages = 2 * 2**20 * 4 // 4096
    for name, faults in json.loads(done.stdout.strip().splitlines()[-1]).items():
        assert faults < x_pages, (name, faults)


GHOST_CHILD = r"""
import json, resource, sys
import numpy as np
import fastbn

shape = tuple(json.loads(sys.argv[1]))
x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
dy, out = x.copy(), np.empty_like(x)
C = shape[1]
g, b = np.ones(C, np.float32), np.zeros(C, np.float32)
rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
v = shape[0] // 8
_, mean, invstd = fastbn.ghost_batch_norm_forward(x, g, b, v, out=out)
calls = {
    "forward": lambda: fastbn.ghost_batch_norm_forward(x, g, b, v, running_mean=rm,
                                                       running_var=rv, out=out),
    "backward": lambda: fastbn.ghost_batch_norm_backward(dy, x, g, mean, invstd, out=out),
}
faults = {}
for name, call in calls.items():
    call()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        call()
    faults[name] = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
print(json.dumps(faults))
"""


@pytest.mark.skipif(under_asan(), reason="AddressSanitizer's allocator keeps freed memory "
                    "in quarantine: every call's work space is new pages there")
def test_ghost_groups_reuse_their_work_space():
    """Ghost Batch Normalization of (256, 4096) float32 in 8 groups, with
    out=: the groups' work spaces are one allocation that later calls
    reuse. Before, each group malloc'd and freed its own (about 0.5 MB, the
    columnar maps of 4096 columns), which went back to the system at every
    call: 158 new pages a forward. Now a call touches no more new pages
    than its own (8, C) mean and invstd (none, once glibc keeps freed
    blocks of that size in its heap)."""
    import json
    import subprocess
    import sys

    from helpers import same_fastbn
    shape = (256, 4096)
    done = subprocess.run([sys.executable, "-c", GHOST_CHILD, json.dumps(shape)],
                          capture_output=True, text=True, timeout=120, **same_fastbn())
    assert done.returncode == 0, done.stderr[-3000:]
    stats_pages = 2 * 8 * shape[1] * 4 // 4096
    for name, faults in json.loads(done.stdout.strip().splitlines()[-1]).items():
        assert faults <= stats_pages, (name, faults)
