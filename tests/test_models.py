"""Backbones (parameter counts, external libraries, offline weights) and heads."""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.nn import functional as F

from contlearn import Experiment, hookimpl, load_config
from contlearn.config import ModelConfig
from contlearn.errors import ConfigError
from contlearn.models import (
    BACKBONES,
    ContinualModel,
    CosineLinear,
    IncrementalLinear,
    MultiHead,
    create_backbone,
    create_model,
    resnet,
)
from contlearn.models.heads import MASKED_LOGIT


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def model_cfg(**values) -> OmegaConf:
    return OmegaConf.structured(ModelConfig(**values))


# ------------------------------------------------------------- resnets


def test_resnet32_matches_memo_counts():
    net = create_backbone("resnet32", (3, 32, 32), model_cfg())
    generalized, specialized = net.split()
    assert n_params(net) == 463_504 and net.out_features == 64
    assert n_params(generalized) == 112_016 and n_params(specialized) == 351_488
    # with a 100-way linear head: 463,504 + 64 * 100 + 100
    model = create_model(model_cfg(backbone="resnet32"), (3, 32, 32))
    model.adapt(list(range(100)))
    assert n_params(model) == 470_004


@pytest.mark.parametrize("name, stem_to_layer3", [("resnet18", 2_775_104), ("resnet18-imagenet", 2_782_784)])
def test_resnet18_counts(name, stem_to_layer3):
    net = create_backbone(name, (3, 32, 32), model_cfg())
    generalized, specialized = net.split()
    assert n_params(generalized) == stem_to_layer3
    assert n_params(specialized) == n_params(net.layer4) == 8_393_728
    assert net.out_features == 512


@pytest.mark.parametrize("name", ["resnet20", "resnet32", "resnet18", "resnet18-imagenet"])
def test_resnet_split_composes_to_the_whole(name):
    net = create_backbone(name, (3, 32, 32), model_cfg()).eval()
    generalized, specialized = net.split()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(specialized(generalized(x)), net(x))
    assert net(x).shape == (2, net.out_features)


def test_small_inputs_and_channels():
    net = create_backbone("resnet32", (1, 8, 8), model_cfg())
    assert net(torch.randn(4, 1, 8, 8)).shape == (4, 64)
    with pytest.raises(ConfigError, match=r"image inputs \[C, H, W\]"):
        create_backbone("resnet18", (64,), model_cfg())


# ------------------------------------------------------- backbone names


def test_unknown_backbones_and_pretrained_builtins():
    with pytest.raises(ConfigError, match="valid backbones"):
        create_backbone("resnet99", (3, 8, 8), model_cfg())
    with pytest.raises(ConfigError, match="unknown backbone prefix"):
        create_backbone("keras:resnet", (3, 8, 8), model_cfg())
    with pytest.raises(ConfigError, match="no pretrained weights"):
        create_backbone("mlp", (64,), model_cfg(pretrained=True))
    with pytest.raises(ConfigError, match="unknown timm model"):
        create_backbone("timm:not_a_net", (3, 8, 8), model_cfg())
    with pytest.raises(ConfigError, match="'not_a_net' is not a torchvision model"):
        create_backbone("tv:not_a_net", (3, 8, 8), model_cfg())
    with pytest.raises(ConfigError, match="is not a torchvision classification model"):  # would download a backbone
        create_backbone("tv:fasterrcnn_resnet50_fpn", (3, 8, 8), model_cfg())
    with pytest.raises(ConfigError, match="is a quantized torchvision model .*use its float version, tv:resnet18$"):
        create_backbone("tv:quantized_resnet18", (3, 8, 8), model_cfg())
    assert {"mlp", "cnn", "resnet18", "resnet32"} <= set(BACKBONES)


@pytest.mark.parametrize("name", ["timm:resnet18", "tv:resnet18", "tv:mobilenet_v3_small", "tv:squeezenet1_1"])
def test_timm_and_torchvision_backbones_without_weights(name):
    net = create_backbone(name, (3, 32, 32), model_cfg())
    out = net(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, net.out_features)


@pytest.mark.parametrize("name, size", [("tv:googlenet", 32), ("tv:inception_v3", 80)])
def test_torchvision_models_with_auxiliary_heads_give_features_in_training(name, size):
    net = create_backbone(name, (3, size, size), model_cfg()).train()
    out = net(torch.randn(2, 3, size, size))
    assert isinstance(out, torch.Tensor) and out.shape == (2, net.out_features)


