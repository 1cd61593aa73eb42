"""RegLoRA (SEFE, Chen et al., ICML 2025) and its LoRA layers: identity at
initialisation, exact merges, key elements, the penalty, what trains, resume."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _crash import SMALL_RUN, assert_resume_is_exact
from _spies import TrainedNames
from contlearn.plugins._lora import LoRALinear, adapter_parameters, insert_lora, lora_layers
from contlearn.plugins.reglora import RegLoRA, key_elements, key_index, key_penalty
from torch import nn

from contlearn import Experiment, hookimpl, load_config
from contlearn.errors import ConfigError, ContlearnError, PluginError
from contlearn.models import MLP

#: task-incremental digits, a 32-unit MLP, 3 tasks, 1 epoch
TINY = [
    "device=cpu",
    "scenario.n_experiences=3",
    "scenario.samples_per_class=30",
    "model.hidden=[32,32]",
    "train.epochs=1",
    "train.batch_size=16",
    "train.optimizer=adamw",
    "train.lr=0.01",
    "eval.fwt=false",
    "plugins={}",
]


def config(*extra: str):
    return load_config("task-digits", [*TINY, "scenario.classes_per_experience=[4,3,3]", "plugins.reglora.rank=4", *extra])


def test_a_fresh_adapter_changes_nothing_and_the_forward_is_lora():
    torch.manual_seed(0)
    base = nn.Linear(7, 5)
    layer = LoRALinear(base, rank=3, alpha=6.0)
    x = torch.randn(4, 7)
    assert torch.equal(layer(x), base(x))  # B = 0
    with torch.no_grad():
        layer.lora_B.normal_()
    expected = x @ base.weight.T + base.bias + 2.0 * (x @ layer.lora_A.T @ layer.lora_B.T)
    torch.testing.assert_close(layer(x), expected)
    assert torch.equal(layer.delta(), layer.lora_B @ layer.lora_A)


def test_dropout_acts_on_the_adapter_input_and_a_is_kaiming_uniform():
    torch.manual_seed(0)
    base = nn.Linear(50, 4)
    layer = LoRALinear(base, rank=6, alpha=6.0, dropout=0.5)
    assert layer.lora_A.abs().max() <= 1 / 50**0.5  # kaiming_uniform(a=sqrt(5)): bound 1/sqrt(in)
    assert layer.lora_A.std() > 0.5 / 50**0.5 / 3**0.5
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 50)
    torch.manual_seed(1)
    got = layer(x)
    torch.manual_seed(1)
    dropped = nn.functional.dropout(x, 0.5, training=True)
    torch.testing.assert_close(got, base(x) + dropped @ layer.lora_A.T @ layer.lora_B.T)
    layer.eval()
    torch.testing.assert_close(layer(x), base(x) + x @ layer.lora_A.T @ layer.lora_B.T)


def test_merge_keeps_the_function_and_starts_a_fresh_adapter():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(9, 6), rank=2, alpha=4.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 9)
    before = layer(x)
    old_a = layer.lora_A.detach().clone()
    layer.merge_()
    torch.testing.assert_close(layer(x), before)
    assert torch.count_nonzero(layer.lora_B) == 0
    assert not torch.equal(layer.lora_A, old_a)  # re-drawn
    assert torch.equal(layer(x), layer.base(x))


def test_insert_lora_wraps_the_selected_linear_layers_once():
    mlp = MLP((8,), [16, 16])
    names = insert_lora(mlp, rank=2, alpha=4.0)
    assert names == ["net.1", "net.3"]
    assert insert_lora(mlp, rank=2, alpha=4.0) == names  # nothing wrapped twice
    assert all(isinstance(m.base, nn.Linear) for m in lora_layers(mlp).values())
    assert len(adapter_parameters(mlp)) == 4
    only = MLP((8,), [16, 16])
    assert insert_lora(only, rank=2, alpha=4.0, pattern=r"net\.3") == ["net.3"]
    assert isinstance(only.net[1], nn.Linear)


def test_a_timm_vision_transformer_gets_an_adapter_on_each_attention_and_mlp_projection():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=16, patch_size=8)
    x = torch.randn(2, 3, 16, 16)
    before = vit(x)
    names = insert_lora(vit, rank=2, alpha=4.0, pattern=r"attn\.qkv|mlp\.fc")
    assert len(names) == 3 * len(vit.blocks) and names[:3] == ["blocks.0.attn.qkv", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]
    assert torch.equal(vit(x), before)
    with torch.no_grad():
        vit.blocks[0].attn.qkv.lora_B.normal_()
    assert not torch.allclose(vit(x), before)


def test_torch_attention_layers_are_left_alone_and_a_reused_layer_gets_one_adapter():
    block = nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), nn.Linear(8, 8))
    shared = nn.Linear(8, 8)
    model = nn.Sequential(block, shared, nn.ReLU(), shared)
    assert insert_lora(model, rank=2, alpha=4.0) == ["0.1", "1"]
    assert model[1] is model[3] and isinstance(model[1], LoRALinear)
    first, second = nn.Sequential(nn.Linear(8, 8)), nn.Sequential()
    second.add_module("again", first[0])  # one layer, two names: matched by one, adapted in both places
    pair = nn.Sequential(first, second)
    assert insert_lora(pair, rank=2, alpha=4.0, pattern="again") == ["0.0"]
    assert pair[0][0] is pair[1].again and isinstance(pair[1].again, LoRALinear)
    model.eval()
    assert model(torch.randn(2, 3, 8)).shape == (2, 3, 8)  # the attention still finds its weights


def test_insert_lora_refuses_what_it_cannot_adapt():
    with pytest.raises(ConfigError, match=r"matches no linear layer; linear layers: net\.1, net\.3"):
        insert_lora(MLP((8,), [16, 16]), rank=2, alpha=4.0, pattern="attn")
    with pytest.raises(ConfigError, match="no nn.Linear layer to adapt in Conv2d"):
        insert_lora(nn.Conv2d(1, 2, 3), rank=2, alpha=4.0)
    tied = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    tied[1].weight = tied[0].weight
    with pytest.raises(ConfigError, match="linear layer 0 shares its weight with another module"):
        insert_lora(tied, rank=2, alpha=4.0)
    assert isinstance(tied[0], nn.Linear) and isinstance(tied[1], nn.Linear)  # refused before anything is wrapped
    embedding, out = nn.Embedding(4, 4), nn.Linear(4, 4, bias=False)
    out.weight = embedding.weight  # tied to a module that is not a linear layer
    with pytest.raises(ConfigError, match="linear layer 1 shares its weight"):
        insert_lora(nn.Sequential(embedding, out), rank=2, alpha=4.0)
    with pytest.raises(ConfigError, match=r"left alone: the module itself \(MultiheadAttention\)"):
        insert_lora(nn.MultiheadAttention(8, 2), rank=2, alpha=4.0)
    backbone, head = nn.Sequential(nn.Linear(4, 4)), nn.Linear(4, 4)
    head.weight = backbone[0].weight  # tied to a module outside what is adapted
    insert_lora(copy.deepcopy(nn.Sequential(backbone, head))[0], rank=2, alpha=4.0)  # unseen without the root
    with pytest.raises(ConfigError, match="linear layer 0 shares its weight"):
        insert_lora(backbone, rank=2, alpha=4.0, root=nn.Sequential(backbone, head))
    twice = nn.Sequential(nn.Linear(4, 4))
    twice[0].register_parameter("alias", twice[0].weight)  # one module, two names: not shared
    assert insert_lora(twice, rank=2, alpha=4.0) == ["0"]
    normed = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(4, 4)))
    with pytest.raises(ConfigError, match="linear layer 0 computes its weight"):
        insert_lora(normed, rank=2, alpha=4.0)


def test_key_elements_are_the_top_fraction_of_the_absolute_update():
    delta = torch.tensor([[0.1, -5.0, 0.2, 0.0], [3.0, -0.3, 0.05, -4.0]])
    picked = key_elements(delta, 0.4)  # int(0.4 * 8) = 3
    assert sorted(picked.tolist()) == [1, 4, 7]  # |-5|, |3|, |-4|
    assert key_elements(delta, 0.1).numel() == 0  # int(0.8) = 0


def test_penalty_is_the_mean_over_matrices_of_the_mean_absolute_key_update():
    torch.manual_seed(0)
    layers = [LoRALinear(nn.Linear(6, 5), 3, 12.0), LoRALinear(nn.Linear(4, 2), 3, 12.0), LoRALinear(nn.Linear(4, 7), 3, 12.0)]
    for layer in layers:
        with torch.no_grad():
            layer.lora_B.normal_()
    flats = [torch.tensor([0, 7, 7, 29]), torch.tensor([3, 5, 3, 0]), torch.tensor([], dtype=torch.long)]
    index = [key_index(f, m) for f, m in zip(flats, layers, strict=True)]
    assert [k.gather for k in index[:2]] == [True, False]  # 3 x 3 > 8 elements: read from the whole B @ A
    # the reference's formula on the whole, unscaled B @ A: duplicates count, an empty matrix adds 0 but counts in M
    expected = sum(m.delta().flatten()[f].abs().mean() for f, m in zip(flats[:2], layers[:2], strict=True)) / 3
    torch.testing.assert_close(key_penalty(layers, index), expected)



def test_the_gathered_penalty_sends_gradients_to_both_factors_as_the_whole_update_does():
    torch.manual_seed(1)
    layer = LoRALinear(nn.Linear(6, 5), 3, 12.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    flat = torch.tensor([0, 7, 7, 29])
    key = key_index(flat, layer)
    assert key.gather
    got = torch.autograd.grad(key_penalty([layer], [key]), [layer.lora_A, layer.lora_B])
    whole = layer.delta().flatten()[flat].abs().mean()
    want = torch.autograd.grad(whole, [layer.lora_A, layer.lora_B])
    assert got[0][:, key.cols].abs().min() > 0  # A moves at the key columns, not only B
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)

class _Spy(TrainedNames):
    """Per experience: names of parameters that got a gradient; the penalty
    terms seen; the backbone weights after the experience."""

    def __init__(self):
        super().__init__()
        self.terms: dict[int, list[str]] = {}
        self.weights: list[dict[str, torch.Tensor]] = []
        self.start: dict[str, torch.Tensor] = {}

    @hookimpl
    def before_experience(self, run, exp):
        if exp.index == 0:
            self.start = {n: m.base.weight.detach().clone() for n, m in lora_layers(run.model.backbone).items()}

    @hookimpl
    def on_metrics(self, run, metrics):
        if metrics["kind"] == "epoch":
            self.terms[metrics["experience"]] = sorted(k for k in metrics if k.startswith("loss/"))
        if metrics["kind"] == "eval":
            self.weights.append({n: m.base.weight.detach().clone() for n, m in lora_layers(run.model.backbone).items()})


def test_only_adapters_and_head_train_and_the_penalty_starts_with_the_second_task():
    spy = _Spy()
    experiment = Experiment(config("plugins.reglora={}"), plugins={"spy": spy})
    experiment.run()
    for index in range(3):
        trained = spy.grads[index]
        assert trained, index
        assert all(".lora_" in n or n.startswith("head.") for n in trained), trained
        assert any(n.startswith("head.") for n in trained)
    assert "loss/reglora" not in spy.terms[0]
    assert "loss/reglora" in spy.terms[1] and "loss/reglora" in spy.terms[2]
    plugin = experiment.run_state.plugins["reglora"]
    for name, layer in lora_layers(experiment.run_state.model.backbone).items():
        per_task = int(0.02 * layer.base.weight.numel())
        assert plugin.keys[name].numel() == 3 * per_task  # appended after every task, duplicates kept
        assert torch.count_nonzero(layer.lora_B) == 0  # merged
        # task 0's keys: where its merged update (alpha/r) B A, all that changed the weight, is largest
        change = (spy.weights[0][name] - spy.start[name]).abs().flatten()
        assert change[plugin.keys[name][:per_task]].min() >= change.topk(per_task).values.min() * (1 - 1e-5)
    assert all(p.requires_grad for p in experiment.run_state.model.parameters())  # as before the run


def test_train_base_first_trains_the_backbone_then_adapters_and_a_frozen_head():
    spy = _Spy()
    cfg = load_config("rotated-digits-reglora", [*TINY[:6], "eval.fwt=false"])
    Experiment(cfg, plugins={"spy": spy}).run()
    assert any(n.endswith(".base.weight") for n in spy.grads[0])
    assert not any(".lora_" in n for n in spy.grads[0])
    assert all(".lora_" in n for n in spy.grads[1] | spy.grads[2])
    assert "loss/reglora" not in spy.terms[1] and "loss/reglora" in spy.terms[2]


def test_the_penalty_holds_the_earlier_key_elements_still():
    """With a heavy penalty the merged weights move less at task 0's key positions
    than without one (the two runs share task 0 exactly)."""
    moved = {}
    for lam in (0.0, 1e6):
        spy = _Spy()
        experiment = Experiment(config(f"plugins.reglora.lam={lam}", "scenario.n_experiences=2", "scenario.classes_per_experience=[5,5]"), plugins={"spy": spy})
        experiment.run()
        keys = experiment.run_state.plugins["reglora"].keys
        after0, after1 = spy.weights
        moved[lam] = sum(
            (after1[n].flatten()[keys[n][: keys[n].numel() // 2]] - after0[n].flatten()[keys[n][: keys[n].numel() // 2]])
            .abs().sum().item()
            for n in after0
        )
    assert moved[1e6] < 0.1 * moved[0.0], moved


def test_other_plugins_see_the_adapters_merged_whatever_the_order():
    """EWC, registered after RegLoRA, runs its after_experience first unless RegLoRA
    orders itself: it would then anchor the adapters' trained factors."""
    experiment = Experiment(config("plugins.reglora={}", "plugins.ewc={}", "scenario.n_experiences=2",
                                   "scenario.classes_per_experience=[5,5]"))
    experiment.run()
    center = experiment.run_state.plugins["ewc"].center
    lora_b = [name for name in center if name.endswith("lora_B")]
    assert lora_b and all(torch.count_nonzero(center[name]) == 0 for name in lora_b)


