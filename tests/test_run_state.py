"""A run's state in a checkpoint: the config check a resume makes.

What capture and restore keep is tested end to end in test_resume.py (a resumed
run equals the uninterrupted one) and test_checkpoint.py (malformed states).
"""

from __future__ import annotations

import pytest

from contlearn import ConfigError
from contlearn._run_state import check_config, config_differences


def test_config_differences_name_keys_and_ignore_device_and_out():
    a = {"seed": 0, "device": "cuda", "out": "x", "model": {"hidden": [8]}, "plugins": {"finetune": {}, "ewc": {"lam": 1.0}}}
    b = {"seed": 0, "device": "cpu", "out": None, "model": {"hidden": [16]}, "plugins": {"finetune": {}}}
    assert config_differences(a, b) == [
        "model.hidden: [8] in the checkpoint, [16] now",
        "plugins.ewc.lam: 1.0 in the checkpoint, '(absent)' now",
    ]
    c = {**a, "plugins": {"ewc": {"lam": 1.0}, "finetune": {}}}
    assert config_differences(a, c) == ["plugin order: ['finetune', 'ewc'] in the checkpoint, ['ewc', 'finetune'] now"]
    with pytest.raises(ConfigError, match="'ckpt-x' was written by a different experiment: model.hidden"):
        check_config(a, b, "ckpt-x")


def test_an_option_added_since_the_checkpoint_is_no_difference_at_its_default():
    saved = {"seed": 0, "train": {"lr": 0.1}, "plugins": {"ewc": {"lam": 1.0}}}
    current = {"seed": 0, "train": {"lr": 0.1, "new": "none"}, "plugins": {"ewc": {"lam": 1.0, "added": 2}}}
    defaults = {"seed": 0, "train": {"lr": 0.1, "new": "none"}, "plugins": {"ewc": {"lam": 30.0, "added": 2}}}
    assert config_differences(saved, current, defaults) == []
    current["train"]["new"] = "cosine"  # set away from its default: the old run did not do that
    assert config_differences(saved, current, defaults) == ["train.new: '(absent)' in the checkpoint, 'cosine' now"]
    current["train"]["new"] = "none"
    current["plugins"]["lwf"] = {"alpha": 1.0}  # a plugin the run did not have, even at its defaults
    defaults["plugins"]["lwf"] = {"alpha": 1.0}
    assert config_differences(saved, current, defaults) == ["plugins.lwf.alpha: '(absent)' in the checkpoint, 1.0 now"]