def test_inputs_a_backbone_cannot_take_are_a_config_error_at_build():
    with pytest.raises(ConfigError, match=r"'timm:vit_tiny_patch16_224' cannot take inputs of shape \(3, 8, 8\).*resize:N"):
        create_backbone("timm:vit_tiny_patch16_224", (3, 8, 8), model_cfg())
    assert create_backbone("timm:vit_tiny_patch16_224", (3, 224, 224), model_cfg()).out_features == 192


def test_pretrained_tags_are_checked_before_anything_loads():
    with pytest.raises(ConfigError, match="'bogus' is not a pretrained tag of timm model 'resnet18'; valid: .*a1_in1k"):
        create_backbone("timm:resnet18", (3, 32, 32), model_cfg(pretrained=True, weights="bogus"))
    with pytest.raises(ConfigError, match="model.weights.*needs model.pretrained=true"):
        load_config("split-digits", ["model.weights=a1_in1k"])
    # a tag in the name chooses weights as model.weights does
    with pytest.raises(ConfigError, match="the tag 'a1_in1k' of backbone 'timm:resnet18.a1_in1k' chooses pretrained weights"):
        create_backbone("timm:resnet18.a1_in1k", (3, 32, 32), model_cfg())
    with pytest.raises(ConfigError, match="'bogus' is not a pretrained tag of timm model 'resnet18'; valid: .*a1_in1k"):
        create_backbone("timm:resnet18.bogus", (3, 32, 32), model_cfg(pretrained=True))
    with pytest.raises(ConfigError, match="names the tag 'a1_in1k' and model.weights names 'tv_in1k': give one"):
        create_backbone("timm:resnet18.a1_in1k", (3, 32, 32), model_cfg(pretrained=True, weights="tv_in1k"))
    # a model without pretrained weights is said so, before the hub probe and a download that cannot succeed
    with pytest.raises(ConfigError, match="timm model 'resnet200' has no pretrained weights .*model.pretrained=false"):
        create_backbone("timm:resnet200", (3, 32, 32), model_cfg(pretrained=True))


def test_timm_takes_other_channel_counts_and_torchvision_asks_for_rgb():
    assert create_backbone("timm:resnet18", (1, 16, 16), model_cfg())(torch.randn(2, 1, 16, 16)).shape == (2, 512)
    with pytest.raises(ConfigError, match="'rgb'"):
        create_backbone("tv:resnet18", (1, 16, 16), model_cfg())
    with pytest.raises(ConfigError, match="'rgb'"):
        create_backbone("clip:ViT-S-32", (1, 16, 16), model_cfg())
    # a wrong name is named as such before the inputs are
    with pytest.raises(ConfigError, match="'nosuch' is not a torchvision model"):
        create_backbone("tv:nosuch", (1, 16, 16), model_cfg())
    with pytest.raises(ConfigError, match="unknown open_clip model 'nosuch'"):
        create_backbone("clip:nosuch", (1, 16, 16), model_cfg())


def test_clip_image_tower_without_weights():
    net = create_backbone("clip:ViT-S-32", (3, 224, 224), model_cfg())
    assert net(torch.randn(1, 3, 224, 224)).shape == (1, net.out_features)
    names = [n for n, _ in net.named_parameters()]
    assert any("conv1" in n for n in names) and not any("token_embedding" in n for n in names)  # no text tower
    with pytest.raises(ConfigError, match="not a pretrained tag"):
        create_backbone("clip:ViT-S-32", (3, 224, 224), model_cfg(pretrained=True))


OFFLINE_SCRIPT = textwrap.dedent(
    """
    from omegaconf import OmegaConf
    from contlearn.config import ModelConfig
    from contlearn.models import create_backbone
    from contlearn.models.external import WeightsError
    for name in ("timm:resnet18", "tv:resnet18", "clip:ViT-B-32"):
        cfg = OmegaConf.structured(ModelConfig(backbone=name, pretrained=True))
        try:
            create_backbone(name, (3, 32, 32), cfg)
            print(name, "LOADED")
        except WeightsError as exc:
            print(name, "ERROR", exc)
    """
)