class _SeesMergedFirst:
    """An after_experience ordered tryfirst: it still runs after RegLoRA's merge."""

    def __init__(self):
        self.adapters_zero: list[bool] = []

    @hookimpl(tryfirst=True)
    def after_experience(self, run):
        self.adapters_zero.append(all(torch.count_nonzero(m.lora_B) == 0 for m in lora_layers(run.model.backbone).values()))


def test_even_a_tryfirst_after_experience_sees_the_adapters_merged():
    seen = _SeesMergedFirst()
    Experiment(config("plugins.reglora={}", "scenario.n_experiences=2", "scenario.classes_per_experience=[5,5]"),
               plugins={"seen": seen}).run()
    assert seen.adapters_zero == [True, True]


class _ReplacesTheModel:
    @hookimpl
    def setup(self, run):
        run.model = copy.deepcopy(run.model)


def test_a_plugin_that_replaces_the_model_is_refused_by_name():
    with pytest.raises(PluginError, match="another plugin replaced it by a ContinualModel: reglora cannot be combined"):
        Experiment(config("plugins.reglora={}"), plugins={"other": _ReplacesTheModel()}).run()


@pytest.mark.parametrize("builder", [
    ["plugins.memo.memory_size=20"],
    ["plugins.dmn.clip=contlearn-tiny-clip", "plugins.dmn.pretrained=null", "plugins.dmn.train_clip=true"],
], ids=["memo", "dmn"])
@pytest.mark.parametrize("reglora_first", [True, False], ids=["reglora-first", "reglora-second"])
def test_a_plugin_that_builds_its_own_model_is_refused_in_either_order(builder, reglora_first):
    """Both setups go first (tryfirst), so the plugins' order decided which ran
    first: listed first, reglora adapted MEMO's network and left the blocks MEMO
    copied later with adapters never merged nor penalised (exit 0), or crashed
    inside DMN's CLIP (its attention pooling reads q_proj.weight)."""
    name = builder[0].split(".")[1]
    order = ["plugins.reglora={}", *builder] if reglora_first else [*builder, "plugins.reglora={}"]
    with pytest.raises(PluginError, match=f"plugin reglora adapts .* and plugin '{name}' builds a model of its own"):
        Experiment(load_config("split-digits", [*TINY, "scenario.n_experiences=2", *order])).run()


