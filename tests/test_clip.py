"""CLIP loading, the text classifier, the CLIP-wrapping model and views
(contlearn.plugins._clip), on the tiny open_clip CLIP built without weights."""

from __future__ import annotations

import pytest
import torch
from contlearn.plugins._clip import (
    CLIP_TEMPLATES,
    DIGIT_NAMES,
    DIGIT_TEMPLATES,
    ClipClassifier,
    class_names_for,
    load_clip,
    random_views,
    register_tiny_configs,
    train_contrastive,
)
from torch.nn import functional as F

from contlearn.errors import ConfigError, DataError
from contlearn.models import ContinualModel

open_clip = pytest.importorskip("open_clip")
TINY = "contlearn-tiny-clip"


@pytest.fixture(scope="module")
def model() -> ClipClassifier:
    torch.manual_seed(0)
    return ClipClassifier.build(TINY, DIGIT_NAMES, DIGIT_TEMPLATES).eval()


def test_tiny_clip_is_an_open_clip_model_built_by_name():
    register_tiny_configs()
    register_tiny_configs()  # idempotent
    assert TINY in open_clip.list_models()
    clip, pre = load_clip(TINY)
    assert isinstance(clip, open_clip.CLIP)
    assert pre.image_size == 32
    assert clip.encode_image(torch.rand(2, 3, 32, 32)).shape == (2, 64)


def test_unknown_architecture_and_tag_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown CLIP architecture 'ViT-Nope'"):
        load_clip("ViT-Nope")
    with pytest.raises(ConfigError, match="tags: openai"):
        load_clip("RN50", "no-such-tag", cache_dir=str(tmp_path))


def test_missing_weights_name_the_weights_and_where_they_were_looked_for(tmp_path):
    with pytest.raises(DataError) as info:
        load_clip("RN50", "openai", cache_dir=str(tmp_path))
    message = str(info.value)
    assert "'RN50' pretrained='openai'" in message and "not in the local cache" in message
    assert str(tmp_path) in message and "RN50.pt" in message


def test_checkpoint_file_loads_through_open_clip(tmp_path):
    clip, _ = load_clip(TINY)
    path = tmp_path / "tiny.pt"
    torch.save(clip.state_dict(), path)
    loaded, pre = load_clip(TINY, str(path))
    assert pre.image_size == 32
    for key, value in clip.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key


def test_text_classifier_is_renormalised_mean_of_normalised_prompt_embeddings(model):
    model.adapt([0, 1, 2])
    clip = model.head.text_model
    tok = open_clip.get_tokenizer(TINY)
    with torch.no_grad():
        expected = []
        for name in DIGIT_NAMES[:3]:
            emb = F.normalize(clip.encode_text(tok([t.format(name) for t in DIGIT_TEMPLATES])), dim=-1)
            expected.append(F.normalize(emb.mean(0), dim=0))
        W = model.head.classifier()
    assert torch.allclose(W, torch.stack(expected), atol=1e-6)
    assert torch.allclose(W.norm(dim=1), torch.ones(3), atol=1e-6)


def test_model_is_a_continual_model_whose_head_grows(model):
    model.adapt([0, 1])
    assert isinstance(model, ContinualModel)
    assert model.head.out_features >= 2
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        before = model.head.classifier()[:2].clone()
        model.adapt([4, 5])
        out = model(x)
    assert model.head.out_features == 6
    assert out.logits.shape == (5, 6) and out.features.shape == (5, 64)
    assert torch.allclose(out.features.norm(dim=1), torch.ones(5), atol=1e-5)
    assert torch.allclose(model.head.classifier()[:2], before)
    assert torch.allclose(out.logits, model.head.scale() * out.features @ model.head.classifier().t(), atol=1e-4)


def test_fixed_logit_scale_and_clip_default_scale():
    fixed = ClipClassifier.build(TINY, DIGIT_NAMES, logit_scale=100.0)
    assert fixed.head.scale() == 100.0
    own = ClipClassifier.build(TINY, DIGIT_NAMES)
    assert float(own.head.scale().detach()) == pytest.approx(1 / 0.07, rel=1e-4)  # CLIP's initial temperature
    assert fixed.head.templates == CLIP_TEMPLATES


def test_training_mode_reaches_the_text_tower_and_eval_mode_caches():
    model = ClipClassifier.build(TINY, DIGIT_NAMES, DIGIT_TEMPLATES).set_trainable(True)
    model.adapt([0, 1, 2])
    model.train()
    loss = F.cross_entropy(model(torch.rand(4, 1, 8, 8)).logits, torch.tensor([0, 1, 2, 0]))
    loss.backward()
    proj = model.head.text_model.text_projection
    assert proj.grad is not None and proj.grad.abs().sum() > 0
    assert not model.head.text_model.token_embedding.weight.requires_grad
    model.eval()
    with torch.no_grad():
        assert model.head.classifier() is model.head.classifier()


def test_random_views_keep_the_image_first_and_are_reproducible():
    x = torch.rand(3, 3, 32, 32)
    v1 = random_views(x, 6, torch.Generator().manual_seed(1))
    v2 = random_views(x, 6, torch.Generator().manual_seed(1))
    assert v1.shape == (3, 6, 3, 32, 32)
    assert torch.equal(v1[:, 0], x) and torch.equal(v1, v2)
    assert not torch.allclose(v1[:, 1], x)
    full = random_views(x, 2, torch.Generator(), scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False)
    assert torch.allclose(full[:, 1], x, atol=1e-5)
    flipped = random_views(x, 2, torch.Generator().manual_seed(0), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert any(torch.allclose(flipped[i, 1], x[i].flip(-1), atol=1e-5) for i in range(3)) or torch.allclose(
        flipped[:, 1], x, atol=1e-5
    )


def test_class_names_by_label():
    assert class_names_for("digits", ["3", "0"], None) == ["three", "zero"]
    assert class_names_for("digits", ["1"], ["a", "b"]) == ["b"]
    assert class_names_for("mine", ["cat", "dog"], None) == ["cat", "dog"]
    with pytest.raises(ConfigError, match="looked up by label"):
        class_names_for("mine", ["cat"], ["a"])


def test_contrastive_training_lowers_the_loss():
    torch.manual_seed(0)
    model = ClipClassifier.build(TINY, DIGIT_NAMES, DIGIT_TEMPLATES)
    y = torch.arange(4).repeat(12)
    x = torch.zeros(len(y), 1, 8, 8)
    for k in range(4):  # four easy "classes": a bright quadrant each
        x[y == k, :, (k // 2) * 4 : (k // 2) * 4 + 4, (k % 2) * 4 : (k % 2) * 4 + 4] = 1.0
    losses = train_contrastive(model, x, y, epochs=6, lr=3e-3, batch_size=16, generator=torch.Generator().manual_seed(0))
    assert losses[-1] < losses[0]
    assert not model.training