def test_missing_pretrained_weights_say_which_and_where(tmp_path):
    """The real loaders, offline, with empty caches: one clear error each."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch"),
           "XDG_CACHE_HOME": str(tmp_path / "xdg"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("HF_HUB_CACHE", None)
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    proc = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    lines = {line.split(" ", 1)[0]: line for line in proc.stdout.splitlines() if " ERROR " in line or " LOADED" in line}
    assert set(lines) == {"timm:resnet18", "tv:resnet18", "clip:ViT-B-32"}, proc.stdout + proc.stderr
    hf_cache = str(tmp_path / "hf" / "hub")
    assert "timm/resnet18" in lines["timm:resnet18"] and hf_cache in lines["timm:resnet18"]
    assert "HF_HUB_OFFLINE" in lines["timm:resnet18"]
    assert "Downloading" not in proc.stdout + proc.stderr  # torch.hub's line, printed before it tries
    tv = lines["tv:resnet18"]
    assert "ResNet18_Weights.IMAGENET1K_V1" in tv and str(tmp_path / "torch" / "hub" / "checkpoints") in tv
    clip = lines["clip:ViT-B-32"]
    assert "'openai' for clip:ViT-B-32" in clip and hf_cache in clip and "HF_HUB_OFFLINE" in clip


# ---------------------------------------------------------------- heads


def test_incremental_linear_grows_and_keeps_old_rows():
    head = IncrementalLinear(4)
    head.adapt([0, 1])
    old = head.weight.detach().clone()
    head.adapt([2, 3, 4])
    assert head.out_features == 5 and torch.equal(head.weight[:2], old)
    head.adapt([1])
    assert head.out_features == 5


def test_cosine_head():
    head = CosineLinear(6, scale=10.0)
    head.adapt([0, 1, 2])
    f = torch.randn(5, 6)
    logits = head(f)
    expected = 10.0 * F.normalize(f, dim=1) @ F.normalize(head.weight, dim=1).T
    assert torch.allclose(logits, expected, atol=1e-6) and float(logits.detach().abs().max()) <= 10.0 + 1e-5
    assert head.scale.requires_grad
    old = head.weight.detach().clone()
    head.adapt([3])
    assert head.out_features == 4 and torch.equal(head.weight[:3], old)


def test_multi_head_masks_other_tasks_and_handles_mixed_batches():
    torch.manual_seed(0)
    head = MultiHead(3)
    head.adapt([0, 1], 0)
    head.adapt([2, 3, 4], 1)
    assert head.out_features == 5 and head.tasks == [0, 1]
    f = torch.randn(6, 3, requires_grad=True)
    task = torch.tensor([0, 1, 1, 0, 1, 0])
    logits = head(f, task)
    own0, own1 = head.heads["0"](f), head.heads["1"](f)
    for i, t in enumerate(task.tolist()):
        cols, own = ([0, 1], own0) if t == 0 else ([2, 3, 4], own1)
        other = [c for c in range(5) if c not in cols]
        assert torch.equal(logits[i, cols], own[i])
        assert bool((logits[i, other] == MASKED_LOGIT).all())
    pred = logits.argmax(1)
    assert all((p < 2) == (t == 0) for p, t in zip(pred.tolist(), task.tolist(), strict=True))
    # cross-entropy with global labels trains only each sample's own head
    y = torch.tensor([1, 3, 4, 0, 2, 1])
    head.zero_grad()
    F.cross_entropy(head(f[:1].detach(), task[:1]), y[:1]).backward()
    assert head.heads["1"].weight.grad is None  # not run: a batch of task 0 only
    assert float(head.heads["0"].weight.grad.abs().sum()) > 0
    assert torch.isfinite(F.cross_entropy(logits, y))


def test_multi_head_runs_only_the_batch_s_tasks_in_training_and_every_head_otherwise():
    torch.manual_seed(0)
    head = MultiHead(3)
    for task in range(3):
        head.adapt([2 * task, 2 * task + 1], task)
    f, task = torch.randn(4, 3), torch.tensor([2, 0, 2, 0])
    calls: list[str] = []
    for name, module in head.heads.items():
        module.register_forward_hook(lambda m, i, o, name=name: calls.append(name))
    trained = head(f, task)
    assert sorted(calls) == ["0", "2"]
    calls.clear()
    with torch.no_grad():
        assert torch.equal(head(f, task), trained.detach())
    assert sorted(calls) == ["0", "1", "2"]
    calls.clear()
    head.eval()
    assert torch.equal(head(f, task), trained)
    assert sorted(calls) == ["0", "1", "2"]


def test_weight_decay_leaves_a_finished_task_s_head_as_it_was():
    """Task-incremental training with weight decay: task 0's head gets no gradient
    in experience 1 (none of its samples), so the optimizer does not decay it."""
    heads = {}

    class Snapshot:
        @hookimpl
        def after_experience(self, run, exp):
            heads[exp.index] = {k: v.clone() for k, v in run.model.head.heads["0"].state_dict().items()}

    overrides = ["train.epochs=1", "scenario.n_experiences=2", "eval.fwt=false", "train.weight_decay=0.1",
                 "train.momentum=0.9"]
    Experiment(load_config("task-digits", overrides), plugins={"snapshot": Snapshot()}).run()
    assert all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])


def test_heads_keep_the_model_dtype_and_take_no_classes():
    for head in ("incremental", "cosine", "multi"):
        model = create_model(OmegaConf.structured(ModelConfig(backbone="mlp", hidden=[8], head=head)), (4,)).double()
        model.adapt([], 0)  # nothing to add
        model.adapt([0, 1], 0)
        model.adapt([2], 1)
        out = model(torch.randn(3, 4, dtype=torch.float64), torch.tensor([0, 1, 1]))
        assert out.logits.dtype == torch.float64 and out.logits.shape[1] == 3, head


def test_multi_head_grows_a_known_task_and_shares_classes_across_tasks():
    head = MultiHead(2)
    head.adapt([0, 1], 0)
    head.adapt([0, 1], 1)  # task-incremental over the same classes (e.g. permuted, one head per task)
    head.adapt([2], 0)
    assert head.task_classes == {0: [0, 1, 2], 1: [0, 1]} and head.out_features == 3
    logits = head(torch.randn(2, 2), torch.tensor([0, 1])).detach()
    assert float(logits[1, 2]) == MASKED_LOGIT and float(logits[0, 2]) != MASKED_LOGIT


def test_unknown_head_is_rejected():
    with pytest.raises(ConfigError, match="model.head"):
        load_config("split-digits", ["model.head=mystery"])


@pytest.mark.parametrize("head", ["multi", "cosine"])
def test_task_digits_and_cosine_runs(head):
    overrides = ["train.epochs=5", "eval.fwt=true", f"model.head={head}"]
    results = Experiment(load_config("task-digits", overrides)).run()
    R = results.accuracy_matrix
    assert len(R) == 5 and all(R[i][i] > 0.7 for i in range(5))
    if head == "multi":
        # the task label picks the head, so old tasks stay far above the
        # class-incremental single head (which forgets them all: ~0.2)
        assert results.average_accuracy > 0.8
    else:
        assert results.average_accuracy < 0.4  # one shared head: task labels do not help it


def test_an_unreachable_hub_is_found_by_a_probe_and_the_cache_alone_is_tried(tmp_path):
    """No HF_HUB_OFFLINE, but the hub's endpoint refuses connections: the loaders
    do not retry against it; the error says it cannot be reached, and nothing but
    the error is printed."""
    env = {**os.environ, "HF_ENDPOINT": "https://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf"),
           "TORCH_HOME": str(tmp_path / "torch"), "XDG_CACHE_HOME": str(tmp_path / "xdg"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    proxies = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")
    for key in ("HF_HUB_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", *proxies):
        env.pop(key, None)
    script = OFFLINE_SCRIPT.replace('("timm:resnet18", "tv:resnet18", "clip:ViT-B-32")', '("timm:resnet18", "clip:ViT-B-32")')
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    lines = {line.split(" ", 1)[0]: line for line in proc.stdout.splitlines() if " ERROR " in line}
    assert set(lines) == {"timm:resnet18", "clip:ViT-B-32"}, proc.stdout + proc.stderr
    assert all("the Hugging Face Hub cannot be reached from here" in line for line in lines.values())
    assert not any("Error" in line.split(" ERROR ", 1)[1] for line in lines.values())  # not the client's long error too
    assert "Failed to download" not in proc.stderr  # open_clip's own log line is silenced


def test_a_name_lookup_that_hangs_counts_as_unreachable_after_the_probe_time(monkeypatch):
    """create_connection's timeout does not bound the DNS lookup: the probe as a whole is bounded."""
    import threading
    import time

    from contlearn.models import external

    release = threading.Event()

    def hanging_lookup(*args, **kwargs):
        release.wait(30)
        raise OSError("lookup timed out")

    monkeypatch.setattr(external.socket, "create_connection", hanging_lookup)
    start = time.perf_counter()
    try:
        assert external._answers("huggingface.co", 443, 0.2) is False
        assert time.perf_counter() - start < 5
    finally:
        release.set()
    monkeypatch.setattr(external.socket, "create_connection", lambda *a, **k: type("C", (), {"close": lambda self: None})())
    assert external._answers("huggingface.co", 443, 0.2) is True


