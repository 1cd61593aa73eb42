"""The hook contract: every hook is called at its phase, results combine as
documented, and plugins that break the contract are refused."""

from __future__ import annotations

import inspect

import pluggy
import pytest
import torch
from _spies import EpochLog
from contlearn.scenarios import Batch

from contlearn import Experiment, PluginError, TrainingError, hookimpl, hookspecs, load_config
from contlearn._loop import StepHooks

ALL_HOOKS = sorted(
    name for name, fn in vars(hookspecs).items() if inspect.isfunction(fn) and hasattr(fn, "contlearn_spec")
)


class Recorder:
    """Implements every hook, records each call, and lets the defaults answer."""

    def __init__(self):
        self.calls: list[str] = []

    def _rec(self, name):
        self.calls.append(name)

    @hookimpl
    def setup(self, run):
        self._rec("setup")

    @hookimpl
    def teardown(self, run):
        self._rec("teardown")

    @hookimpl
    def train_data(self, run, exp):
        self._rec("train_data")

    @hookimpl
    def before_experience(self, run, exp):
        self._rec("before_experience")

    @hookimpl
    def configure_optimizer(self, run, exp):
        self._rec("configure_optimizer")

    @hookimpl
    def after_experience(self, run, exp):
        self._rec("after_experience")

    @hookimpl
    def extra_samples(self, run, batch):
        self._rec("extra_samples")

    @hookimpl
    def forward(self, run, batch):
        self._rec("forward")

    @hookimpl
    def compute_loss(self, run, batch, out):
        self._rec("compute_loss")

    @hookimpl
    def loss_terms(self, run, batch, out):
        self._rec("loss_terms")

    @hookimpl
    def after_backward(self, run):
        self._rec("after_backward")

    @hookimpl
    def after_step(self, run):
        self._rec("after_step")

    @hookimpl
    def predict(self, run, batch):
        self._rec("predict")

    @hookimpl
    def after_eval_batch(self, run, batch, predictions):
        self._rec("after_eval_batch")

    @hookimpl
    def unlearn(self, run, request):
        self._rec("unlearn")
        return {"forgot": request}

    @hookimpl
    def on_metrics(self, run, metrics):
        self._rec(f"on_metrics:{metrics['kind']}")


def _run(quick, *overrides, plugins=None):
    exp = Experiment(load_config(None, [*quick, "scenario.n_experiences=2", "scenario.class_order=[0,1,2,3,4,5,6,7,8,9]", *overrides]), plugins=plugins)
    return exp, exp.run()


def test_recorder_covers_every_hookspec():
    implemented = {name for name, fn in vars(Recorder).items() if hasattr(fn, "contlearn_impl")}
    assert implemented == set(ALL_HOOKS)


def test_hooks_are_called_in_lifecycle_order(quick):
    rec = Recorder()
    exp, _ = _run(quick, plugins={"rec": rec})
    exp.unlearn(classes=[1])
    calls = rec.calls
    assert calls[0] == "setup" and calls[-2:] == ["teardown", "unlearn"]
    step = ["extra_samples", "forward", "compute_loss", "loss_terms", "after_backward", "after_step"]
    first_step = calls.index("extra_samples")
    assert calls[first_step : first_step + len(step)] == step
    per_exp = ["train_data", "before_experience", "configure_optimizer"]
    assert calls[1:4] == per_exp
    # per experience: epoch metrics before after_experience, evaluation after it
    for name in (*per_exp, "after_experience", "on_metrics:eval", "on_metrics:epoch"):
        assert calls.count(name) == 2, name
    i_after = calls.index("after_experience")
    assert calls.index("on_metrics:epoch") < i_after < calls.index("predict") < calls.index("on_metrics:eval")
    assert calls.index("after_eval_batch") == calls.index("predict") + 1
    # one training step per batch: 2 experiences of 5 classes, ~720 training samples each, batch 32
    assert calls.count("forward") == calls.count("after_step") > 40


def test_firstresult_strategy_wins_over_default(quick):
    class ConstantPredictor:
        @hookimpl
        def predict(self, run, batch):
            return torch.full_like(batch.y, 3)

    _, results = _run(quick, plugins={"const": ConstantPredictor()})
    # only class 3 is ever predicted: accuracy on experience 0 (classes 0-4) is 1/5 of it, on exp 1 zero
    assert results.accuracy_matrix[-1][1] == 0.0
    assert 0.1 < results.accuracy_matrix[-1][0] < 0.3


