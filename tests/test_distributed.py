"""Data-parallel runs under torchrun: the same training as one process, one writer."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest
import torch
from _crash import SMALL_RUN

from contlearn import Experiment, load_config
from contlearn import checkpoint as ckpt
from contlearn.cli import main
from contlearn.distributed import DistributedView
from contlearn.experiment import stream_of


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("n", [1, 2, 3, 7, 16, 33])
def test_shares_cover_the_batch_once_and_their_weights_sum_to_one(world, n):
    shares = [DistributedView(rank, world).share(n) for rank in range(world)]
    if n < world:  # not divided: everyone takes it all, at 1/world
        assert all(rows == slice(0, n) and weight == pytest.approx(1 / world) for rows, weight in shares)
        return
    covered = [i for rows, _ in shares for i in range(n)[rows]]
    assert covered == list(range(n))
    assert all(weight == pytest.approx(len(range(n)[rows]) / n) for rows, weight in shares)
    assert sum(weight for _, weight in shares) == pytest.approx(1.0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_processes(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 ARGS`` on the loopback, one thread per process.
    Past ``timeout`` (processes stuck in a collective) the whole group is killed,
    workers included, and the test fails saying so."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    torchrun += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    with subprocess.Popen([*torchrun, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()  # torchrun stops its workers (their own sessions) on SIGTERM
            try:
                out, err = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                out, err = proc.communicate()
            pytest.fail(f"torchrun was still running after {timeout} s (a collective that never completes?): {err[-2000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_two_processes_train_as_one_and_only_process_0_writes(tmp_path):
    overrides = [*SMALL_RUN, "eval.fwt=false", "train.momentum=0.9", "plugins.replay.size=30", "plugins.ewc={}"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["run", *overrides, "--out", str(one), "--quiet"]) == 0
    proc = two_processes("-m", "contlearn", "run", *overrides, "--out", str(two), "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("run directory:") == 1  # process 1 prints nothing

    a, b = (json.loads((d / "results.json").read_text()) for d in (one, two))
    for row_a, row_b in zip(a["accuracy_matrix"], b["accuracy_matrix"], strict=True):
        assert row_b == pytest.approx(row_a, abs=0.02)
    weights_a, weights_b = (ckpt.load(ckpt.list_checkpoints(d / "checkpoints")[-1])["model"] for d in (one, two))
    for name, value in weights_a.items():
        torch.testing.assert_close(weights_b[name], value, rtol=1e-4, atol=1e-5)
    events = [json.loads(line) for line in (two / "events.jsonl").read_text().splitlines()]
    assert sum(e["kind"] == "eval" for e in events) == 3  # one writer: each experience's evaluation once
    single = [json.loads(line) for line in (one / "events.jsonl").read_text().splitlines()]
    losses = [[e["loss"] for e in log if e["kind"] == "epoch"] for log in (single, events)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)  # the processes' losses, averaged


def test_task_heads_a_share_lacks_get_the_summed_gradient_and_absent_heads_none(tmp_path):
    """Task-incremental with replay: a process's share may lack a task whose head
    another share trains (it must still sum the same tensors), and old heads no
    share trains keep no gradient, so weight decay leaves them as on one process."""
    overrides = [*SMALL_RUN, "scenario.setting=task", "model.head=multi", "eval.fwt=false", "train.momentum=0.9",
                 "train.weight_decay=0.05", "plugins.replay.size=12"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["run", *overrides, "--out", str(one), "--quiet"]) == 0
    proc = two_processes("-m", "contlearn", "run", *overrides, "--out", str(two), "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    weights_a, weights_b = (ckpt.load(ckpt.list_checkpoints(d / "checkpoints")[-1])["model"] for d in (one, two))
    for name, value in weights_a.items():
        torch.testing.assert_close(weights_b[name], value, rtol=1e-4, atol=1e-5)


SPARSE_GRADIENTS_SCRIPT = """
import sys

import torch

from contlearn.distributed import DistributedView