def test_the_hub_probe_is_skipped_behind_a_proxy_and_offline_mode_is_restored(monkeypatch):
    from huggingface_hub import constants

    from contlearn.models import external

    def no_network(*args, **kwargs):
        raise OSError("unreachable")

    monkeypatch.setattr(external.socket, "create_connection", no_network)
    for key in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with external._hub_or_cache() as reachable:
        assert not reachable and constants.HF_HUB_OFFLINE
    assert constants.HF_HUB_OFFLINE is False
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")  # a direct probe would say nothing
    with external._hub_or_cache() as reachable:
        assert reachable and not constants.HF_HUB_OFFLINE


def test_cached_torchvision_weights_load_offline_into_the_architecture_they_were_trained_with(tmp_path, monkeypatch):  # E21, E22
    """torchvision's builders let weights set the architecture: googlenet's pretrained
    model normalises its input (transform_input), SWAG ViTs take 384-pixel images.
    Loading the weights into a model built without them gave other features, or a
    bare state-dict error. A stand-in checkpoint in the cache keeps this offline."""
    import torchvision
    from torchvision.models import GoogLeNet_Weights, ResNet18_Weights, ViT_B_16_Weights

    from contlearn.models import external

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))
    monkeypatch.setattr(external, "_url_answers", lambda *a, **k: False)  # offline: the cache alone
    (tmp_path / "checkpoints").mkdir()
    resnet18 = torchvision.models.resnet18().state_dict()
    for weights, state in ((ResNet18_Weights.DEFAULT, resnet18),
                           (GoogLeNet_Weights.DEFAULT, torchvision.models.googlenet(aux_logits=True, init_weights=False).state_dict()),
                           (ViT_B_16_Weights.IMAGENET1K_SWAG_E2E_V1, torchvision.models.vit_b_16(image_size=384).state_dict())):  # fmt: skip
        torch.save(state, tmp_path / "checkpoints" / os.path.basename(weights.url))
    net = create_backbone("tv:resnet18", (3, 32, 32), model_cfg(pretrained=True))
    assert torch.equal(net.net.conv1.weight, resnet18["conv1.weight"])  # loaded, not initialised
    ours = create_backbone("tv:googlenet", (3, 64, 64), model_cfg(pretrained=True)).eval()
    reference = torchvision.models.googlenet(weights=GoogLeNet_Weights.DEFAULT).eval()
    reference.fc = nn.Identity()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert ours.net.transform_input and torch.equal(ours(x), reference(x))
    vit = create_backbone("tv:vit_b_16", (3, 384, 384), model_cfg(pretrained=True, weights="IMAGENET1K_SWAG_E2E_V1"))
    assert vit.net.image_size == 384


