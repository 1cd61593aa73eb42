"""L2 towards earlier weights: value and gradient, anchors, the name pattern."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from contlearn.plugins.l2 import L2
from omegaconf import OmegaConf

from contlearn import ConfigError, Experiment, PluginError, load_config
from contlearn.models import MLP, ContinualModel, IncrementalLinear


def tiny_run() -> SimpleNamespace:
    torch.manual_seed(0)
    model = ContinualModel(MLP((5,), [6]), IncrementalLinear(6))
    model.head.grow(2)
    cfg = OmegaConf.create({"seed": 0, "train": {"batch_size": 8}})
    return SimpleNamespace(model=model, config=cfg, device=torch.device("cpu"), plugins={})


def shift(model, amount: float = 0.1) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(amount)


def test_zero_at_the_anchor_and_gradient_is_lam_delta():
    run = tiny_run()
    plugin = L2(L2.Config(lam=3.0))
    plugin.setup(run)
    assert plugin.loss_terms(run) is None, "no anchor before the first experience"
    plugin.after_experience(run)
    assert plugin.loss_terms(run)["l2"].item() == 0.0
    anchor = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    shift(run.model, 0.2)
    value = plugin.loss_terms(run)["l2"]
    value.backward()
    n_params = sum(p.numel() for p in run.model.parameters())
    assert value.item() == pytest.approx(0.5 * 3.0 * 0.04 * n_params, rel=1e-5)
    for name, p in run.model.named_parameters():
        torch.testing.assert_close(p.grad, 3.0 * (p.detach() - anchor[name]))


def test_pattern_selects_the_weights_penalised():
    run = tiny_run()
    plugin = L2(L2.Config(lam=1.0, pattern=r"^head\."))
    plugin.setup(run)
    plugin.after_experience(run)
    assert set(plugin.anchor) == {"head.weight", "head.bias"}
    shift(run.model)
    plugin.loss_terms(run)["l2"].backward()
    assert run.model.backbone.net[1].weight.grad is None
    assert torch.count_nonzero(run.model.head.weight.grad) == run.model.head.weight.numel()


def test_initial_anchor_is_taken_at_setup_and_head_growth_is_free():
    run = tiny_run()
    plugin = L2(L2.Config(lam=1.0, anchor="initial"))
    plugin.setup(run)
    before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    plugin.after_experience(run)  # does not move an initial anchor
    shift(run.model)
    run.model.head.grow(4)
    value = plugin.loss_terms(run)["l2"]
    value.backward()
    assert torch.count_nonzero(run.model.head.weight.grad[2:]) == 0
    torch.testing.assert_close(run.model.head.weight.grad[:2], run.model.head.weight.detach()[:2] - before["head.weight"])


def test_initial_anchor_stays_at_the_start_after_an_experience():
    run = tiny_run()
    plugin = L2(L2.Config(lam=2.0, anchor="initial"))
    plugin.setup(run)
    shift(run.model, 0.2)  # trained in the first experience
    plugin.after_experience(run)
    n_params = sum(p.numel() for p in run.model.parameters())
    assert plugin.loss_terms(run)["l2"].item() == pytest.approx(0.5 * 2.0 * 0.04 * n_params, rel=1e-5)


def test_initial_anchor_with_a_pattern_holds_only_the_selected_weights():
    run = tiny_run()
    plugin = L2(L2.Config(lam=1.0, anchor="initial", pattern=r"^head\."))
    plugin.setup(run)
    assert set(plugin.anchor) == {"head.weight", "head.bias"}
    shift(run.model, 0.2)
    n_head = run.model.head.weight.numel() + run.model.head.bias.numel()
    assert plugin.loss_terms(run)["l2"].item() == pytest.approx(0.5 * 0.04 * n_head, rel=1e-5)


def test_pattern_that_matches_nothing_is_one_clear_error(quick):
    cfg = load_config(None, [*quick, "plugins.l2.pattern=attn"])
    with pytest.raises(PluginError, match="matches no trainable parameter.*backbone.net.1.weight"):
        Experiment(cfg).run()


@pytest.mark.parametrize("override, needle", [("plugins.l2.pattern=(", "regular expression"), ("plugins.l2.anchor=best", "anchor"),
                                             ("plugins.l2.lam=.inf", "lam must be a non-negative finite number")])
def test_bad_config(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(None, [override])


def test_state_round_trip():
    run = tiny_run()
    plugin = L2(L2.Config(lam=2.0))
    plugin.setup(run)
    plugin.after_experience(run)
    shift(run.model)
    copy = L2(L2.Config(lam=2.0))
    copy.load_state_dict(plugin.state_dict())
    copy.setup(run)
    assert copy.loss_terms(run)["l2"].item() == pytest.approx(plugin.loss_terms(run)["l2"].item())


def test_state_round_trip_keeps_the_initial_anchor():
    """After a resume the saved initial weights are the anchor, not the weights the run resumes with."""
    run = tiny_run()
    plugin = L2(L2.Config(lam=2.0, anchor="initial"))
    plugin.setup(run)
    shift(run.model)
    copy = L2(L2.Config(lam=2.0, anchor="initial"))
    copy.load_state_dict(plugin.state_dict())
    copy.setup(run)
    value = copy.loss_terms(run)["l2"].item()
    assert value > 0 and value == pytest.approx(plugin.loss_terms(run)["l2"].item())