dist, _ = DistributedView.from_environment(torch.device("cpu"))
both, mine, none = (torch.zeros(3, requires_grad=True) for _ in range(3))
half = torch.zeros(2, dtype=torch.bfloat16, requires_grad=True)  # a second dtype, one all-reduce of its own
frozen = torch.zeros(2)
both.grad = torch.full((3,), 1.0 + dist.rank)
half.grad = torch.ones(2, dtype=torch.bfloat16)
if dist.rank == 1:
    mine.grad = torch.full((3,), 4.0)
dist.sum_gradients_([both, mine, none, half, frozen], 0.5)
torch.save({"both": both.grad, "mine": mine.grad, "none": none.grad, "half": half.grad}, f"{sys.argv[1]}/rank{dist.rank}.pt")
torch.distributed.barrier()
torch.distributed.destroy_process_group()
"""


def each_process_s(script: str, tmp_path) -> list[dict]:
    """Run ``script`` (given the folder to save ``rank<k>.pt`` in) on two processes; what each saved."""
    path = tmp_path / "script.py"
    path.write_text(script)
    proc = two_processes(str(path), str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]


def test_gradients_some_processes_lack_are_summed_and_none_stays_none(tmp_path):
    for got in each_process_s(SPARSE_GRADIENTS_SCRIPT, tmp_path):
        assert torch.equal(got["both"], torch.full((3,), 1.5))
        assert torch.equal(got["mine"], torch.full((3,), 2.0))
        assert got["none"] is None
        assert torch.equal(got["half"], torch.ones(2, dtype=torch.bfloat16))


SHARDING_SCRIPT = """
import json, sys
import torch
from contlearn import Experiment, hookimpl, load_config

class CountEvaluated:
    def __init__(self):
        self.seen = 0

    @hookimpl
    def after_eval_batch(self, batch):
        self.seen += len(batch)

class InOrder(CountEvaluated):
    sequential_evaluation = True

out = {}
for name, plugin in (("sharded", CountEvaluated()), ("in_order", InOrder())):
    cfg = load_config("split-digits", sys.argv[2:])
    results = Experiment(cfg, plugins={"count": plugin}).run()
    out[name] = {"seen": plugin.seen, "matrix": results.accuracy_matrix, "initial": results.initial_accuracy}
memo = Experiment(load_config("split-digits", [*sys.argv[2:], "plugins.memo.memory_size=40"]))
memo.run()
out["memo"] = memo.run_state.plugins["memo"].accuracy  # its classifiers' counts, summed over the processes

from contlearn.plugins import ewc as ewc_module
fisher_rows = []
whole_sums = ewc_module._fisher_sums
def counting_sums(model, data, batch_size, mode):
    fisher_rows.append(len(data))
    return whole_sums(model, data, batch_size, mode)
ewc_module._fisher_sums = counting_sums
for fisher in ("batch", "per_sample"):
    fisher_rows = []
    ewc = Experiment(load_config("split-digits", [*sys.argv[2:], "plugins.ewc={}", f"plugins.ewc.fisher={fisher}"]))
    ewc.run()
    importance = ewc.run_state.plugins["ewc"].state_dict()["importance"]
    out["ewc " + fisher] = {"rows": fisher_rows, "importance": {k: v.flatten().tolist() for k, v in importance.items()}}