def test_predictions_that_are_no_class_count_as_wrong_in_every_metric(quick):
    class OutOfRange:  # -1 ("none of these") and one past the last class: both wrong
        @hookimpl
        def predict(self, run, batch):
            return torch.where(batch.y % 2 == 0, -1, run.stream.n_classes)

    _, results = _run(quick, plugins={"none": OutOfRange()})
    assert results.accuracy_matrix[-1] == [0.0, 0.0]
    assert results.per_class_accuracy == [0.0] * 10  # not clamped onto classes 0 and 9


def test_compute_loss_override_is_used(quick):
    class NoLoss:
        @hookimpl
        def compute_loss(self, out):
            return out.logits.sum() * 0.0

    _, results = _run(quick, plugins={"noloss": NoLoss()})
    # the model never learns: accuracy stays near chance on the first experience
    assert results.accuracy_matrix[0][0] < 0.5


def test_loss_terms_are_summed_and_logged_by_name(quick):
    seen = []

    class Terms:
        def __init__(self, name, value):
            self.name, self.value = name, value

        @hookimpl
        def loss_terms(self, out):
            return {self.name: out.logits.sum() * 0 + self.value}

    class Log:
        @hookimpl
        def on_metrics(self, metrics):
            if metrics["kind"] == "epoch":
                seen.append(metrics)

    _run(quick, plugins={"a": Terms("alpha", 1.5), "b": Terms("beta", 2.0), "log": Log()})
    assert seen and all(m["loss/alpha"] == pytest.approx(1.5) and m["loss/beta"] == pytest.approx(2.0) for m in seen)
    assert all(m["loss"] > 0 for m in seen)


def test_loss_terms_change_training(quick):
    class Decay:
        @hookimpl
        def loss_terms(self, run):
            return {"huge": sum((p**2).sum() for p in run.model.parameters()) * 10.0}

    _, plain = _run(quick)
    _, decayed = _run(quick, plugins={"decay": Decay()})
    assert decayed.accuracy_matrix != plain.accuracy_matrix


def test_duplicate_loss_term_names_are_an_error(quick):
    class Same:
        @hookimpl
        def loss_terms(self, out):
            return {"same": out.logits.sum() * 0}

    class Other:
        @hookimpl
        def loss_terms(self, out):
            return None

    with pytest.raises(TrainingError, match=r"named 'same' \(plugins with loss_terms: (?=.*\ba\b)(?=.*\bb\b)(?=.*other)"):
        _run(quick, plugins={"a": Same(), "other": Other(), "b": Same()})


def test_extra_samples_are_concatenated(quick):
    sizes = []

    class Extra:
        @hookimpl
        def extra_samples(self, batch):
            return Batch(batch.x[:3], batch.y[:3], batch.t[:3])

        @hookimpl
        def compute_loss(self, batch, out):
            sizes.append((len(batch), out.logits.shape[0]))
            return None  # let the default compute it

    class Second:
        @hookimpl(trylast=True)
        def compute_loss(self):
            return None

    _run(quick, plugins={"extra": Extra()})
    assert sizes and all(n == m for n, m in sizes)
    assert sizes[0][0] == 32 + 3


def test_two_firstresult_implementations_need_an_order():
    class P1:
        @hookimpl
        def predict(self, batch):
            return batch.y

    class P2:
        @hookimpl
        def predict(self, batch):
            return batch.y

    class P3:
        @hookimpl(tryfirst=True)
        def predict(self, batch):
            return batch.y

    with pytest.raises(PluginError, match="'p1' and 'p2'.*predict"):
        Experiment(load_config(None, ["train.epochs=1"]), plugins={"p1": P1(), "p2": P2()}).build()
    Experiment(load_config(None, ["train.epochs=1"]), plugins={"p1": P1(), "p3": P3()}).build()

    class P4:  # marked like P3: the two say nothing about which of them goes first
        @hookimpl(tryfirst=True)
        def predict(self, batch):
            return batch.y

    with pytest.raises(PluginError, match="'p3' and 'p4' both implement the firstresult hook 'predict', both marked tryfirst"):
        Experiment(load_config(None, ["train.epochs=1"]), plugins={"p1": P1(), "p3": P3(), "p4": P4()}).build()