# ------------------------------------------------------------- found by a mutation review
def test_create_model_passes_cosine_scale():  # I6, H18
    model = create_model(model_cfg(backbone="mlp", hidden=[8], head="cosine", cosine_scale=3.0), (4,))
    assert float(model.head.scale.detach()) == 3.0


def test_adapt_falls_back_to_grow_for_heads_without_adapt():  # I4
    class GrowOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.n = 0

        def grow(self, n):
            self.n = max(self.n, n)

        def forward(self, f, task=None):
            return f[:, : self.n]

    model = ContinualModel(nn.Identity(), GrowOnly())
    model.adapt([0, 4])
    assert model.head.n == 5


# ------------------------------------------------------------ backbones
def test_mlp_and_cnn_shapes_and_errors():  # B1, B2, B4, B7, B9
    with pytest.raises(ConfigError, match="at least one layer"):
        create_backbone("mlp", (4,), model_cfg(hidden=[]))
    net = create_backbone("mlp", (4,), model_cfg(hidden=[16, 8]))
    assert net.out_features == 8 and net(torch.randn(2, 4)).shape == (2, 8)
    with pytest.raises(ConfigError, match=r"image inputs \[C, H, W\]"):
        create_backbone("cnn", (64,), model_cfg())
    assert create_backbone("cnn", (1, 8, 8), model_cfg(hidden=[])).out_features == 64  # (32, 64) when hidden is empty
    net = create_backbone("cnn", (1, 5, 5), model_cfg(hidden=[4, 4, 4]))  # odd sizes: ceil-mode pooling, 5 -> 3 -> 2 -> 1
    assert net(torch.randn(2, 1, 5, 5)).shape == (2, 4)


