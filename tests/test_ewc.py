"""EWC: the penalty, its gradient, the Fisher it uses, growth of the head, modes.

Convention: L_ewc = lam/2 * sum_i F_i (theta_i - theta*_i)^2, so
dL_ewc/dtheta = lam * F * (theta - theta*).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from contlearn.kernels.fisher import empirical_fisher
from contlearn.plugins.ewc import EWC, fisher_information
from contlearn.scenarios import TensorData
from omegaconf import OmegaConf
from torch.nn import functional as F

from contlearn import ConfigError, Experiment, load_config
from contlearn.distributed import DistributedView
from contlearn.errors import PluginError
from contlearn.models import MLP, ContinualModel, IncrementalLinear


def tiny_run(n_classes: int = 2, seed: int = 0) -> SimpleNamespace:
    torch.manual_seed(seed)
    model = ContinualModel(MLP((5,), [6]), IncrementalLinear(6))
    model.head.grow(n_classes)
    cfg = OmegaConf.create({"seed": seed, "train": {"batch_size": 8}})
    return SimpleNamespace(model=model, config=cfg, device=torch.device("cpu"), dist=DistributedView(), plugins={})


def tiny_data(n: int = 24, n_classes: int = 2, seed: int = 1) -> TensorData:
    g = torch.Generator().manual_seed(seed)
    return TensorData(torch.randn(n, 5, generator=g), torch.randint(0, n_classes, (n,), generator=g))


def ewc_after(run, data, **cfg) -> EWC:
    plugin = EWC(EWC.Config(**cfg))
    plugin.setup(run)
    plugin.after_experience(run, SimpleNamespace(train=data))
    return plugin


def penalty(plugin: EWC, run) -> torch.Tensor:
    return plugin.loss_terms(run)["ewc"]


def test_penalty_is_zero_at_the_anchor_with_zero_gradient():
    run = tiny_run()
    plugin = ewc_after(run, tiny_data(), lam=50.0)
    value = penalty(plugin, run)
    value.backward()
    assert value.item() == 0.0
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in run.model.parameters())


def test_gradient_matches_lam_f_delta():
    run = tiny_run()
    lam = 7.0
    plugin = ewc_after(run, tiny_data(), lam=lam)
    fisher = {n: f.clone() for n, f in plugin.importance.items()}
    anchor = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    with torch.no_grad():
        for p in run.model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    value = penalty(plugin, run)
    value.backward()
    expected_value = 0.0
    for name, p in run.model.named_parameters():
        delta = p.detach() - anchor[name]
        torch.testing.assert_close(p.grad, lam * fisher[name] * delta)
        expected_value += 0.5 * lam * float((fisher[name] * delta**2).sum())
    assert value.item() == pytest.approx(expected_value, rel=1e-5)


def test_batch_fisher_is_the_mean_of_squared_batch_gradients():
    """Checked against plain autograd, independently of the kernels."""
    run = tiny_run()
    data = tiny_data(24)
    fisher = fisher_information(run.model, data, batch_size=8)
    params = dict(run.model.named_parameters())
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    for b in data.batches(8):
        loss = F.cross_entropy(run.model(b.x).logits, b.y)
        for (n, _), g in zip(params.items(), torch.autograd.grad(loss, list(params.values())), strict=True):
            expected[n] += g**2 / 3
    for n in params:
        torch.testing.assert_close(fisher[n], expected[n])


def test_per_sample_fisher_option_uses_the_kernel():
    run = tiny_run()
    data = tiny_data(16)
    plugin = ewc_after(run, data, lam=1.0, fisher="per_sample")
    reference = empirical_fisher(
        run.model, [(b.x, b.y) for b in data.batches(8)], lambda m, x, y: F.cross_entropy(m(x).logits, y), mode="per_sample"
    )
    for name, value in reference.items():
        torch.testing.assert_close(plugin.importance[name], value)
    # exact per-sample squared gradients of a Linear weight, by brute force
    w = run.model.backbone.net[1].weight
    brute = torch.zeros_like(w)
    for i in range(len(data)):
        (g,) = torch.autograd.grad(F.cross_entropy(run.model(data.x[i : i + 1]).logits, data.y[i : i + 1]), [w])
        brute += g**2 / len(data)
    torch.testing.assert_close(plugin.importance["backbone.net.1.weight"], brute)


def test_grown_head_only_old_rows_are_penalised():
    run = tiny_run(n_classes=2)
    lam = 3.0
    plugin = ewc_after(run, tiny_data(), lam=lam)
    old_weight = run.model.head.weight.detach().clone()
    run.model.head.grow(5)  # new parameters replace the old ones, with 3 more rows
    with torch.no_grad():
        run.model.head.weight.add_(1.0)
    value = penalty(plugin, run)
    value.backward()
    grad = run.model.head.weight.grad
    assert torch.count_nonzero(grad[2:]) == 0, "rows of new classes must be free"
    f = plugin.importance["head.weight"]
    torch.testing.assert_close(grad[:2], lam * f * (run.model.head.weight.detach()[:2] - old_weight))
    # changing only the new rows leaves the penalty unchanged
    before = penalty(plugin, run).item()
    with torch.no_grad():
        run.model.head.weight[2:] += 5.0
    assert penalty(plugin, run).item() == before


@pytest.mark.parametrize("classes", [(2, 4), (2, 4, 5)])
def test_separate_mode_equals_the_sum_of_per_experience_penalties(classes):
    """With three experiences the merged penalty's constant adds up over both merges."""
    run = tiny_run(n_classes=2)
    lam = 2.0
    plugin = EWC(EWC.Config(lam=lam))
    plugin.setup(run)
    terms = []
    for k, n_classes in enumerate(classes):
        run.model.head.grow(n_classes)
        with torch.no_grad():
            for p in run.model.parameters():
                p.add_(torch.randn_like(p) * 0.2)
        data = tiny_data(24, n_classes, seed=k + 10)
        fisher = fisher_information(run.model, data, 8)
        terms.append(({n: p.detach().clone() for n, p in run.model.named_parameters()}, fisher))
        plugin.after_experience(run, SimpleNamespace(train=data))
    run.model.head.grow(6)
    with torch.no_grad():
        for p in run.model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    value = penalty(plugin, run)
    value.backward()
    expected = 0.0
    params = dict(run.model.named_parameters())
    expected_grad = {n: torch.zeros_like(p) for n, p in params.items()}
    for anchor, fisher in terms:
        for n, a in anchor.items():
            cut = tuple(slice(0, s) for s in a.shape)
            delta = params[n].detach()[cut] - a
            expected += 0.5 * lam * float((fisher[n] * delta**2).sum())
            expected_grad[n][cut] += lam * fisher[n] * delta
    assert value.item() == pytest.approx(expected, rel=1e-4)
    for n, p in params.items():
        torch.testing.assert_close(p.grad, expected_grad[n], rtol=1e-4, atol=1e-7)