def test_two_builtins_that_decide_one_thing_are_told_apart_from_a_plugin_author_s_conflict():
    with pytest.raises(PluginError, match=r"^plugins '(prd|memo)' and '(prd|memo)' cannot be combined: both decide the "
                                          r"run's 'predict' \(a firstresult hook\); drop one of them$"):
        Experiment(load_config("split-digits", ["plugins={}", "plugins.prd={}", "plugins.memo={}"])).run()



def test_a_loss_term_returned_at_some_steps_only_counts_as_zero_at_the_others(quick):
    class EveryOtherStep:
        @hookimpl
        def loss_terms(self, run, out):
            return {"sometimes": out.logits.sum() * 0 + 1.0} if run.step % 2 == 1 else None

    metrics = EpochLog()
    _run(quick, "train.epochs=1", plugins={"sometimes": EveryOtherStep(), "metrics": metrics})
    for epoch in metrics.epochs:  # 1 at odd steps, 0 at even ones: the mean is about 1/2
        assert 0.4 < epoch["loss/sometimes"] < 0.6


def test_implementation_of_unknown_hook_is_refused():
    class Typo:
        @hookimpl
        def after_experiance(self, run):
            pass

    with pytest.raises(PluginError, match="typo"):
        Experiment(load_config(None, ["train.epochs=1"]), plugins={"typo": Typo()}).build()


def test_implementation_with_unknown_argument_is_refused():
    class BadArgs:
        @hookimpl
        def after_step(self, run, gradients):
            pass

    with pytest.raises(PluginError, match="badargs"):
        Experiment(load_config(None, ["train.epochs=1"]), plugins={"badargs": BadArgs()}).build()


def test_a_method_named_like_a_hook_without_hookimpl_is_refused():
    class Forgot:
        @hookimpl
        def setup(self, run):
            pass

        def after_step(self, run):
            pass

    with pytest.raises(PluginError, match=r"plugin 'forgot' has methods named like hooks but not marked @hookimpl: \['after_step'\]"):
        Experiment(load_config(None, ["train.epochs=1"]), plugins={"forgot": Forgot()}).build()

    class Prompt(torch.nn.Module):  # a module's own forward is not a forgotten hook
        def forward(self, x):
            return x

        @hookimpl
        def setup(self, run):
            pass

    Experiment(load_config(None, ["train.epochs=1"]), plugins={"prompt": Prompt()}).build()


def test_a_plugin_class_where_an_object_is_needed_is_refused():
    from contlearn import _manager
    from contlearn.defaults import Defaults

    class Counter:
        @hookimpl
        def after_step(self, run):
            pass

    with pytest.raises(PluginError, match=r"plugin 'counter' is the class Counter, not a plugin object: pass an instance"):
        _manager.register_plugins(_manager.make_plugin_manager(), {"counter": Counter}, Defaults())
    for value in (5, {"lr": 0.1}, None):  # a value where a plugin belongs (a config section, a typo)
        with pytest.raises(PluginError, match=f"plugin 'counter' is {type(value).__name__} .*, not a plugin"):
            _manager.register_plugins(_manager.make_plugin_manager(), {"counter": value}, Defaults())


def test_unimplemented_step_hooks_are_not_dispatched():
    exp = Experiment(load_config(None, ["train.epochs=1"]))
    run = exp.build()
    hooks = StepHooks(run.pm, exp.defaults)
    assert hooks.extra_samples is None and hooks.loss_terms is None and hooks.after_step is None
    # only the defaults answer: bound methods, no pluggy dispatch
    assert hooks.forward == exp.defaults.forward
    assert not isinstance(hooks.compute_loss, pluggy.HookCaller)


def test_unlearn_without_an_implementation_is_a_clear_error(quick):
    from contlearn import ContlearnError

    exp, _ = _run(quick)
    with pytest.raises(ContlearnError, match="no active plugin implements unlearning"):
        exp.unlearn(classes=[0])


def test_teardown_runs_when_training_fails(quick):
    rec = Recorder()

    class Boom:
        @hookimpl
        def after_step(self, run):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        _run(quick, plugins={"rec": rec, "boom": Boom()})
    assert rec.calls[-1] == "teardown"


def test_a_plugin_that_saves_its_state_but_cannot_take_it_back_is_refused_before_training():
    """Found out otherwise at the first resume, when the run's checkpoints hold a
    state nothing can load."""

    class HalfState:
        @hookimpl
        def after_step(self, run):
            pass

        def state_dict(self):
            return {"count": 1}

    with pytest.raises(PluginError, match=r"plugin 'half' saves its state \(state_dict\) but has no load_state_dict"):
        Experiment(load_config(None, ["train.epochs=1", "scenario.n_experiences=2"]), plugins={"half": HalfState()}).run()


