"""CLR (Ge et al., ICCV 2023): identity at initialisation, what trains, frozen
banks (zero forgetting), parameter overhead, task routing, resume."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from _crash import CrashAt, SimulatedCrash, assert_same_final_weights, comparable
from _spies import TrainedNames
from contlearn.plugins.clr import (
    CLR,
    ReprogrammedConv,
    batchnorm_tensors,
    insert_reprogramming,
    parameter_overhead,
    reprogramming_parameters,
)
from contlearn.scenarios import Batch, build_stream
from torch import nn
from torch.nn import functional as F

from contlearn import Experiment, hookimpl, load_config
from contlearn.errors import ContlearnError
from contlearn.models import create_model

#: task-incremental digits, a small BatchNorm CNN, 2 tasks, 1 epoch
TINY = [
    "device=cpu",
    "scenario.n_experiences=2",
    "scenario.samples_per_class=30",
    "model.backbone=cnn-bn",
    "model.hidden=[8,16]",
    "train.epochs=1",
    "train.batch_size=16",
    "eval.fwt=false",
]


def clr_config(*extra: str):
    return load_config("task-digits-clr", [*TINY, *extra])


class _Spy(TrainedNames):
    """Records, per experience, the names of parameters that got a gradient, and
    after every evaluation the task-0 logits CLR routes to."""

    def __init__(self):
        super().__init__()
        self.logits: list[torch.Tensor] = []

    @hookimpl
    def on_metrics(self, run, metrics):
        if metrics["kind"] == "eval":
            test = run.stream[0].test
            clr = run.plugins["clr"]
            with torch.no_grad():
                feats = clr.features(run, test.x, 0)
                logits = run.model.head(feats, test.t)  # its columns grow with the tasks
                self.logits.append(logits[:, run.stream[0].classes].clone())


@pytest.mark.parametrize("variant", ["reduced", "full", "scale"])
def test_identity_at_initialisation(variant):
    torch.manual_seed(0)
    cfg = load_config(None, ["model.backbone=cnn-bn", "model.hidden=[8,16]"])
    backbone = create_model(cfg.model, (1, 8, 8)).backbone
    for m in backbone.modules():  # non-trivial BatchNorm statistics and affine parameters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 2), m.bias.data.uniform_(-1, 1)
    backbone.eval()
    x = torch.randn(5, 1, 8, 8)
    before = backbone(x)
    names = insert_reprogramming(backbone, variant)
    assert names == ["net.0", "net.4"]
    assert all(isinstance(backbone.get_submodule(n), ReprogrammedConv) for n in names)
    assert insert_reprogramming(backbone, variant) == names  # idempotent
    torch.testing.assert_close(backbone(x), before, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("variant", "pointwise"), [("reduced", None), ("full", 3), ("scale", 1)])
def test_the_variant_sets_the_kernel_after_1x1_convolutions(variant, pointwise):
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 1), nn.BatchNorm2d(6)
    ).eval()
    x = torch.randn(2, 1, 6, 6)
    before = net(x)
    names = insert_reprogramming(net, variant)
    assert names == (["0"] if pointwise is None else ["0", "3"])
    assert net[0].reprogram.kernel_size == (3, 3)  # a 3x3 convolution: 3x3 in every variant
    if pointwise is None:
        assert type(net[3]) is nn.Conv2d
    else:
        assert net[3].reprogram.kernel_size == (pointwise, pointwise)
        assert net[3].reprogram.groups == 6 and net[3].reprogram.bias is None
    torch.testing.assert_close(net(x), before, rtol=0, atol=1e-6)


def test_resnet18_reduced_overhead_and_identity():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None).eval()
    total = sum(p.numel() for p in net.parameters())
    x = torch.randn(2, 3, 32, 32)
    before = net(x)
    insert_reprogramming(net, "reduced")
    counts = parameter_overhead(net)
    assert counts["reprogramming"] == 35_136
    assert counts["batchnorm"] == 9_600
    assert round(100 * (counts["reprogramming"] + counts["batchnorm"]) / total, 2) == 0.38
    torch.testing.assert_close(net(x), before, rtol=0, atol=1e-5)
    # every 1x1 convolution (the downsample shortcuts) is left as it is in "reduced"
    assert isinstance(net.layer2[0].downsample[0], nn.Conv2d)


def test_only_clr_parameters_train_and_old_tasks_stay_bit_identical():
    spy = _Spy()
    results = Experiment(clr_config(), plugins={"spy": spy}).run()
    # experience 0 (anchor: first_experience) trains the backbone, never the kernels
    assert not any("reprogram" in n for n in spy.grads[0])
    assert "backbone.net.0.conv.weight" in spy.grads[0]
    # experience 1: only kernels, BatchNorm and task 1's head
    assert spy.grads[1] == {
        "backbone.net.0.reprogram.weight",
        "backbone.net.1.weight",
        "backbone.net.1.bias",
        "backbone.net.4.reprogram.weight",
        "backbone.net.5.weight",
        "backbone.net.5.bias",
        "head.heads.1.weight",
        "head.heads.1.bias",
    }
    assert torch.equal(spy.logits[0], spy.logits[1])
    R = results.accuracy_matrix
    assert R[1][0] == R[0][0] and results.bwt == 0.0



class _StartOfExperience:
    """Copies the backbone's kernels and BatchNorm tensors once CLR's
    before_experience has run (trylast: after it)."""

    def __init__(self):
        self.kernels: dict[int, dict[str, torch.Tensor]] = {}
        self.bn: dict[int, dict[str, torch.Tensor]] = {}

    @hookimpl(trylast=True)
    def before_experience(self, run, exp):
        backbone = run.model.backbone
        kernels, bn = reprogramming_parameters(backbone), batchnorm_tensors(backbone)
        self.kernels[exp.index] = {k: v.detach().clone() for k, v in kernels.items()}
        self.bn[exp.index] = {k: v.detach().clone() for k, v in bn.items()}


def _dirac(weight: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(weight)
    c = weight.shape[-1] // 2
    out[:, 0, c, c] = 1
    return out


def test_new_tasks_start_from_identity_and_the_anchor_and_returning_ones_from_their_bank():
    start = _StartOfExperience()
    three = ["scenario.n_experiences=3", "scenario.classes_per_experience=[2,2,6]", "scenario.samples_per_class=10"]
    experiment = Experiment(clr_config(*three), plugins={"start": start})
    experiment.run()
    run = experiment.run_state
    clr: CLR = run.plugins["clr"]
    kernels, bn = start.kernels[2], start.bn[2]  # after task 1 trained kernels and BatchNorm
    assert kernels and all(torch.equal(w, _dirac(w)) for w in kernels.values())
    assert bn.keys() == clr.anchor_bn.keys()
    assert all(torch.equal(bn[k], clr.anchor_bn[k]) for k in bn)
    # task 1 did move both away from there, so the reset is what put them back
    assert any(not torch.equal(clr.banks[1][k], kernels[k]) for k in kernels)
    assert any(not torch.equal(clr.banks[1][k], bn[k]) for k in bn)
    # task 1 comes back (after task 2): it starts from its bank, not the anchor
    clr.before_experience(run, run.stream[1])
    live = {**reprogramming_parameters(run.model.backbone), **batchnorm_tensors(run.model.backbone)}
    assert live.keys() == clr.banks[1].keys()
    assert all(torch.equal(live[k], clr.banks[1][k]) for k in live)


def test_mixed_task_batches_are_routed_by_task():
    experiment = Experiment(clr_config())
    experiment.run()
    run = experiment.run_state
    clr: CLR = run.plugins["clr"]
    a, b = run.stream[0].test, run.stream[1].test
    mixed = Batch(
        torch.cat([a.x[:7], b.x[:9]]), torch.cat([a.y[:7], b.y[:9]]), torch.cat([a.t[:7], b.t[:9]])
    )
    run.model.eval()
    with torch.no_grad():
        together = clr.predict(run, mixed)
        apart = torch.cat(
            [
                clr.predict(run, Batch(a.x[:7], a.y[:7], a.t[:7])),
                clr.predict(run, Batch(b.x[:9], b.y[:9], b.t[:9])),
            ]
        )
        assert torch.equal(together, apart)
        # task 0's bank differs from the live model (which holds task 1's)
        assert not torch.equal(clr.features(run, a.x, 0), run.model.backbone(a.x))


def test_loss_term_is_lambda_times_sum_of_l2_norms():
    seen = []

    class Check:
        @hookimpl
        def loss_terms(self, run, batch, out):
            clr = run.plugins["clr"]
            backbone, head = run.model.backbone, run.model.head.heads[str(run.experience.task)]
            params = [
                m.reprogram.weight for m in backbone.modules() if isinstance(m, ReprogrammedConv)
            ]
            params += [
                p
                for m in backbone.modules()
                if isinstance(m, nn.BatchNorm2d)
                for p in m.parameters()
            ]
            params += list(head.parameters())
            expected = 1e-3 * sum(float(p.detach().norm()) for p in params)
            seen.append((float(clr.loss_terms(run, batch, out)["clr_l2"].detach()), expected))

    Experiment(clr_config("plugins.clr.lam=1e-3"), plugins={"check": Check()}).run()
    assert len(seen) > 2
    for got, expected in seen:
        assert got == pytest.approx(expected, rel=1e-5)


def test_checkpoint_anchor_is_loaded_and_frozen(tmp_path):
    torch.manual_seed(1)
    cfg = load_config("task-digits-clr", TINY)
    backbone = create_model(cfg.model, (1, 8, 8)).backbone
    path = tmp_path / "anchor.pt"
    torch.save(backbone.state_dict(), path)
    experiment = Experiment(
        clr_config("plugins.clr.anchor=checkpoint", f"plugins.clr.anchor_path={path}")
    )
    results = experiment.run()
    live = experiment.run_state.model.backbone
    torch.testing.assert_close(live.net[0].conv.weight, backbone.net[0].weight, rtol=0, atol=0)
    assert results.bwt == 0.0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["plugins.clr.anchor=random"], "unknown plugins.clr.anchor 'random'"),
        (["plugins.clr.variant=big"], "unknown plugins.clr.variant 'big'"),
        (["plugins.clr.anchor=checkpoint"], "needs plugins.clr.anchor_path"),
        (
            ["plugins.clr.anchor=checkpoint", "plugins.clr.anchor_path=/nonexistent.pt"],
            "is not a file",
        ),
        (["plugins.clr.anchor=pretrained"], "needs model.pretrained=true"),
        (["model.head=incremental"], "model.head=multi"),
        (["model.backbone=mlp"], "no convolution to reprogram"),
        (["scenario.setting=class", "model.head=multi"], "scenario.setting=task"),
        (["plugins.clr.anchor_path=/some/file.pt"], "read only with plugins.clr.anchor=checkpoint"),
        (["plugins.clr.lam=nan"], "finite"),
        (["plugins.clr.lam=inf"], "finite"),
        (["plugins.replay={}"], r"\['replay'\] implement train_data / extra_samples"),
        (["plugins.joint={}"], r"\['joint'\] implement"),
    ],
)
@pytest.mark.filterwarnings("ignore:plugins.joint trains on all the data")  # said, then refused: clr makes the data
def test_bad_configs_are_one_clear_error(overrides, message):
    # ConfigError (PluginError when building the plugin)
    with pytest.raises(ContlearnError, match=message):
        Experiment(clr_config(*overrides)).run()


def test_anchor_files_that_do_not_fit_are_one_clear_error(tmp_path):
    path = tmp_path / "junk.pt"
    path.write_bytes(b"not a torch file")
    with pytest.raises(ContlearnError, match=r"cannot be read as a torch state dict \(") as err:
        Experiment(clr_config("plugins.clr.anchor=checkpoint", f"plugins.clr.anchor_path={path}")).run()
    assert "\n" not in str(err.value) and "weights_only=False" not in str(err.value)
    torch.save({"net.0.weight": torch.zeros(3)}, path)
    with pytest.raises(ContlearnError, match=r"missing \[.*\], unexpected \['net.0.weight'\]|other shapes"):
        Experiment(clr_config("plugins.clr.anchor=checkpoint", f"plugins.clr.anchor_path={path}")).run()
    clr_run = Experiment(clr_config())
    clr_run.run()
    torch.save(clr_run.run_state.model.backbone.state_dict(), path)
    with pytest.raises(ContlearnError, match="is a model CLR reprogrammed"):
        Experiment(clr_config("plugins.clr.anchor=checkpoint", f"plugins.clr.anchor_path={path}")).run()


def test_resume_mid_experience_equals_uninterrupted(tmp_path):
    overrides = ["checkpoint.every_n_steps=3", "checkpoint.keep_last=50", "train.epochs=2"]
    Experiment(clr_config(*overrides), out_dir=tmp_path / "whole").run()
    with pytest.raises(SimulatedCrash):  # 10 steps per epoch: inside experience 1, after checkpoint 24
        Experiment(clr_config(*overrides), out_dir=tmp_path / "run", plugins={"crash": CrashAt(27)}).run()
    resumed = Experiment.resume(tmp_path / "run")
    assert resumed._resume_from[1]["position"]["inside_experience"]
    resumed.run()
    assert comparable(tmp_path / "run") == comparable(tmp_path / "whole")
    assert_same_final_weights(tmp_path / "run", tmp_path / "whole")


def test_state_round_trips():
    plugin = CLR(CLR.Config())
    state = {"anchor_bn": {"a": torch.ones(2)}, "banks": {0: {"a": torch.zeros(2)}}}
    plugin.load_state_dict(state)
    assert torch.equal(plugin.state_dict()["banks"][0]["a"], torch.zeros(2))


def _benchmark():
    """benchmarks/clr.py, imported as a module (benchmarks/ is not a package)."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "clr.py"
    spec = importlib.util.spec_from_file_location("clr_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_32x32_inputs_are_the_digits_upsampled_to_rgb():
    bench = _benchmark()
    base = ["scenario.setting=task", "scenario.n_experiences=2", "scenario.samples_per_class=5"]
    small = build_stream(load_config(None, base).scenario, 0)
    cfg = load_config(None, [*base, *bench.workload_overrides("resnet32x32")])
    assert cfg.model.backbone == "resnet20"
    big = build_stream(cfg.scenario, 0)
    assert big.input_shape == (3, 32, 32)
    for a, b in zip(small, big, strict=True):
        for part in ("train", "test"):
            x8, x32 = getattr(a, part).x, getattr(b, part).x
            expected = F.interpolate(x8, size=(32, 32), mode="bilinear", align_corners=False)
            torch.testing.assert_close(x32, expected.expand(-1, 3, -1, -1), rtol=0, atol=1e-6)


def test_resnet20_reduced_reprograms_every_convolution():
    torch.manual_seed(0)
    cfg = load_config(None, ["model.backbone=resnet20"])
    backbone = create_model(cfg.model, (3, 32, 32)).backbone.eval()
    x = torch.randn(2, 3, 32, 32)
    before = backbone(x)
    names = insert_reprogramming(backbone, "reduced")
    assert len(names) == 19  # the stem and 2 per basic block; option-A shortcuts have none
    counts = parameter_overhead(backbone)
    assert (counts["reprogramming"], counts["batchnorm"]) == (6_192, 1_376)
    assert counts["backbone"] - counts["reprogramming"] == 269_072
    torch.testing.assert_close(backbone(x), before, rtol=0, atol=1e-5)


def test_benchmark_resnet32x32_runs_and_clr_has_zero_bwt(capsys):
    bench = _benchmark()
    tiny = [
        "device=cpu",
        "scenario.n_experiences=2",
        "scenario.samples_per_class=2",
        "train.batch_size=10",
    ]
    argv = ["--workload", "resnet32x32", "--seeds", "0", "--epochs", "1"]
    assert bench.main([*argv, "--strategies", "clr", "independent", "--set", *tiny]) == 0
    table = capsys.readouterr().out
    assert "32x32" in table and "resnet20" in table
    rows = {line.split(" | ")[0]: line for line in table.splitlines() if line.startswith("| ")}
    assert set(rows) == {"| method", "| clr", "| independent"}
    # 2 tasks of 5 classes: 6,192 kernels + 1,376 BatchNorm + a 5-class head on 64 features
    assert " | 0.000 | 7,893 (2.9% of the 269,072-parameter backbone) |" in rows["| clr"]


def test_other_plugins_setup_sees_the_reprogrammed_model():
    """CLR's surgery goes first: l2 registered before it selects the reprogramming
    parameters by name (they did not exist yet when l2's setup ran first)."""
    run = Experiment(clr_config("plugins.l2.pattern=reprogram", "plugins.l2.anchor=initial")).build()
    run.hook.setup(run=run)
    anchor = run.plugins["l2"].anchor
    assert anchor and all("reprogram" in name for name in anchor)
