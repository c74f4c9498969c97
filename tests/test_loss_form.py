"""flow.loss=l1|l2: the value of each form against a hand computation, and the option reaching the
flow recipe's loss and the checkpoints' config."""

import pytest
import torch

from maisi2 import losses
from maisi2.checkpoint import load_checkpoint
from maisi2.config import get_config
from maisi2.train_flow import train_stage

from test_train_flow import SMALL, make_cache, recipe

pytestmark = pytest.mark.usefixtures("one_thread")


def test_l2_is_the_mean_squared_error_by_hand():
    pred = torch.tensor([1.0, -2.0, 0.5, 3.0]).view(1, 1, 4, 1, 1)
    target = torch.tensor([0.0, 1.0, 0.5, 1.0]).view(1, 1, 4, 1, 1)
    # errors 1, -3, 0, 2: squares 1, 9, 0, 4; absolutes 1, 3, 0, 2
    assert losses.flow_loss(pred, target, form="l2").item() == pytest.approx(14 / 4)
    assert losses.flow_loss(pred, target).item() == pytest.approx(6 / 4)  # the default is the release's L1
    weight = torch.tensor([1.0, 100.0, 1.0, 1.0]).view(1, 1, 4, 1, 1)
    assert losses.flow_loss(pred, target, weight, form="l2").item() == pytest.approx((1 + 900 + 0 + 4) / 103)
    assert losses.flow_loss(pred, target, weight, normalise=False, form="l2").item() == pytest.approx((1 + 900 + 4) / 4)


def test_unknown_form_and_config_value_are_refused():
    with pytest.raises(ValueError, match="l1, l2"):
        losses.flow_loss(torch.zeros(1), torch.zeros(1), form="huber")
    with pytest.raises(ValueError, match="flow.loss"):
        get_config("tiny", ["flow.loss=mse"])
    assert get_config("tiny").flow.loss == "l1"


@pytest.mark.parametrize("objective", ["rflow", "ddpm"])
def test_the_option_reaches_the_flow_recipe_and_the_checkpoint(tmp_path, monkeypatch, objective):
    forms = []
    original = losses.flow_loss

    def spy(*args, **kwargs):
        forms.append(kwargs.get("form", "l1"))
        return original(*args, **kwargs)

    monkeypatch.setattr(losses, "flow_loss", spy)
    cfg = get_config("tiny", ["flow.loss=l2"])
    cache = make_cache(tmp_path / "cache", shapes=[SMALL] * 2)
    r = recipe("stage1.steps=1", "stage1.batch_size=2", f"objective={objective}")
    result = train_stage(1, cache, tmp_path / "out", cfg, r, device="cpu", progress=False)
    assert forms and set(forms) == {"l2"}
    assert load_checkpoint(result.checkpoint).config.flow.loss == "l2"
