"""examples/train_digits.py: a short run learns, and the two BN back ends agree."""

import importlib.util
import pathlib
import sys

import numpy as np
import pytest
from numpy.testing import assert_allclose

pytest.importorskip("sklearn")

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "examples" / "train_digits.py"
if not SCRIPT.exists():
    pytest.skip(f"{SCRIPT} is not here (a copy of tests/ without the repository)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("train_digits", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


@pytest.fixture(scope="module")
def runs(example):
    kwargs = dict(epochs=3, batch_size=64, seed=0, channels=16, hidden=64, log=None)
    return {bn: example.train(bn=bn, **kwargs) for bn in ("fastbn", "reference")}


def test_loss_falls_and_the_net_learns(runs):
    r = runs["fastbn"]
    assert len(r.loss) == len(r.test_accuracy) == 3
    assert r.loss[-1] < 0.5 * r.loss[0]
    assert r.test_accuracy[-1] > 0.9          # chance is 0.1
    assert r.bn_forward_train > 0 and r.bn_forward_eval > 0 and r.bn_backward > 0


def test_both_back_ends_give_matching_losses(runs):
    fast, ref = runs["fastbn"], runs["reference"]
    assert_allclose(fast.loss, ref.loss, rtol=1e-5)
    assert abs(fast.test_accuracy[-1] - ref.test_accuracy[-1]) <= 0.01


def test_adam_learns_too(example):
    r = example.train(epochs=2, optimizer="adam", channels=8, hidden=32, log=None)
    assert r.loss[-1] < r.loss[0]


def test_im2col_convolution_matches_a_direct_loop(example):
    rng = np.random.default_rng(0)
    conv = example.Conv3x3(2, 3, rng)
    x = rng.standard_normal((2, 2, 5, 4)).astype(np.float32)
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    w = conv.W.reshape(2, 3, 3, 3)   # (c_in, kh, kw, c_out)
    expected = np.zeros((2, 3, 5, 4))
    for i in range(5):
        for j in range(4):
            expected[:, :, i, j] = np.einsum("nckl,cklo->no", padded[:, :, i:i + 3, j:j + 3], w)
    assert_allclose(conv.forward(x), expected, rtol=1e-5, atol=1e-5)
    dy = rng.standard_normal(expected.shape).astype(np.float32)
    conv.backward(dy)
    # d(sum(dy * conv(x)))/dW: the same loop with dy in place of W
    expected_dw = np.zeros((2, 3, 3, 3))
    for i in range(5):
        for j in range(4):
            expected_dw += np.einsum("nckl,no->cklo", padded[:, :, i:i + 3, j:j + 3],
                                     dy[:, :, i, j])
    assert_allclose(conv.dW, expected_dw.reshape(conv.W.shape), rtol=1e-4, atol=1e-4)


def test_max_pool_routes_the_gradient_to_the_maximum(example):
    pool = example.MaxPool2x2()
    x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    assert_allclose(pool.forward(x)[0, 0], [[5, 7], [13, 15]])
    dx = pool.backward(np.ones((1, 1, 2, 2), np.float32))
    assert dx[0, 0, 1, 1] == dx[0, 0, 1, 3] == dx[0, 0, 3, 1] == dx[0, 0, 3, 3] == 1
    assert dx.sum() == 4


def test_main_prints_progress_and_saves_the_plot(example, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "curves.png"
    results = example.main(["--epochs", "2", "--channels", "8", "--hidden", "32",
                            "--plot", str(path)])
    out = capsys.readouterr().out
    assert "[fastbn] epoch  2/2" in out and "test accuracy" in out
    assert "time inside BatchNorm" in out
    assert len(results) == 1 and results[0].bn == "fastbn"
    assert path.read_bytes().startswith(b"\x89PNG")


def test_main_both_reports_the_speedup(example, capsys):
    example.main(["--epochs", "1", "--channels", "8", "--hidden", "32", "--bn", "both"])
    out = capsys.readouterr().out
    assert "[reference] epoch  1/1" in out
    assert "BatchNorm speedup, fastbn over the NumPy reference:" in out
    assert "Whole run's speedup (training and evaluation)" in out



def test_fused_relu_trains_as_the_separate_layer(example, runs):
    """The ReLU fused into BatchNorm (forward and backward) gives the losses
    of the net with the ReLU as its own layer, and the fused step holds less
    memory at its peak (no mask, no second activation-sized array)."""
    fused = example.train(bn="fastbn", fused=True, epochs=3, batch_size=64, seed=0, channels=16,
                          hidden=64, log=None)
    apart = runs["fastbn"]
    assert fused.bn == "fastbn, fused relu"
    assert_allclose(fused.loss, apart.loss, rtol=1e-5)
    assert abs(fused.test_accuracy[-1] - apart.test_accuracy[-1]) <= 0.01
    assert 0 < fused.step_peak_bytes < apart.step_peak_bytes
    assert apart.relu_time > 0 and fused.relu_time == 0   # no ReLU layer left to time


def test_main_fused_reports_both_ways(example, capsys):
    results = example.main(["--epochs", "1", "--channels", "8", "--hidden", "32", "--fused"])
    out = capsys.readouterr().out
    assert [r.bn for r in results] == ["fastbn", "fastbn, fused relu"]
    assert "[fastbn, fused relu] epoch  1/1" in out
    assert "ReLU fused into BatchNorm: BatchNorm and ReLU" in out and "peak memory" in out
    with pytest.raises(SystemExit):
        example.main(["--fused", "--bn", "both"])