def test_a_method_marked_for_no_hook_or_with_arguments_the_hook_lacks_is_refused_by_name():
    class Misnamed:
        @hookimpl
        def after_experiance(self, run):
            pass

    class ExtraArgument:
        @hookimpl
        def after_step(self, run, optimizer):
            pass

    cfg = load_config(None, ["train.epochs=1", "scenario.n_experiences=2"])
    with pytest.raises(PluginError, match=r"^plugin 'typo' implements 'after_experiance', which is no hook: did you "
                                          r"mean 'after_experience'\?$"):
        Experiment(cfg, plugins={"typo": Misnamed()}).run()
    with pytest.raises(PluginError, match=r"^plugin 'extra' does not fit the hook contract: .*optimizer"):
        Experiment(cfg, plugins={"extra": ExtraArgument()}).run()


def test_unknown_plugin_says_when_installed_plugins_are_not_loaded(monkeypatch):
    from contlearn._registry import DISABLE_AUTOLOAD_ENV

    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "1")
    with pytest.raises(PluginError, match=rf"unknown plugin 'mine'; .* \(installed plugins are not loaded: "
                                          rf"{DISABLE_AUTOLOAD_ENV} is set\)$"):
        load_config(None, ["plugins.mine={}"])


def test_one_plugin_object_under_two_names_or_the_defaults_name_is_one_clear_error(quick):
    class Watch:
        @hookimpl
        def after_step(self, run):
            pass

    watch = Watch()
    with pytest.raises(PluginError, match=r"^plugin 'b' is the same object as plugin 'a': .*give each name its own object$"):
        _run(quick, plugins={"a": watch, "b": watch})
    with pytest.raises(PluginError, match=r"^'defaults' names contlearn's built-in behaviour: give plugin Watch another name$"):
        _run(quick, plugins={"defaults": Watch()})


def test_evaluation_and_the_fwt_baseline_run_the_model_in_eval_mode(quick):
    class Modes:
        """Records the mode the model predicts in: in evaluate (after_eval_batch)
        and in the FWT baseline, which predicts with a copy of the model."""

        def __init__(self):
            self.eval_batches: list[bool] = []
            self.copies: list[bool] = []

        @hookimpl
        def setup(self, run):
            model, copies = run.model, self.copies

            def forward_hook(module, args, output):  # a function: the copy's hook appends here too
                if module is not model:
                    copies.append(module.training)

            model.register_forward_hook(forward_hook)

        @hookimpl
        def after_eval_batch(self, run):
            self.eval_batches.append(run.model.training)

    modes = Modes()
    _run(quick, "eval.fwt=true", plugins={"modes": modes})
    assert modes.eval_batches and not any(modes.eval_batches)  # BatchNorm and dropout as at inference
    assert modes.copies and not any(modes.copies)


def test_accuracy_is_each_experience_s_hits_over_its_own_test_size(quick):
    class ConstantPredictor:
        def __init__(self):
            self.stream = None

        @hookimpl
        def predict(self, run, batch):
            self.stream = run.stream
            return torch.full_like(batch.y, 1)

    const = ConstantPredictor()
    _, results = _run(quick, "scenario.classes_per_experience=[3,7]", plugins={"const": const})
    tests = [exp.test for exp in const.stream]
    assert len(tests[0]) != len(tests[1])  # a mean size would be wrong for both
    shares = [int((data.y == 1).sum()) / len(data) for data in tests]
    assert shares[0] > 0 and shares[1] == 0
    assert results.accuracy_matrix[0] == pytest.approx(shares, rel=1e-12)


def test_the_logged_loss_is_the_base_loss_without_the_plugins_terms(quick):
    class Constant:  # a term with no gradient: training is the plain run's, step for step
        @hookimpl
        def loss_terms(self, out):
            return {"constant": out.logits.sum() * 0 + 100.0}

    plain, added = EpochLog(), EpochLog()
    _run(quick, plugins={"log": plain})
    _run(quick, plugins={"constant": Constant(), "log": added})
    assert [m["loss/constant"] for m in added.epochs] == pytest.approx([100.0, 100.0])
    assert [m["loss"] for m in added.epochs] == pytest.approx([m["loss"] for m in plain.epochs], rel=1e-6)