def test_cnn_bn_has_batch_norm_and_bias_free_convs():  # B5, B6, B10
    net = create_backbone("cnn-bn", (1, 8, 8), model_cfg(hidden=[4, 4]))
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == 2
    assert all(m.bias is None for m in net.modules() if isinstance(m, nn.Conv2d))
    assert all(m.bias is not None for m in create_backbone("cnn", (1, 8, 8), model_cfg(hidden=[4])).modules()
               if isinstance(m, nn.Conv2d))


# ------------------------------------------------------------ resnets
def _shapes(net, x):
    out = {}
    for name in ["conv1", "maxpool", *net.stages]:
        getattr(net, name).register_forward_hook(lambda m, i, o, name=name: out.__setitem__(name, tuple(o.shape[2:])))
    net(x)
    return out


def test_resnet_resolutions():  # R9 (stride), R10, R11, R12
    s = _shapes(create_backbone("resnet32", (3, 32, 32), model_cfg()), torch.randn(1, 3, 32, 32))
    assert s == {"conv1": (32, 32), "maxpool": (32, 32), "layer1": (32, 32), "layer2": (16, 16), "layer3": (8, 8)}
    s = _shapes(create_backbone("resnet18-imagenet", (3, 64, 64), model_cfg()), torch.randn(1, 3, 64, 64))
    assert s["conv1"] == (32, 32) and s["maxpool"] == (16, 16) and s["layer4"] == (2, 2)


def test_resnet_blocks_pooling_and_init():  # R3, R7, R8, R13
    torch.manual_seed(0)
    net = create_backbone("resnet20", (3, 16, 16), model_cfg()).eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and torch.equal(m.bias, torch.zeros_like(m.bias))
    w = net.layer3[0].conv1.weight  # 64 x 32 x 3 x 3: fan_out = 64 * 9
    assert float(w.detach().std()) == pytest.approx(math.sqrt(2 / (64 * 9)), rel=0.1)
    x = torch.randn(2, 3, 16, 16)
    maps = net.layer3(net.layer2(net.layer1(net.stem(x))))
    assert (maps >= 0).all()  # ReLU after the residual sum
    torch.testing.assert_close(net(x), maps.mean((2, 3)))  # global *average* pooling


def test_cifar_resnet_depth_is_checked():  # R15
    with pytest.raises(ValueError, match="6n\\+2"):
        resnet.cifar_resnet(33)


# ------------------------------------------------------------ heads
def test_masked_logit_is_finite_in_fp16():  # H1, H2
    assert math.isfinite(MASKED_LOGIT) and math.isfinite(float(torch.tensor(MASKED_LOGIT, dtype=torch.float16)))


def test_growth_keeps_old_biases_and_initialises_new_ones_like_linear():  # H4, H5, H6
    torch.manual_seed(0)
    head = IncrementalLinear(4)
    head.adapt([0, 1])
    old = head.bias.detach().clone()
    head.adapt(list(range(400)))
    assert torch.equal(head.bias[:2], old)
    assert 0.3 < float(head.bias.detach().abs().max()) <= 0.5  # U(-1/sqrt(4), 1/sqrt(4))