def test_teardown_before_setup_changes_no_trainability():
    model = nn.Sequential(nn.Linear(2, 2))
    model[0].weight.requires_grad_(False)
    RegLoRA().teardown(run=SimpleNamespace(model=model))
    assert not model[0].weight.requires_grad


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["plugins.reglora.rank=0"], "rank must be a positive integer"),
        (["plugins.reglora.top=0"], r"top must be in \(0, 1\]"),
        (["plugins.reglora.dropout=1"], r"dropout must be in \[0, 1\)"),
        (["plugins.reglora.lam=-1"], "lam must be a finite number >= 0"),
        (["plugins.reglora.lam=.inf"], "lam must be a finite number >= 0, got inf"),
        (["plugins.reglora.alpha=.inf"], "alpha must be a finite number > 0, got inf"),
        (["plugins.reglora.pattern=attn"], "pattern 'attn' matches no linear layer; linear layers: net.1, net.3"),
        (["plugins.reglora.pattern=("], r"pattern '\(' is not a regular expression"),
        (["plugins.reglora.train_head=false"], "train_head=false leaves the classes of later experiences untrained"),
        (["model.backbone=cnn", "model.hidden=[4]"], "no nn.Linear layer to adapt in SmallCNN"),
    ],
)
def test_bad_configs_are_one_clear_error(overrides, message):
    with pytest.raises(ContlearnError, match=message):
        Experiment(config("plugins.reglora={}", *overrides)).run()