def test_fisher_batch_size_is_the_batch_size_of_the_fisher_pass():
    run = tiny_run()
    data = tiny_data(24)
    plugin = ewc_after(run, data, fisher_batch_size=4)  # train.batch_size is 8
    for name, value in fisher_information(run.model, data, 4).items():
        torch.testing.assert_close(plugin.importance[name], value)
    assert any(not torch.allclose(plugin.importance[n], v) for n, v in fisher_information(run.model, data, 8).items())


def differs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return any(not torch.allclose(a[n], b[n]) for n in b)


def test_fisher_samples_is_a_random_subset_drawn_from_the_run_seed():
    run = tiny_run()
    data = tiny_data(24)
    first = ewc_after(run, data, fisher_samples=6).importance
    assert differs(first, fisher_information(run.model, data, 8)), "all 24 samples were used"
    assert differs(first, fisher_information(run.model, data.subset(range(6)), 8)), "the first 6 samples, not a random 6"
    run.config.seed = 1  # the same model, another seed: another subset
    assert differs(ewc_after(run, data, fisher_samples=6).importance, first)
    run.config.seed = 0
    again = ewc_after(run, data, fisher_samples=6).importance
    assert not differs(again, first)


def test_fisher_ignores_the_training_augmentation():
    run = tiny_run()
    plain = tiny_data(24)
    augmented = plain.with_augment(lambda x, generator: x + 100.0)
    shifted = TensorData(plain.x + 100.0, plain.y)
    assert differs(fisher_information(run.model, shifted, 8), fisher_information(run.model, plain, 8))  # it would matter
    plugin = ewc_after(run, augmented)
    for name, value in fisher_information(run.model, plain, 8).items():
        torch.testing.assert_close(plugin.importance[name], value)