rank = torch.distributed.get_rank()
open(sys.argv[1] + f"/rank{rank}.json", "w").write(json.dumps(out))
"""


def test_evaluation_is_shared_out_unless_a_plugin_needs_it_in_order(tmp_path):
    overrides = [*SMALL_RUN, "eval.fwt=true", "train.eval_batch_size=7"]
    script = tmp_path / "shards.py"
    script.write_text(SHARDING_SCRIPT)
    proc = two_processes(str(script), str(tmp_path), *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    alone = Experiment(load_config("split-digits", overrides)).run()
    n_test = sum(len(exp.test) for exp in stream_of(load_config("split-digits", overrides)))
    evaluations = len(alone.accuracy_matrix)
    sharded = [r["sharded"]["seen"] for r in ranks]
    assert sum(sharded) == evaluations * n_test and 0 < sharded[0] < evaluations * n_test
    assert [r["in_order"]["seen"] for r in ranks] == [evaluations * n_test] * 2  # everyone, everything
    for r in ranks:
        for run in ("sharded", "in_order"):  # the counts are summed: the accuracies of one process
            for row, row_alone in zip(r[run]["matrix"], alone.accuracy_matrix, strict=True):
                assert row == pytest.approx(row_alone, abs=0.02)
            assert r[run]["initial"] == pytest.approx(alone.initial_accuracy, abs=0.02)
    assert ranks[0]["sharded"] == {**ranks[1]["sharded"], "seen": sharded[0]}  # the same results everywhere
    memo = Experiment(load_config("split-digits", [*overrides, "plugins.memo.memory_size=40"]))
    memo.run()
    memo_alone = memo.run_state.plugins["memo"].accuracy
    assert ranks[0]["memo"] == ranks[1]["memo"] and set(memo_alone) == set(ranks[0]["memo"]) == {"classifier", "nme"}
    for name, rows in memo_alone.items():
        for row, row_alone in zip(ranks[0]["memo"][name], rows, strict=True):
            assert row == pytest.approx(row_alone, abs=0.02), name
    # EWC's Fisher pass is shared out too (each process takes a block of the batches), and gives one process's
    # Fisher, from batch gradients and per sample alike
    train_sizes = [len(exp.train) for exp in stream_of(load_config("split-digits", overrides))]
    for fisher in ("batch", "per_sample"):
        rows = [r["ewc " + fisher]["rows"] for r in ranks]
        assert [a + b for a, b in zip(*rows, strict=True)] == train_sizes
        assert all(0 < n < size for n, size in zip(rows[0], train_sizes, strict=True))
        ewc = Experiment(load_config("split-digits", [*overrides, "plugins.ewc={}", f"plugins.ewc.fisher={fisher}"]))
        ewc.run()
        for name, value in ewc.run_state.plugins["ewc"].state_dict()["importance"].items():
            for r in ranks:
                got = torch.tensor(r["ewc " + fisher]["importance"][name])
                torch.testing.assert_close(got, value.flatten(), rtol=1e-4, atol=1e-7)


SAME_MODEL_SCRIPT = """
import sys

import torch

from contlearn import Experiment, hookimpl, load_config


class PerShareNoise:
    \"\"\"Draws from torch's generator as many numbers as its share has samples
    (as dropout does), so uneven shares leave the processes' generators apart.\"\"\"

    @hookimpl
    def loss_terms(self, batch):
        return {"noise": 0.0 * torch.rand(len(batch)).sum()}


out, overrides = sys.argv[1], sys.argv[2:]
experiment = Experiment(load_config("split-digits", overrides), plugins={"noise": PerShareNoise()})
experiment.run()
run = experiment.run_state
torch.save(run.model.state_dict(), f"{out}/rank{run.dist.rank}.pt")
"""


def test_every_process_keeps_the_same_model_with_batchnorm_and_per_share_draws(tmp_path):
    """BatchNorm's running statistics come from each process's share, and the
    per-share draws of an odd batch leave the generators apart, from which the
    next experience's head rows are drawn: both are made process 0's."""
    overrides = [*SMALL_RUN, "eval.fwt=false", "model.backbone=cnn-bn", "model.hidden=[8,8]", "train.batch_size=15"]
    script = tmp_path / "same.py"
    script.write_text(SAME_MODEL_SCRIPT)
    proc = two_processes(str(script), str(tmp_path), *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert any("running_mean" in k for k in ranks[0])
    for name, value in ranks[0].items():
        assert torch.equal(value, ranks[1][name]), name



TERMS_SCRIPT = """
import json
import sys

from contlearn import Experiment, hookimpl, load_config


class ByShare:
    \"\"\"Terms that depend on a process's share: 'a' and 'b' on alternate steps,
    in opposite turns on the two processes, and 'only0' on process 0 alone.\"\"\"

    @hookimpl
    def loss_terms(self, run, out):
        zero = 0.0 * out.logits.sum()
        terms = {"a": zero + 1.0} if (run.step + run.dist.rank) % 2 == 0 else {"b": zero + 100.0}
        if run.dist.rank == 0:
            terms["only0"] = zero + 2.0
        return terms


class Epochs:
    def __init__(self):
        self.seen = []

    @hookimpl
    def on_metrics(self, metrics):
        if metrics["kind"] == "epoch":
            self.seen.append({k: v for k, v in metrics.items() if k.startswith("loss/")})


