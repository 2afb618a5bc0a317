"""IS-Net: the official checkpoint layout, the weights-only loader, the forward, the wrapper.

No weights are available here, so everything runs on random tensors shaped like the official
``isnet-general-use.pth`` (read from the shared checkpoint layout).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch (curate[detectors]) is needed for IS-Net")

from curate.core.errors import CurateError  # noqa: E402
from curate.stages.foreground.isnet import ISNetDIS, confidence, foreground_probability, load_isnet  # noqa: E402

LAYOUT = (Path(__file__).resolve().parents[1].parent / "shared" / "data"
          / "checkpoint-layouts" / "isnet.json")


@pytest.fixture(scope="module")
def layout() -> dict[str, list[int]]:
    if not LAYOUT.is_file():
        pytest.skip(f"the official IS-Net layout is missing: expected it at {LAYOUT}")
    entries = json.loads(LAYOUT.read_text())
    entries.pop("meta")
    return entries


@pytest.fixture(scope="module")
def model() -> ISNetDIS:
    torch.manual_seed(0)
    return ISNetDIS().eval()


@pytest.fixture(scope="module")
def random_state(layout) -> dict[str, torch.Tensor]:
    """A state dict with the official keys, shapes and dtypes, and random values."""
    gen = torch.Generator().manual_seed(1)
    return {
        key: (torch.randint(0, 1000, shape, generator=gen, dtype=torch.int64)
              if key.endswith("num_batches_tracked") else torch.randn(shape, generator=gen))
        for key, shape in layout.items()
    }


def _save(obj, path: Path) -> Path:
    torch.save(obj, path)
    return path


def test_layout_equals_the_official_one(model, layout):
    state = model.state_dict()
    assert list(state) == list(layout)  # names and order
    assert {k: list(v.shape) for k, v in state.items()} == layout
    n_params = sum(p.numel() for p in model.parameters())
    assert len(list(model.parameters())) == 462
    assert n_params == pytest.approx(44.05e6, abs=0.01e6)


@pytest.mark.parametrize("wrap", ["plain", "module_prefix_in_state_dict", "model",
                                  "no_step_counters"])
def test_load_official_layout_strictly(tmp_path, random_state, wrap):
    if wrap == "module_prefix_in_state_dict":
        obj = {"state_dict": {f"module.{k}": v for k, v in random_state.items()}, "epoch": 7}
    elif wrap == "model":
        obj = {"model": random_state}
    elif wrap == "no_step_counters":  # pre-0.4.1 BatchNorm, which strict=True accepts
        obj = {k: v for k, v in random_state.items() if not k.endswith("num_batches_tracked")}
    else:
        obj = random_state
    net = load_isnet(_save(obj, tmp_path / "isnet.pth"))
    assert not net.training
    loaded = net.state_dict()
    for key in ("conv_in.weight", "stage4d.rebnconv3d.bn_s1.running_var", "side6.bias"):
        assert torch.equal(loaded[key], random_state[key])
    counter = "stage1.rebnconv7.bn_s1.num_batches_tracked"
    expected_count = 0 if wrap == "no_step_counters" else random_state[counter].item()
    assert loaded[counter].dtype == torch.int64 and loaded[counter].item() == expected_count
    assert loaded["side1.weight"].dtype == torch.float32


def test_renamed_key_is_named(tmp_path, random_state):
    state = dict(random_state)
    state["stage3.rebnconv2.conv.weight"] = state.pop("stage3.rebnconv2.conv_s1.weight")
    with pytest.raises(CurateError) as err:
        load_isnet(_save(state, tmp_path / "renamed.pth"))
    message = str(err.value)
    assert "renamed.pth" in message
    assert "1 missing: stage3.rebnconv2.conv_s1.weight" in message
    assert "1 unexpected: stage3.rebnconv2.conv.weight" in message


def test_reshaped_key_is_named(tmp_path, random_state):
    state = dict(random_state, **{"side3.weight": torch.zeros(1, 64, 3, 3)})
    with pytest.raises(CurateError, match=r"mis-shaped: side3\.weight \(1, 64, 3, 3\) "
                                          r"\(expected \(1, 128, 3, 3\)\)"):
        load_isnet(_save(state, tmp_path / "reshaped.pth"))


def test_missing_file_names_the_path_and_the_download(tmp_path):
    path = tmp_path / "nowhere" / "isnet-general-use.pth"
    with pytest.raises(CurateError, match="isnet-general-use.pth from the release of the DIS"
                       ) as err:
        load_isnet(path)
    assert str(path) in str(err.value)


class _MakesDirWhenUnpickled:
    """Unpickling this calls os.mkdir: proof of whether the loader ran pickled code."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return os.mkdir, (str(self.target),)


def test_pickled_object_is_refused_not_run(tmp_path):
    marker = tmp_path / "unpickled"
    obj = {"conv_in.weight": torch.zeros(64, 3, 3, 3), "payload": _MakesDirWhenUnpickled(marker)}
    path = _save(obj, tmp_path / "evil.pth")
    with pytest.raises(CurateError, match=r"evil\.pth: refused: .*mkdir") as err:
        load_isnet(path)
    assert "weights_only=False" not in str(err.value)  # torch's advice is not passed on
    assert not marker.exists()


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_bytes(b"these are not weights")
    with pytest.raises(CurateError, match=r"notes\.pth: not a readable PyTorch checkpoint"):
        load_isnet(path)


def test_forward_returns_six_sigmoid_maps_and_the_decoder_features(model):
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        sides, features = model(x)
    assert len(sides) == 6
    for side in sides:
        assert side.shape == (1, 1, 64, 64)
        assert 0.0 <= side.min().item() and side.max().item() <= 1.0
    # [hx1d .. hx5d, hx6]: after the stride-2 stem, one halving per level.
    assert [tuple(f.shape[1:]) for f in features] == [
        (64, 32, 32), (64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 2, 2), (512, 1, 1)]


def test_foreground_probability_of_a_grey_image(model):
    grey = np.random.default_rng(3).integers(0, 256, (40, 56), dtype=np.uint8)
    prob = foreground_probability(model, grey, size=64)
    assert prob.shape == (40, 56)
    assert prob.dtype == np.float32
    assert 0.0 <= prob.min() and prob.max() <= 1.0
    # Grey means the same grey level in all three channels.
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    np.testing.assert_array_equal(prob, foreground_probability(model, rgb, size=64))


def test_foreground_probability_refuses_a_training_model_and_odd_images(model):
    with pytest.raises(ValueError, match="H x W x 3 uint8"):
        foreground_probability(model, np.zeros((8, 8, 4), np.uint8), size=64)
    with pytest.raises(ValueError, match="H x W x 3 uint8"):
        foreground_probability(model, np.zeros((8, 8), np.float32), size=64)
    model.train()
    try:
        with pytest.raises(ValueError, match="training mode"):
            foreground_probability(model, np.zeros((8, 8), np.uint8), size=64)
    finally:
        model.eval()


def test_confidence():
    assert confidence(np.full((4, 4), 0.5)) == 0.0
    assert confidence(np.array([0.0, 1.0, 1.0, 0.0])) == 1.0
    assert confidence(np.array([0.25, 0.75])) == pytest.approx(0.5)  # mean |2p - 1|
    # Measured against the threshold, as a fraction of the room on each side.
    assert confidence(np.array([0.6, 0.1]), threshold=0.2) == pytest.approx((0.5 + 0.5) / 2)
    with pytest.raises(ValueError):
        confidence(np.zeros(3), threshold=1.0)