def test_fisher_of_a_batchnorm_model_in_training_mode_is_taken_in_eval_mode():
    """BatchNorm normalises with its running statistics, as at test time, and
    the pass neither updates them nor leaves the model in eval mode."""
    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.BatchNorm1d(6), torch.nn.ReLU())
    model = ContinualModel(backbone, IncrementalLinear(6))
    model.head.grow(2)
    with torch.no_grad():
        backbone[1].running_mean.uniform_(-1, 1)
        backbone[1].running_var.uniform_(0.5, 2)
    stats = {n: b.clone() for n, b in model.named_buffers()}
    data = tiny_data(24)
    params = dict(model.named_parameters())
    model.eval()
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    for b in data.batches(8):
        loss = F.cross_entropy(model(b.x).logits, b.y)
        for (n, _), g in zip(params.items(), torch.autograd.grad(loss, list(params.values())), strict=True):
            expected[n] += g**2 / 3
    model.train()
    fisher = fisher_information(model, data, 8)
    for n in params:
        torch.testing.assert_close(fisher[n], expected[n])
    assert model.training and backbone[1].training
    for n, b in model.named_buffers():
        assert torch.equal(b, stats[n]), n


def test_online_mode_decays_the_running_fisher():
    run = tiny_run()
    gamma = 0.5
    plugin = EWC(EWC.Config(lam=1.0, mode="online", gamma=gamma))
    plugin.setup(run)
    fishers = []
    for seed in (1, 2):
        data = tiny_data(seed=seed)
        fishers.append(fisher_information(run.model, data, 8))
        plugin.after_experience(run, SimpleNamespace(train=data))
        with torch.no_grad():
            for p in run.model.parameters():
                p.add_(0.1)
    for name, value in plugin.importance.items():
        torch.testing.assert_close(value, gamma * fishers[0][name] + fishers[1][name])
        # the anchor is the latest parameters
        torch.testing.assert_close(plugin.center[name], dict(run.model.named_parameters())[name].detach() - 0.1)
    assert plugin.offset == 0.0


@pytest.mark.parametrize("experiences", [1, 2])
def test_state_round_trip_gives_the_same_penalty(experiences):
    """Two experiences in separate mode: the merged penalty's constant is saved too."""
    run = tiny_run()
    plugin = ewc_after(run, tiny_data(), lam=4.0)
    if experiences == 2:
        with torch.no_grad():
            for p in run.model.parameters():
                p.add_(torch.randn_like(p) * 0.2)
        plugin.after_experience(run, SimpleNamespace(train=tiny_data(seed=2)))
        assert plugin.offset > 0
    with torch.no_grad():
        for p in run.model.parameters():
            p.add_(0.05)
    state = plugin.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state["importance"].values())
    copy = EWC(EWC.Config(lam=4.0))
    copy.load_state_dict(state)
    copy.setup(run)
    assert penalty(copy, run).item() == pytest.approx(penalty(plugin, run).item())


@pytest.mark.parametrize("field, value", [("mode", "offline"), ("fisher", "exact"), ("gamma", 2.0), ("lam", -1.0),
                                          ("lam", ".inf")])
def test_bad_config_is_one_clear_error(field, value):
    with pytest.raises(ConfigError, match=f"plugins.ewc.{field}"):
        load_config(None, [f"plugins.ewc.{field}={value}"])