out, overrides = sys.argv[1], sys.argv[2:]
epochs = Epochs()
experiment = Experiment(load_config("split-digits", overrides), out_dir=f"{out}/run", plugins={"terms": ByShare(), "epochs": epochs})
experiment.run()
if experiment.run_state.dist.rank == 0:
    with open(f"{out}/epochs.json", "w") as f:
        json.dump(epochs.seen, f)
"""


def test_terms_a_share_gives_at_some_steps_only_are_averaged_by_name_over_the_processes(tmp_path):
    script = tmp_path / "terms.py"
    script.write_text(TERMS_SCRIPT)
    proc = two_processes(str(script), str(tmp_path), *SMALL_RUN, "eval.fwt=false", "checkpoint.every_n_steps=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    epochs = json.loads((tmp_path / "epochs.json").read_text())
    assert len(epochs) == 6  # 3 experiences of 2 epochs
    for epoch in epochs:  # each step: one process's 1 (or 100) and the other's 0, averaged
        assert epoch["loss/a"] == pytest.approx(0.5) and epoch["loss/b"] == pytest.approx(50.0)
        assert epoch["loss/only0"] == pytest.approx(1.0)


RESUME_SCRIPT = """
import sys

import torch

from contlearn import Experiment, hookimpl, load_config


class PerShareNoise:
    \"\"\"A loss term weighted by numbers drawn from torch's generator, as many as
    its share has samples (as dropout draws).\"\"\"

    @hookimpl
    def loss_terms(self, batch, out):
        return {"noise": 0.1 * (torch.rand(len(batch)) * out.logits.sum(1)).mean()}


mode, out, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
plugins = {"noise": PerShareNoise()}
if mode == "run":
    Experiment(load_config("split-digits", overrides), out_dir=out, plugins=plugins).run()
else:
    Experiment.resume(out, plugins=plugins).run()
"""


def test_a_run_with_draws_per_share_resumes_exactly_on_as_many_processes(tmp_path):
    """Uneven shares (a batch of 15) leave the processes' generators apart inside
    an experience (torch's by the noise term, PRD's views): the checkpoint keeps
    each process's, and a resume from one inside an experience ends as the run
    that never stopped."""
    script = tmp_path / "resume.py"
    script.write_text(RESUME_SCRIPT)
    overrides = [*SMALL_RUN, "eval.fwt=false", "train.batch_size=15", "plugins.prd={}",
                 "checkpoint.every_n_steps=4", "checkpoint.keep_last=100"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    proc = two_processes(str(script), "run", str(whole), *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shutil.copytree(whole, cut)
    checkpoints = ckpt.list_checkpoints(cut / ckpt.DIRNAME)
    inside = [p for p in checkpoints if ckpt.load(p)["position"]["inside_experience"]]
    start = next(p for p in inside if ckpt.load(p)["position"]["completed"] == 1)  # inside experience 1
    assert len(ckpt.load(start)["rng_processes"]) == 2
    for later in checkpoints[checkpoints.index(start) + 1 :]:
        later.unlink()
    (cut / "results.json").unlink()
    proc = two_processes(str(script), "resume", str(cut))
    assert proc.returncode == 0, proc.stderr[-3000:]

    a, b = (json.loads((d / "results.json").read_text()) for d in (whole, cut))
    assert a["accuracy_matrix"] == b["accuracy_matrix"]
    final = [ckpt.load(ckpt.list_checkpoints(d / ckpt.DIRNAME)[-1]) for d in (whole, cut)]
    for name, value in final[0]["model"].items():
        assert torch.equal(value, final[1]["model"][name]), name


SUPCON_SCRIPT = """
import sys

import torch
from torch.nn import functional as F

from contlearn.distributed import DistributedView
from contlearn.plugins._supcon import supcon_loss, supcon_over_processes