def test_resume_mid_experience_equals_uninterrupted(tmp_path):
    overrides = [*SMALL_RUN, "train.optimizer=adamw", "train.lr=0.01", "plugins={}", "plugins.reglora.rank=2",
                 "checkpoint.every_n_steps=2", "checkpoint.keep_last=50", "eval.fwt=false"]
    assert_resume_is_exact("split-digits", overrides, tmp_path, crash_at=14)  # in experience 1: keys of 0 held


def _benchmark():
    """benchmarks/reglora.py, imported as a module (benchmarks/ is not a package)."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "reglora.py"
    sys.path.insert(0, str(path.parent))
    try:
        spec = importlib.util.spec_from_file_location("reglora_benchmark", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


def test_the_benchmark_vit_adapts_sixteen_attention_and_mlp_matrices():
    bench = _benchmark()
    vit = bench.vit_digits((1, 8, 8), None)
    assert vit(torch.randn(3, 1, 8, 8)).shape == (3, vit.out_features) == (3, 64)
    names = insert_lora(vit, rank=2, alpha=4.0)
    assert len(names) == 16 and {n.split(".")[-1] for n in names} == {"qkv", "proj", "fc1", "fc2"}
    assert [label for label, _ in bench.rows([250.0, 2500.0])] == [
        "finetune", "lora (lam 0)", "reglora (lam 2500)", "reglora (lam 250)"]


def test_state_holds_the_key_positions():
    plugin = RegLoRA()
    plugin.load_state_dict({"keys": {"net.1": torch.tensor([3, 1])}})
    assert torch.equal(plugin.state_dict()["keys"]["net.1"], torch.tensor([3, 1]))