def test_ewc_term_is_logged_from_the_second_experience(quick):
    seen: list[dict] = []

    class Recorder:
        from contlearn import hookimpl

        @hookimpl
        def on_metrics(self, metrics):
            seen.append(metrics)

    cfg = load_config(None, [*quick, "scenario.n_experiences=2", "plugins={}", "plugins.ewc.lam=10"])
    Experiment(cfg, plugins={"rec": Recorder()}).run()
    epochs = [m for m in seen if m["kind"] == "epoch"]
    assert "loss/ewc" not in epochs[0] and epochs[1]["loss/ewc"] >= 0.0


@pytest.mark.parametrize("name", ["split-digits-ewc", "permuted-digits-ewc"])
def test_shipped_configs_run_by_name(name, quick):
    cfg = load_config(name, [*quick, "scenario.n_experiences=2"])
    assert list(cfg.plugins) == ["ewc"] and cfg.plugins.ewc.lam == EWC.Config().lam
    results = Experiment(cfg).run()
    assert results.accuracy_matrix[0][0] > 0.5


def test_fisher_of_a_frozen_model_is_a_clear_error():
    model = torch.nn.Linear(3, 2).requires_grad_(False)
    with pytest.raises(PluginError, match="the model has no trainable parameters"):
        fisher_information(model, None, 8)


class _Recording(DistributedView):
    """Rank ``rank`` of ``world`` whose all-reduce keeps a copy of what it is given
    and returns it unchanged; the test adds the copies of all ranks, as an all-reduce would."""

    def __init__(self, rank: int, world: int):
        super().__init__(rank, world)
        self.sent: list[torch.Tensor] = []

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        self.sent.append(tensor.clone())
        return tensor