out = sys.argv[1]
dist, _ = DistributedView.from_environment(torch.device("cpu"))
torch.manual_seed(0)
w = torch.randn(5, 4, requires_grad=True)  # a model: z = normalise(x w)
x, y = torch.randn(7, 2, 5), torch.tensor([0, 1, 0, 2, 1, 0, 2])  # 7 samples: shares of 3 and 4
rows, weight = dist.share(7)
loss = supcon_over_processes(F.normalize(x[rows] @ w, dim=2), y[rows], dist, 7)
loss.backward()
dist.sum_gradients_([w], weight)  # what the loop does
one = w.detach().clone().requires_grad_(True)
whole = supcon_loss(F.normalize(x @ one, dim=2), y)
whole.backward()
torch.save({"loss": loss.item(), "whole": whole.item(), "grad": w.grad, "one": one.grad}, f"{out}/rank{dist.rank}.pt")
torch.distributed.barrier()  # leave together: a process exiting mid-connection can abort the other
torch.distributed.destroy_process_group()
"""


DISTILL_SCRIPT = """
import sys

import torch

from contlearn.distributed import DistributedView
from contlearn.plugins.prd import relation_distillation, views_over_processes

out = sys.argv[1]
dist, _ = DistributedView.from_environment(torch.device("cpu"))
torch.manual_seed(0)
w = torch.randn(5, 3, requires_grad=True)  # student scores = features w; 3 prototypes
x, teacher = torch.randn(2, 7, 5), torch.randn(2, 7, 3)  # two views of 7 samples: shares of 3 and 4
rows, weight = dist.share(7)
b = len(range(7)[rows])
student = (x[:, rows] @ w).reshape(2 * b, 3)  # view-major, as PRD stacks its views
whole = relation_distillation(views_over_processes(student, dist, 7),
                              views_over_processes(teacher[:, rows].reshape(2 * b, 3), dist, 7), 2.0, "samples")
loss = dist.whole_batch_loss(whole, 7, b)  # as PRD does
loss.backward()
dist.sum_gradients_([w], weight)
one = w.detach().clone().requires_grad_(True)
reference = relation_distillation((x @ one).reshape(14, 3), teacher.reshape(14, 3), 2.0, "samples")
reference.backward()
torch.save({"loss": loss.item(), "whole": reference.item(), "grad": w.grad, "one": one.grad}, f"{out}/rank{dist.rank}.pt")
torch.distributed.barrier()
torch.distributed.destroy_process_group()
"""


PROTOTYPE_SCRIPT = """
import sys

import torch

from contlearn.distributed import DistributedView
from contlearn.plugins.prd import prototype_loss, prototype_loss_over_processes

out = sys.argv[1]
dist, _ = DistributedView.from_environment(torch.device("cpu"))
torch.manual_seed(0)
w = torch.randn(3, 5, requires_grad=True)  # 3 prototypes
x = torch.randn(14, 5)  # two views of 7 samples, view-major: shares of 3 and 4
y = torch.tensor([0, -1, -1, 2, 1, 0, 2]).repeat(2)  # rehearsed samples (-1) only in process 0's share
rows, weight = dist.share(7)
b = len(range(7)[rows])
mine = torch.cat([torch.arange(7)[rows], 7 + torch.arange(7)[rows]])
loss = prototype_loss_over_processes(x[mine], y[mine], w, dist, 7, b)
loss.backward()
dist.sum_gradients_([w], weight)
one = w.detach().clone().requires_grad_(True)
reference = prototype_loss(x, y, one)
reference.backward()
torch.save({"loss": loss.item(), "whole": reference.item(), "grad": w.grad, "one": one.grad}, f"{out}/rank{dist.rank}.pt")
torch.distributed.barrier()
torch.distributed.destroy_process_group()
"""


@pytest.mark.parametrize(
    "script", [SUPCON_SCRIPT, DISTILL_SCRIPT, PROTOTYPE_SCRIPT], ids=["supcon", "relation-samples", "prototype"]
)
def test_a_contrastive_loss_over_the_processes_is_the_whole_batch_s(tmp_path, script):
    """PRD's supervised contrastive term and its relation distillation over samples
    see the gathered batch, and its prototype loss averages over every process's
    samples that have a prototype: the value and the summed gradient are one
    process's, with uneven shares (and rehearsed samples in one share only)."""
    for got in each_process_s(script, tmp_path):
        assert got["loss"] == pytest.approx(got["whole"], rel=1e-6)
        torch.testing.assert_close(got["grad"], got["one"], rtol=1e-5, atol=1e-7)