def test_adapt_with_nothing_new_keeps_the_parameters():  # H7, H10
    head = IncrementalLinear(3)
    assert head.grow(2) is True
    w = head.weight
    assert head.grow(2) is False and head.grow(1) is False
    head.adapt([0, 1])
    assert head.weight is w


def test_cosine_head_defaults():  # H17, H12
    head = CosineLinear(4)
    assert float(head.scale.detach()) == 16.0 and head.bias is None and "bias" not in dict(head.named_parameters())


def test_multi_head_column_cache_follows_growth_and_keep_tasks():  # H23, H27, H21, H22, H26
    torch.manual_seed(0)
    head = MultiHead(3).eval()
    head.adapt([0, 1], 0)
    f = torch.randn(2, 3)
    head(f, torch.tensor([0, 0]))  # fills the column cache
    head.adapt([2], 0)
    assert head(f, torch.tensor([0, 0])).shape == (2, 3)
    head.adapt([0, 1, 2], 0)  # nothing new: no duplicates
    assert head.task_classes == {0: [0, 1, 2]} and head.heads["0"].out_features == 3
    head.adapt([], 1)  # no classes: no head
    assert head.tasks == [0]
    head.adapt([3, 4], 1)
    head(f, torch.tensor([1, 1]))
    head.keep_tasks([0])
    assert head.tasks == [0] and list(head.heads) == ["0"] and head.out_features == 3
    head.adapt([5], 1)  # task 1 again, other classes
    out = head(f, torch.tensor([1, 1]))
    assert out.shape == (2, 6) and (out[:, :5] == MASKED_LOGIT).all() and (out[:, 5] != MASKED_LOGIT).all()


def test_multi_head_shared_classes_keep_each_sample_s_own_logits():  # H33
    torch.manual_seed(0)
    head = MultiHead(2).eval()
    head.adapt([0, 1], 0)
    head.adapt([0, 1], 1)
    f = torch.randn(2, 2)
    out = head(f, torch.tensor([0, 1]))
    assert torch.equal(out[0], head.heads["0"](f)[0]) and torch.equal(out[1], head.heads["1"](f)[1])


def test_multi_head_without_task_labels():  # H29, H30, H31
    head = MultiHead(2)
    head.adapt([0, 1], 3)
    out = head(torch.randn(2, 2))  # one task: its labels are implied
    assert (out != MASKED_LOGIT).all()
    head.adapt([2], 4)
    with pytest.raises(ConfigError, match="needs task labels"):
        head(torch.randn(2, 2))


# ------------------------------------------------------------ external
def test_the_build_time_shape_check_leaves_mode_and_statistics_alone():  # E7, E8, E34
    net = create_backbone("tv:resnet18", (3, 32, 32), model_cfg())
    assert net.training and all(p.grad is None for p in net.parameters())
    bn = net.net.bn1
    assert int(bn.num_batches_tracked) == 0 and torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))


def test_a_clip_tower_gives_its_embedding_and_the_build_restores_logging():  # E29, E30
    before = logging.root.manager.disable
    net = create_backbone("clip:ViT-S-32", (3, 224, 224), model_cfg())
    assert logging.root.manager.disable == before
    assert net.out_features == net.net.output_dim == net(torch.zeros(1, 3, 224, 224)).shape[1]


def test_googlenet_builds_without_warnings():  # E20
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        create_backbone("tv:googlenet", (3, 32, 32), model_cfg())


def test_a_timm_build_failure_without_weights_is_a_config_error(monkeypatch):  # E17
    import timm

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(timm, "create_model", boom)
    with pytest.raises(ConfigError, match="cannot build timm model 'resnet18': boom"):
        create_backbone("timm:resnet18", (3, 32, 32), model_cfg())


def test_more_config_errors():  # E11, E33, H37
    from contlearn.models import create_head

    with pytest.raises(ConfigError, match=r"needs image inputs \[C, H, W\]"):
        create_backbone("timm:resnet18", (64,), model_cfg())
    with pytest.raises(ConfigError, match="'bogus' is not a pretrained tag of clip:ViT-B-32; valid: .*openai"):
        create_backbone("clip:ViT-B-32", (3, 224, 224), model_cfg(pretrained=True, weights="bogus"))
    with pytest.raises(ConfigError, match="unknown model.head 'mystery'"):
        create_head("mystery", 4)
