"""Dual Memory Networks (contlearn.plugins.dmn): the memory rules, the read-out,
and the plugin in a stream, on the tiny open_clip CLIP built without weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from contlearn.plugins._clip import ClipClassifier
from contlearn.plugins.dmn import BIASES, DMN, DualMemory, entropy, search_alphas
from contlearn.scenarios import Stream
from torch.nn import functional as F

from contlearn import Experiment, load_config
from contlearn.errors import ConfigError, DataError, PluginError

pytest.importorskip("open_clip")

D = 16


def unit(*shape: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape), dim=-1)


def memory(C: int = 4, L: int = 3, K: int = 2, **kwargs) -> DualMemory:
    mem = DualMemory(D, L, K, **kwargs)
    mem.grow(C)
    mem.text.copy_(unit(C, D))
    mem.shot_feat.copy_(unit(C, K, D))
    mem.shot_mask.fill_(True)
    return mem


def confident(c: int, C: int = 4, sharpness: float = 5.0) -> torch.Tensor:
    """Probabilities with argmax ``c``; higher ``sharpness``, lower entropy."""
    logits = torch.zeros(C)
    logits[c] = sharpness
    return logits.softmax(0)


# ------------------------------------------------------------------ memory rules


def test_update_fills_free_slots_then_replaces_only_with_lower_entropy():
    torch.manual_seed(0)
    mem = memory(L=3)
    feats = unit(6, D)
    for i, sharp in enumerate([2.0, 4.0, 3.0]):  # fill class 1's three slots
        mem.update(feats[i], confident(1, sharpness=sharp))
    assert mem.dyn_count.tolist() == [0, 3, 0, 0]
    assert torch.equal(mem.dyn_feat[1], feats[:3])
    ents = mem.dyn_ent[1].clone()
    assert torch.allclose(ents, torch.stack([entropy(confident(1, sharpness=s)) for s in (2.0, 4.0, 3.0)]))

    mem.update(feats[3], confident(1, sharpness=1.0))  # higher entropy than all: not stored
    assert torch.equal(mem.dyn_feat[1], feats[:3]) and mem.dyn_count[1] == 3

    mem.update(feats[4], confident(1, sharpness=10.0))  # lower: replaces the highest-entropy slot (0)
    assert torch.equal(mem.dyn_feat[1, 0], feats[4]) and torch.equal(mem.dyn_feat[1, 1:], feats[1:3])
    assert mem.dyn_ent[1, 0] < ents.min()

    mem.update(feats[5], confident(2))  # another class has its own slots
    assert mem.dyn_count.tolist() == [0, 3, 1, 0] and torch.equal(mem.dyn_feat[2, 0], feats[5])


def test_empty_slots_contribute_nothing():
    torch.manual_seed(1)
    for reads_static in (True, False):
        mem = memory(L=5, reads_static=reads_static)
        for _ in range(2):
            mem.update(unit(D), confident(0))
        v = unit(3, D)
        clean = mem.dynamic_logits(v)
        mem.dyn_feat[0, 2:] = unit(3, D)  # garbage in the empty slots of class 0
        mem.dyn_feat[3] = unit(5, D)  # and in class 3, which has none filled
        assert torch.allclose(mem.dynamic_logits(v), clean)
    # with no static entries, a class with nothing stored reads out nothing: logit 0
    assert torch.all(mem.dynamic_logits(v)[:, 1:] == 0)


def test_beta_to_infinity_reads_out_the_nearest_entry():
    torch.manual_seed(2)
    mem = memory(L=4, K=3, beta=1e6)
    v = unit(5, D)
    keys, _ = mem.static_entries()  # [C, 1 + K, D]
    nearest = (torch.einsum("bd,cmd->bcm", v, keys)).argmax(-1)  # [B, C]
    expected = 100 * torch.einsum("bcd,bd->bc", keys[torch.arange(4)[None], nearest], v)
    assert torch.allclose(mem.static_logits(v), expected, atol=1e-3)
    soft = memory(L=4, K=3, beta=5.5)
    soft.load_state_dict(mem.state_dict())
    assert not torch.allclose(soft.static_logits(v), expected, atol=1e-2)


def test_learnable_with_zero_biases_equals_training_free():
    torch.manual_seed(3)
    free, learnable = memory(), memory(learnable=True)
    learnable.load_state_dict(free.state_dict())
    feats = unit(20, 8, D)
    out_free, out_learnable = free.episode(feats), learnable.episode(feats)
    for a, b in zip(out_free, out_learnable, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    with torch.no_grad():
        learnable.bias_key.add_(0.3 * torch.randn_like(learnable.bias_key))
    assert not torch.allclose(learnable.static_logits(feats[:, 0]), free.static_logits(feats[:, 0]), atol=1e-3)



def test_the_query_bias_moves_the_attention_but_the_read_out_is_dotted_with_the_image_feature():
    torch.manual_seed(7)
    free, learnable = memory(), memory(learnable=True)
    learnable.load_state_dict(free.state_dict())
    with torch.no_grad():
        learnable.bias_query.copy_(0.5 * torch.randn_like(learnable.bias_query))  # the only non-zero bias
    v = unit(6, D)
    keys, _ = learnable.static_entries()  # every entry valid
    q = F.normalize(v + learnable.bias_query.mean(dim=0), dim=-1)
    w = torch.exp(-5.5 * (1 - torch.einsum("bd,cmd->bcm", q, keys)))
    a = F.normalize(torch.einsum("bcm,cmd->bcd", w, keys), dim=-1)
    expected = 100 * torch.einsum("bcd,bd->bc", a, v)
    got = learnable.static_logits(v)
    assert torch.allclose(got, expected, atol=1e-4)
    assert not torch.allclose(got, free.static_logits(v), atol=1e-2)
    assert not torch.allclose(got, 100 * torch.einsum("bcd,bd->bc", a, q), atol=1e-2)

def test_batched_stream_equals_one_image_at_a_time():
    torch.manual_seed(4)
    for learnable in (False, True):
        seq = memory(C=5, L=3, learnable=learnable)
        if learnable:
            with torch.no_grad():
                for name in BIASES:
                    getattr(seq, name).normal_(0, 0.1)
        batched = memory(C=5, L=3, learnable=learnable)
        batched.load_state_dict(seq.state_dict())
        v, p = unit(60, D), (3 * torch.randn(60, 5)).softmax(1)
        expected = []
        for i in range(60):  # 60 images into 15 slots: many replacements
            seq.update(v[i], p[i])
            expected.append(seq.dynamic_logits(v[i : i + 1]))
        with torch.no_grad():
            got = batched.stream(v, p)
        assert torch.allclose(got, torch.cat(expected), atol=1e-4)
        for name in ("dyn_feat", "dyn_ent", "dyn_count"):
            assert torch.equal(getattr(seq, name), getattr(batched, name)), name


def test_episode_shapes_and_confident_view_average():
    torch.manual_seed(5)
    mem = memory(C=4, L=8)
    p_text, p_dyn, p_static = mem.episode(unit(7, 32, D), fraction=0.1)
    for p in (p_text, p_dyn, p_static):
        assert p.shape == (7, 4) and torch.allclose(p.sum(1), torch.ones(7), atol=1e-5)
    assert int(mem.dyn_count.sum()) == 7


def test_pseudo_label_comes_from_the_lowest_entropy_views():
    mem = memory(C=4, L=8)
    mem.text.copy_(torch.eye(4, D))
    feats = F.normalize(torch.ones(3, 10, D) * torch.eye(4, D).sum(0), dim=-1).clone()  # ambiguous views
    feats[:, 0] = F.normalize(torch.eye(4, D)[0] + 0.9 * torch.eye(4, D)[1], dim=-1)  # the image leans to 0
    for i, c in enumerate([1, 2, 3]):
        feats[i, 7] = torch.eye(4, D)[c]  # one confident view (10% of 10)
    p_text, _, _ = mem.episode(feats, fraction=0.1)
    assert p_text.argmax(1).tolist() == [0, 0, 0]  # P_text is the image's own prediction
    assert mem.dyn_count.tolist() == [0, 1, 1, 1]  # but each was stored under its confident view's class
    assert torch.equal(mem.dyn_feat[1:, 0], feats[:, 0])


def test_growth_keeps_memories_and_adds_empty_ones():
    torch.manual_seed(6)
    mem = memory(C=2, learnable=True)
    mem.update(unit(D), confident(1, C=2))
    before = {k: v.clone() for k, v in mem.state_dict().items()}
    mem.grow(5)
    assert mem.n_classes == 5 and mem.shot_feat.shape == (5, 2, D) and mem.bias_out.shape == (5, D)
    for key, value in before.items():
        assert torch.equal(mem.state_dict()[key][:2], value), key
    assert mem.dyn_count[2:].sum() == 0 and not mem.shot_mask[2:].any()


def test_alpha_search_takes_the_best_and_the_first_on_ties():
    y = torch.tensor([0, 1, 1])
    p_text = torch.tensor([[0.6, 0.4], [0.6, 0.4], [0.6, 0.4]])  # right on 1 of 3
    p_dyn = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])  # right on all
    p_static = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])  # wrong on all
    ad, as_, acc = search_alphas((p_text, p_dyn, p_static), y, [0.01, 1.0, 10.0], [0.0, 0.5])
    assert (ad, as_, acc) == (1.0, 0.0, 1.0)


def test_bad_config_is_a_config_error():
    with pytest.raises(ConfigError, match="mode must be one of"):
        DMN(DMN.Config(mode="few_shot"))
    with pytest.raises(ConfigError, match="shots must be at least 1"):
        DMN(DMN.Config(shots=0))
    DMN(DMN.Config(mode="zero_shot", shots=0))
    for field, value, match in [("lr", -1.0, "lr must be positive"), ("logit_scale", -100.0, "logit_scale must be"),
                                ("weight_decay", -1.0, "weight_decay must be non-negative"),
                                ("beta", float("nan"), "beta must be non-negative"),
                                # an empty list was silently CLIP's 7 templates
                                ("templates", [], r"templates: every prompt template .*\(null: CLIP's 7\), got \[\]"),
                                ("templates", ["a {} photo of {}"], "exactly one '{}'")]:
        with pytest.raises(ConfigError, match=match):
            DMN(DMN.Config(**{field: value}))
    DMN(DMN.Config(weight_decay=0.0, beta=0.0))


# ---------------------------------------------------------------------- stream

TINY_RUN = [
    "train.epochs=1",
    "eval.fwt=false",
    "scenario.n_experiences=2",
    "plugins={}",
    "plugins.dmn.clip=contlearn-tiny-clip",
    "plugins.dmn.pretrained=null",
    "plugins.dmn.shots=3",
    "plugins.dmn.views=4",
    "plugins.dmn.memory_size=5",
    "plugins.dmn.validation_per_class=4",
]


@pytest.mark.parametrize("other, message", [
    ("ewc", "plugin ewc weighs the model's trainable parameters by their Fisher information, but the model has no "
            "trainable parameters (plugin 'dmn' freezes it)"),
    ("l2", "plugin l2 pulls the model's trainable parameters towards an anchor, but the model has no trainable"),
    ("ssd", "plugin ssd dampens the model's trainable parameters, but the model has no trainable"),
    ("lwf", "lwf distils the model's logits, but plugin 'dmn' makes them without gradient"),
])
def test_a_frozen_clip_refuses_plugins_that_act_on_its_parameters(other, message):
    """Without train_clip nothing trains: ewc stopped after the first experience
    (its work lost), l2 and ssd did nothing, lwf was refused only at its first
    distillation."""
    with pytest.raises(PluginError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Experiment(load_config(None, [*TINY_RUN, f"plugins.{other}={{}}"])).run()
    run = Experiment(load_config(None, [*TINY_RUN, "plugins.dmn.train_clip=true", f"plugins.{other}={{}}"])).build()
    run.hook.setup(run=run)  # a CLIP that trains: accepted


def test_task_labels_are_refused_before_the_clip_is_built(monkeypatch):
    """DMN ignored them: a task-incremental run reported its class-incremental
    accuracy (the same matrix as with scenario.setting=class)."""
    from contlearn.plugins import dmn

    monkeypatch.setattr(dmn.DMN, "_build_model", lambda self, run: pytest.fail("the CLIP was built"))
    with pytest.raises(ConfigError, match=r"does not use task labels: scenario.setting=task would report"):
        Experiment(load_config(None, [*TINY_RUN, "scenario.setting=task", "model.head=multi"])).run()
    vectors = Stream.from_tensors(np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32), np.arange(40) % 4,
                                  n_experiences=2)
    with pytest.raises(ConfigError, match=r"CLIP needs image inputs \[1 or 3, H, W\], the data has shape \(8,\)$"):
        Experiment(load_config(None, TINY_RUN), stream=vectors).run()  # was a DataError (exit 1) at the first batch


@pytest.fixture(scope="module")
def finished() -> Experiment:
    experiment = Experiment(load_config(None, [*TINY_RUN, "plugins.dmn.dynamic_memory=keep"]))
    experiment.run()
    return experiment


def test_the_stream_grows_classifier_and_static_memory(finished):
    run = finished.run_state
    plugin, model = run.plugins["dmn"], run.model
    assert isinstance(model, ClipClassifier) and model.head.out_features == 10
    mem = plugin.memory
    assert mem.n_classes == 10
    assert torch.allclose(mem.text, model.head.classifier())
    assert plugin.shot_mask.all() and plugin.shot_x.shape == (10, 3, 1, 8, 8)
    model.eval()
    with torch.no_grad():
        feats = model.backbone(plugin.shot_x.flatten(0, 1)).view(10, 3, -1)
    assert torch.allclose(mem.shot_feat, feats, atol=1e-5)
    assert len(plugin.val_y) == 40 and sorted(set(plugin.val_y.tolist())) == list(range(10))
    assert [h["experience"] for h in plugin.history] == [0, 1]
    assert 0 < int(mem.dyn_count.sum()) <= 50  # kept: filled by the evaluations
    assert len(finished.results.accuracy_matrix) == 2


def test_held_out_samples_are_not_trained_on(finished):
    run = finished.run_state
    plugin = run.plugins["dmn"]
    exp = run.stream[0]
    kept = plugin.kept[0]
    assert len(kept) == len(exp.train) - 4 * len(exp.classes)
    held = plugin.val_x[: 4 * len(exp.classes)]
    trained = exp.train.x[kept].cpu()
    assert not any(torch.equal(h, t) for h in held for t in trained[:50])


def test_state_round_trip_restores_memories_exactly(finished):
    plugin = finished.run_state.plugins["dmn"]
    state = plugin.state_dict()
    fresh = DMN(plugin.config)
    fresh.load_state_dict(state)
    for key, value in plugin.memory.state_dict().items():
        assert torch.equal(fresh.memory.state_dict()[key], value), key
    for name in ("shot_x", "shot_mask", "val_x", "val_y"):
        assert torch.equal(getattr(fresh, name), getattr(plugin, name)), name
    assert fresh.alpha == plugin.alpha and fresh.history == plugin.history
    assert torch.equal(fresh.generator.get_state(), plugin.generator.get_state())
    feats = unit(6, 4, fresh.memory.dim)
    for a, b in zip(fresh.memory.episode(feats), plugin.memory.episode(feats), strict=True):
        assert torch.equal(a, b)


def test_reset_mode_empties_the_dynamic_memory_before_evaluation():
    experiment = Experiment(load_config(None, [*TINY_RUN, "plugins.dmn.mode=learnable", "plugins.dmn.epochs=2", "plugins.dmn.lr=0.01"]))
    run = experiment.build()
    run.hook.setup(run=run)
    plugin = run.plugins["dmn"]
    exp = run.stream[0]
    run.model.adapt(exp.classes)
    run.hook.train_data(run=run, exp=exp)
    plugin.memory.grow(run.model.head.out_features)
    plugin.memory.update(unit(plugin.memory.dim), confident(0, C=plugin.memory.n_classes))
    run.hook.after_experience(run=run, exp=exp)
    assert int(plugin.memory.dyn_count.sum()) == 0
    # every bias trained: bias_text only through the text logits' cross-entropy
    assert all(getattr(plugin.memory, name).abs().sum() > 0 for name in BIASES)
    assert plugin.alpha[0] in plugin.config.alpha_grid and plugin.alpha[1] in plugin.config.alpha_grid


def test_zero_shot_mode_has_no_static_weight():
    results = Experiment(load_config(None, [*TINY_RUN, "plugins.dmn.mode=zero_shot", "plugins.dmn.shots=0"]))
    res = results.run()
    plugin = results.run_state.plugins["dmn"]
    assert all(h["alpha_static"] == 0.0 for h in plugin.history) and plugin.shot_x is None
    assert len(res.accuracy_matrix) == 2


def test_missing_weights_fail_the_run_with_one_clear_error(tmp_path):
    cfg = load_config(None, [*TINY_RUN, "plugins.dmn.clip=RN50", "plugins.dmn.pretrained=openai", f"plugins.dmn.cache_dir={tmp_path}"])
    with pytest.raises(DataError, match="'RN50' pretrained='openai'"):
        Experiment(cfg).run()


def test_another_model_in_place_of_clip_is_a_plugin_error(finished):
    run = finished.run_state
    plugin = run.plugins["dmn"]
    clip = run.model
    try:
        run.model = torch.nn.Linear(2, 2)
        with pytest.raises(PluginError, match="needs the CLIP model"):
            plugin.predict(run, run.stream[0].test.batch(torch.arange(2)))
    finally:
        run.model = clip


def test_resume_from_a_checkpoint_continues_exactly(tmp_path):
    overrides = [*TINY_RUN, "device=cpu", "scenario.samples_per_class=20", "plugins.dmn.dynamic_memory=keep"]
    first = Experiment(load_config(None, overrides), out_dir=tmp_path / "a")
    reference = first.run()
    checkpoints = sorted((tmp_path / "a" / "checkpoints").glob("*.pt"))
    assert len(checkpoints) == 2
    checkpoints[-1].unlink()  # as if killed before the second experience's checkpoint
    (tmp_path / "a" / "results.json").unlink()
    resumed = Experiment.resume(tmp_path / "a")
    results = resumed.run()
    assert results.accuracy_matrix == reference.accuracy_matrix
    old, new = first.run_state.plugins["dmn"], resumed.run_state.plugins["dmn"]
    assert isinstance(resumed.run_state.model, ClipClassifier)
    for key, value in old.memory.state_dict().items():
        assert torch.equal(new.memory.state_dict()[key], value), key
    assert new.history == old.history


def test_fit_outside_a_stream_needs_what_its_mode_uses():
    model = ClipClassifier.build("contlearn-tiny-clip", ["a", "b"])
    model.adapt([0, 1])
    with pytest.raises(ConfigError, match="needs val_x and val_y"):
        DMN(DMN.Config(views=2)).fit(model, {0: torch.rand(2, 1, 8, 8), 1: torch.rand(2, 1, 8, 8)})
    with pytest.raises(ConfigError, match="needs the shots"):
        DMN(DMN.Config(views=2, alpha_dynamic=1.0, alpha_static=1.0)).fit(model)



def test_other_plugins_setup_sees_the_clip():
    from contlearn.plugins.dmn import ClipClassifier

    from contlearn import hookimpl

    class Watcher:  # registered after DMN: without DMN's tryfirst, its setup would run first
        seen = None

        @hookimpl
        def setup(self, run):
            Watcher.seen = type(run.model)

    run = Experiment(load_config(None, TINY_RUN), plugins={"watcher": Watcher()}).build()
    run.hook.setup(run=run)
    assert Watcher.seen is ClipClassifier