STOP_SCRIPT = """
import json
import sys

from contlearn import Experiment, hookimpl, load_config
from contlearn.errors import Interrupted


class StopOneProcess:
    \"\"\"Asks process 1 alone to stop in step 2, as a signal reaching it first would.\"\"\"

    @hookimpl
    def after_step(self, run):
        if run.dist.rank == 1 and run.global_step == 2:
            experiment.request_stop()


out, overrides = sys.argv[1], sys.argv[2:]
experiment = Experiment(load_config("split-digits", overrides), out_dir=out, plugins={"stop": StopOneProcess()})
try:
    experiment.run()
    message = None
except Interrupted as exc:
    message = str(exc)
rank = experiment.run_state.dist.rank
with open(f"{out}/../stop{rank}.json", "w") as f:
    json.dump({"message": message, "global_step": experiment.run_state.global_step}, f)
"""


def test_a_stop_asked_of_one_process_stops_all_at_the_end_of_the_epoch(tmp_path):
    out = tmp_path / "run"
    script = tmp_path / "stop.py"
    script.write_text(STOP_SCRIPT)
    # a periodic checkpoint falls on the epoch's end too: the stop reuses it
    proc = two_processes(str(script), str(out), *SMALL_RUN, "eval.fwt=false", "checkpoint.every_n_steps=5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"stop{r}.json").read_text()) for r in (0, 1)]
    steps_per_epoch = 5  # SMALL_RUN's experience 0
    assert [r["global_step"] for r in ranks] == [steps_per_epoch] * 2
    assert "state saved in" in ranks[0]["message"] and "ckpt-000-000000005.pt" in ranks[0]["message"]
    assert "with process 0" in ranks[1]["message"]
    (newest,) = ckpt.list_checkpoints(out / ckpt.DIRNAME)
    assert ckpt.load(newest)["position"]["global_step"] == steps_per_epoch


def test_unlearning_refuses_several_processes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["unlearn", str(tmp_path), "--classes", "3"]) == 2
    assert capsys.readouterr().err.startswith("[rank 1] error: unlearning runs in one process")  # every process reports