class _Routed(torch.nn.Module):
    """Calls its second linear layer only for batches whose first input is positive."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)

    def forward(self, x, t=None):
        from contlearn.models import Output

        logits = self.a(x) + self.b(x) if float(x[0, 0]) > 0 else self.a(x)
        return Output(logits=logits, features=x)


def _per_sample_loop(model, x, y) -> dict[str, torch.Tensor]:
    """(1/N) sum_n (d l_n / d theta)**2, one backward pass per sample (0 for a
    parameter a sample's loss does not use)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    out = {n: torch.zeros_like(p) for n, p in named}
    for i in range(len(y)):
        loss = torch.nn.functional.cross_entropy(model(x[i : i + 1]).logits, y[i : i + 1])
        for (n, _), g in zip(named, torch.autograd.grad(loss, [p for _, p in named], allow_unused=True), strict=True):
            if g is not None:
                out[n] += g**2
    return {n: v / len(y) for n, v in out.items()}


@pytest.mark.parametrize("calls_b", ["first batches", "last batches"])
def test_a_layer_some_batches_never_call_is_computed_per_sample_alone_and_shared_out_alike(calls_b):
    """Two batches of four call ``b`` (a task's head in training), the others
    never: their samples add 0 to its per-sample sum, so one process divides by all
    20 samples, whether the first batch calls it or not (both were refused), and
    two processes, one of which never calls ``b``, give one process's pass."""
    torch.manual_seed(0)
    model = _Routed()
    x = torch.randn(20, 4).abs()
    x[10:, 0] *= -1
    if calls_b == "last batches":
        x = torch.cat([x[10:], x[:10]])
    y = torch.arange(20) % 3
    data = TensorData(x, y)
    whole = fisher_information(model, data, 5, "per_sample")
    exact = _per_sample_loop(model, x, y)
    for name, value in exact.items():
        torch.testing.assert_close(whole[name], value, rtol=1e-4, atol=1e-7, msg=name)
    assert float(whole["b.weight"].abs().sum()) > 0
    second = _Recording(1, 2)
    fisher_information(model, data, 5, "per_sample", dist=second)

    class First(_Recording):
        def all_reduce_(self, tensor):
            return tensor.add_(second.sent[0])

    shared = fisher_information(model, data, 5, "per_sample", dist=First(0, 2))
    for name, value in whole.items():
        torch.testing.assert_close(shared[name], value, rtol=1e-5, atol=1e-8, msg=name)


class _Bypassed(_Routed):
    """Calls ``b`` through its forward for batches whose first input is positive,
    else through ``F.linear`` on its weight (which per-sample mode cannot tap)."""

    def forward(self, x, t=None):
        from contlearn.models import Output

        b = self.b(x) if float(x[0, 0]) > 0 else torch.nn.functional.linear(x, self.b.weight, self.b.bias)
        return Output(logits=self.a(x) + b, features=x)


@pytest.mark.parametrize("order", ["called first", "bypassed first"])
def test_a_layer_some_batches_reach_through_f_linear_is_refused_on_one_process(order):
    """Its gradient in those batches reaches no tap: counted per sample, it came
    out 41% low, silently."""
    torch.manual_seed(0)
    model = _Bypassed()
    x = torch.randn(20, 4).abs()
    x[10:, 0] *= -1
    if order == "bypassed first":
        x = torch.cat([x[10:], x[:10]])
    with pytest.raises(RuntimeError, match=r"batch 2 .*F\.linear on its weight.*cannot be told apart"):
        fisher_information(model, TensorData(x, torch.arange(20) % 3), 5, "per_sample")


def test_a_shared_out_pass_whose_processes_disagree_is_an_error_on_every_process():
    """Process 0 computes ``b`` per sample, process 1 from its batch gradients: the
    sums cannot be added, and every process says so after the all-reduce."""
    torch.manual_seed(0)
    model = _Bypassed()
    x = torch.randn(20, 4).abs()
    x[10:, 0] *= -1
    data = TensorData(x, torch.arange(20) % 3)
    second = _Recording(1, 2)
    fisher_information(model, data, 5, "per_sample", dist=second)  # alone it sees only its share: b by batches

    class First(_Recording):
        def all_reduce_(self, tensor):
            return tensor.add_(second.sent[0])

    with pytest.raises(PluginError, match="computed b.weight per sample on some and from batch gradients on others"):
        fisher_information(model, data, 5, "per_sample", dist=First(0, 2))


@pytest.mark.parametrize("mode", ["batch", "per_sample"])
@pytest.mark.parametrize("n, world", [(21, 2), (21, 3), (20, 4), (12, 3), (12, 5)])
def test_a_fisher_pass_shared_out_sums_to_one_process_s(n, world, mode):
    """Batches of 5: with 21 samples the last is partial; with 12 (3 batches) and 5 processes two take none.
    Every process makes exactly one all-reduce, and what they send adds up, divided, to one process's Fisher
    (per-sample parameters divided by samples, the others by batches)."""
    run, data = tiny_run(), tiny_data(n)
    whole = fisher_information(run.model, data, 5, mode)
    sent = []
    for rank in range(world):
        view = _Recording(rank, world)
        fisher_information(run.model, data, 5, mode, dist=view)
        assert len(view.sent) == 1
        sent.extend(view.sent)
    total = torch.stack(sent).sum(dim=0)
    # per parameter: (samples, batches) it is divided by, and (processes per sample, by batches)
    counts, kinds = total[-4 * len(whole):-2 * len(whole)].view(-1, 2), total[-2 * len(whole):].view(-1, 2)
    assert kinds[:, 1 if mode == "per_sample" else 0].eq(0).all()  # every share computed each parameter alike
    divisors = counts[:, 0 if mode == "per_sample" else 1]
    assert divisors.tolist() == [float(n if mode == "per_sample" else -(-n // 5))] * len(whole)  # MLP and head: all per sample
    offset = 0
    for value, count in zip(whole.values(), divisors.tolist(), strict=True):
        torch.testing.assert_close(total[offset:offset + value.numel()].view_as(value) / count, value, rtol=1e-5, atol=1e-8)
        offset += value.numel()