def test_a_malformed_torchrun_environment_is_one_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "two")
    assert main(["run", "train.epochs=1", "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: the environment variable WORLD_SIZE must be a non-negative integer (torchrun sets it), got 'two'"


@pytest.mark.parametrize(
    ("device", "local_rank", "message"),
    [("cuda:0", "0", "would put all 2 processes on one GPU"), ("cuda", "999", "LOCAL_RANK=999 has no GPU of its own")],
)
def test_gpus_are_one_per_process(monkeypatch, device, local_rank, message):
    from contlearn import ConfigError

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    with pytest.raises(ConfigError, match=message):
        DistributedView.from_environment(torch.device(device))


def test_a_share_of_one_sample_through_batchnorm_says_how_many_samples_a_batch_needs(tmp_path):
    overrides = ["device=cpu", "scenario.n_experiences=1", "scenario.samples_per_class=4", "model.backbone=cnn-bn",
                 "model.hidden=[4,4,4,4]", "train.epochs=1", "eval.fwt=false", "train.batch_size=3"]
    proc = two_processes("-m", "contlearn", "run", "split-digits", *overrides, "--out", str(tmp_path / "r"), "--quiet")
    assert proc.returncode != 0
    assert ("step 1 of experience 0 (epoch 0) gives this process a share of one sample, which BatchNorm cannot "
            "normalise in training (one value per channel); with 2 processes every batch needs at least 4 samples"
            ) in proc.stderr, proc.stderr[-2000:]


LEAVING_SCRIPT = """
import atexit, os, sys
import torch
from contlearn import Experiment, load_config


def record() -> None:  # registered first, so it runs after the handlers registered later
    joined = "joined" if torch.distributed.is_initialized() else "left"
    open(sys.argv[1] + f"/rank{os.environ['RANK']}-{joined}", "w").close()


atexit.register(record)
experiment = Experiment(load_config("split-digits", sys.argv[3:]), out_dir=sys.argv[2])
experiment.build()  # built twice (run() builds again): process 1 still joins the checkpoints' collectives
experiment.run()
"""


def test_a_process_leaves_the_process_group_contlearn_joined_when_it_exits(tmp_path):
    script = tmp_path / "leave.py"
    script.write_text(LEAVING_SCRIPT)
    proc = two_processes(str(script), str(tmp_path), str(tmp_path / "run"), *SMALL_RUN, "eval.fwt=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("rank*")) == ["rank0-left", "rank1-left"]


def test_a_stop_is_agreed_at_a_periodic_checkpoint_inside_the_epoch(tmp_path):
    """torchrun kills the processes some seconds after forwarding Ctrl-C: a stop
    cannot always wait for the end of a long epoch."""
    out = tmp_path / "run"
    script = tmp_path / "stop.py"
    script.write_text(STOP_SCRIPT)  # process 1 is asked in step 2; the epoch has 5 steps
    proc = two_processes(str(script), str(out), *SMALL_RUN, "eval.fwt=false", "checkpoint.every_n_steps=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"stop{r}.json").read_text()) for r in (0, 1)]
    assert [r["global_step"] for r in ranks] == [3, 3]
    assert "ckpt-000-000000003.pt" in ranks[0]["message"]


def test_a_non_finite_loss_is_one_line_from_each_process(tmp_path):
    proc = two_processes("-m", "contlearn", "run", *SMALL_RUN, "train.lr=1e12", "checkpoint.every_n_steps=2",
                         "--out", str(tmp_path / "run"), "--quiet")  # fmt: skip
    # torchrun prints its own traceback for a failed child; a worker's would be prefixed "[rank1]:"
    assert proc.returncode == 1 and "[rank0]:" not in proc.stderr and "[rank1]:" not in proc.stderr, proc.stderr[-3000:]
    for rank in (0, 1):  # both check at the checkpoint, and stop together
        assert f"[rank {rank}] error: non-finite loss at step" in proc.stderr


FAILING_PROCESS_SCRIPT = """
import sys

from contlearn import _loop, cli
from contlearn.errors import TrainingError

step = _loop.train_step


def failing(run, *args, **kwargs):
    if run.dist.rank == 1 and run.global_step == 3:
        raise TrainingError("process 1 fails here")
    return step(run, *args, **kwargs)


_loop.train_step = failing
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_process_that_loses_another_mid_collective_says_so_in_one_line(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text(FAILING_PROCESS_SCRIPT)
    proc = two_processes(str(script), "run", *SMALL_RUN, "--out", str(tmp_path / "run"), "--quiet")
    assert proc.returncode != 0 and "[rank0]:" not in proc.stderr and "[rank1]:" not in proc.stderr, proc.stderr[-3000:]
    assert "[rank 1] error: process 1 fails here" in proc.stderr
    # process 0 says so in one line, unless torchrun's SIGTERM reaches it first (a race on a loaded machine)


def test_a_collective_that_lost_a_peer_is_one_line(monkeypatch, capsys):
    from contlearn import cli

    def lost(args):
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer [::1]:1234")

    monkeypatch.setitem(cli.COMMANDS, "configs", lost)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert cli.main(["configs"]) == 1
    assert capsys.readouterr().err == ("[rank 0] error: another process of this run stopped (RuntimeError: [../third_"
                                       "party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer "
                                       "[::1]:1234); stopping too\n")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(RuntimeError):  # one process: not about another one, the traceback helps
        cli.main(["configs"])


def test_the_epoch_losses_of_a_resumed_run_are_the_processes_average(tmp_path):
    overrides = [*SMALL_RUN, "checkpoint.every_n_steps=3", "checkpoint.keep_last=100"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    proc = two_processes("-m", "contlearn", "run", *overrides, "--out", str(whole), "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    shutil.copytree(whole, cut)
    (cut / "results.json").unlink()
    for later in ckpt.list_checkpoints(cut / ckpt.DIRNAME)[2:]:  # resumes at step 6, inside epoch 1
        later.unlink()
    proc = two_processes("-m", "contlearn", "resume", str(cut), "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [[e["loss"] for e in map(json.loads, (d / "events.jsonl").read_text().splitlines()) if e["kind"] == "epoch"]
              for d in (whole, cut)]  # fmt: skip
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)  # was process 0's share's loss for the epoch resumed
