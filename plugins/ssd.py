"""Selective Synaptic Dampening: make a trained model forget classes or samples without retraining.

Foster, Schoepf and Brintrup, "Fast Machine Unlearning Without Retraining Through
Selective Synaptic Dampening" (AAAI 2024); reference code
if-loops/selective-synaptic-dampening (``ssd.py``, ``ParameterPerturber``).

Importance is the diagonal empirical Fisher information
(:func:`contlearn.kernels.fisher.empirical_fisher`), as the reference computes it:
the model in eval mode, per batch the mean cross-entropy on the true labels, the
squared batch gradient accumulated and divided by the number of batches (``fisher:
per_sample`` uses per-sample gradients instead). ``F_D`` is the importance over
the training data, ``F_f`` over the forget set. Every trainable parameter (norm
layers and the head included) with ``F_f > alpha * F_D`` is multiplied by
``beta = min(lam * F_D / F_f, 1)`` (:func:`contlearn.kernels.dampen.dampen_`).

Beyond the reference (named options, docs/plugins/ssd.md):

- ``F_D`` is cached when each training experience ends, so a request costs one
  pass over the forget set and one kernel. In a stream the cache is the
  batch-count-weighted mean of the experiences' importances, each measured with
  the weights at the end of its experience (``recompute`` measures it anew over all
  training data seen so far).
- ``forget`` events in the config run requests after named experiences, so the
  accuracy matrix shows learning and forgetting interleaved.
- ``auto`` mode walks from weak to strong settings until the forget set's own
  training samples are classified at most ``target`` correctly.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, List, Optional

import torch
from contlearn.kernels.dampen import MAX_SCALAR, dampen_
from contlearn.plugins import _forget_sets as fs
from contlearn.plugins._common import (
    DROP_ONE,
    declaring,
    refuse_logits_without_gradient,
    require_trainable,
)
from contlearn.plugins._unlearning_metrics import accuracy, forgetting_metrics
from contlearn.plugins.ewc import fisher_and_divisors, fisher_information
from contlearn.scenarios import Batch

from contlearn.errors import (
    ConfigError,
    ContlearnError,
    DataError,
    PluginError,
    TrainingError,
    choices,
)
from contlearn.hookspecs import hookimpl
from contlearn.results import write_atomic

FISHERS = ("batch", "per_sample")
ORDERS = ("class", "data")
#: keys an unlearning request may hold
REQUEST_KEYS = (
    "classes", "samples", "experience", "data", "alpha", "lam", "auto", "target", "recompute", "fisher",
    "batch_size", "fisher_d_order", "metrics",
)  # fmt: skip


@dataclass
class ForgetEvent:
    """An unlearning request run after a training experience (``plugins.ssd.forget``)."""

    after: int = 0  # index of the experience after whose training the request runs
    classes: Optional[List[str]] = None  # class names, as in stream.class_names
    samples: Optional[List[int]] = (
        None  # indices into the training data seen so far (or of `experience`)
    )
    experience: Optional[int] = None  # samples index this experience's training data
    alpha: Optional[float] = None  # None: the plugin's
    lam: Optional[float] = None
    auto: Optional[bool] = None

    def request(self) -> dict[str, Any]:
        keys = ("classes", "samples", "experience", "alpha", "lam", "auto")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


def _check_number(where: str, value: Any, low: float = 0.0, high: float = MAX_SCALAR) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (low <= value <= high) \
            or not math.isfinite(value):
        span = f"[{low}, {high}]" if high < MAX_SCALAR else f"at least {low} and at most {high:.4g} (fp32's largest)"
        raise ConfigError(f"{where} must be a finite number {span}, got {value!r}")
    return float(value)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class SelectionWarning(UserWarning):
    """An SSD request that dampened no parameter."""


def _warn_nothing_selected(where: str, alpha: float, n_d: float, n_f: int) -> None:
    """Say that a request changed nothing, and why when the reason is known: a
    per-sample ``F_D`` is the mean over the ``n_d`` training samples, the ``n_f`` to
    forget among them, so for the parameters measured per sample ``F_D >= (n_f /
    n_d) F_f`` (with the same weights), and ``F_f > alpha F_D`` needs ``alpha <
    n_d / n_f``. ``n_d`` is 0 where that does not apply."""
    why = ""
    bound = n_d / n_f if n_d and n_f else None
    if bound is not None and alpha >= bound:
        why = (
            f": per-sample F_D averages over all {n_d:g} training samples, the {n_f} to forget "
            f"included, so F_f > alpha * F_D needs alpha < {bound:.3g}"
        )
    warnings.warn(
        f"{where}: alpha {alpha:g} selected no parameter, so nothing was forgotten{why}; "
        f"lower alpha, or use auto",
        SelectionWarning,
        stacklevel=3,
    )


class SSD:
    """Selective Synaptic Dampening: forget without retraining (Foster et al., AAAI 2024)."""

    @dataclass
    class Config:
        alpha: float = 10.0  # selection: dampen where F_f > alpha * F_D
        lam: float = 1.0  # dampening: theta *= min(lam * F_D / F_f, 1)
        batch_size: int = 64  # of the F_D and F_f passes (batch mode normalises per batch)
        fisher: str = "batch"  # batch (squared batch gradients, the reference) | per_sample
        fisher_d_order: str = "class"  # class (F_D and F_f batches of one class, the reference) | data
        cache: bool = True  # compute F_D when each training experience ends
        auto: bool = False  # choose alpha and lam per request (see auto_alphas, auto_lams, target)
        target: float = 0.05  # auto: highest accepted accuracy on the forget set's training samples
        auto_alphas: List[float] = field(
            default_factory=lambda: [1000.0, 500.0, 200.0, 100.0, 50.0, 20.0, 10.0, 5.0, 2.0, 1.0]
        )
        auto_lams: List[float] = field(
            default_factory=lambda: [0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.0]
        )
        metrics: bool = True  # measure retain/forget accuracy and the MIA before and after
        forget: List[ForgetEvent] = field(default_factory=list)  # requests inside the stream

        def __post_init__(self) -> None:
            where = "plugins.ssd"
            _check_number(f"{where}.alpha", self.alpha)
            _check_number(f"{where}.lam", self.lam)
            _check_number(f"{where}.target", self.target, 0.0, 1.0)
            if self.batch_size < 1:
                raise ConfigError(f"{where}.batch_size must be at least 1, got {self.batch_size}")
            if self.fisher not in FISHERS:
                raise ConfigError(
                    f"{where}.fisher must be one of {choices(FISHERS)}, got {self.fisher!r}"
                )
            if self.fisher_d_order not in ORDERS:
                raise ConfigError(
                    f"{where}.fisher_d_order must be one of {choices(ORDERS)}, got {self.fisher_d_order!r}"
                )
            if not self.auto_alphas:
                raise ConfigError(f"{where}.auto_alphas must list at least one alpha")
            for k, a in enumerate(self.auto_alphas):
                _check_number(f"{where}.auto_alphas[{k}]", a)
            for k, lam in enumerate(self.auto_lams):
                _check_number(f"{where}.auto_lams[{k}]", lam)
            for k, event in enumerate(self.forget):
                if isinstance(event, dict):  # built in Python rather than through the config
                    event = self.forget[k] = ForgetEvent(**event)
                if event.after < 0:
                    raise ConfigError(
                        f"{where}.forget[{k}].after must be an experience index >= 0, got {event.after}"
                    )
                if (event.classes is None) == (event.samples is None):
                    raise ConfigError(
                        f"{where}.forget[{k}] needs exactly one of 'classes' or 'samples'"
                    )

    def __init__(self, config: SSD.Config):
        self.config = config
        #: what a refusal of the run's model advises (contlearn unlearn, which adds SSD, says otherwise)
        self.refusal_advice = DROP_ONE
        self.fisher_d: dict[str, torch.Tensor] = {}
        self.fisher_d_weight = 0.0  # batches (batch mode) or samples (per_sample) behind the cache
        #: by parameter, what its cached value is a mean over: samples where per_sample mode computes it per
        #: sample, batches where it falls back to batch gradients (and in batch mode)
        self.fisher_d_weights: dict[str, float] = {}
        self.fisher_d_experiences: list[int] = []
        self.reports: list[dict[str, Any]] = []  # of the forget events done

    # ------------------------------------------------------------------ hooks

    @hookimpl
    def setup(self, run: Any) -> None:
        require_trainable(run, "ssd", "dampens the model's trainable parameters", self.refusal_advice)
        refuse_logits_without_gradient(run, "ssd", "selects parameters by the Fisher information of the model's logits",
                                       self.refusal_advice)
        self.fisher_d = {n: t.to(run.device) for n, t in self.fisher_d.items()}
        if self.config.forget:
            _refuse_what_cannot_unlearn(run)
            later = declaring(run, "predicts_from_after_experience")
            if later:
                raise PluginError(
                    f"plugins.ssd.forget: a forget event runs (and measures) at the end of its experience before "
                    f"plugin {later[0]!r} has made what it predicts with there; forget after the run instead: "
                    f"contlearn unlearn RUN_DIR --classes ..."
                )
        for k, event in enumerate(self.config.forget):
            self._check_event(run, k, event)

    @hookimpl(tryfirst=True)
    def after_experience(self, run: Any, exp: Any) -> None:
        """Update the F_D cache with this experience's training data, then run the
        forget events due now (first, so that the other plugins' end-of-experience
        work sees the model that forgot)."""
        if self.config.cache:
            self._cache_experience(run, exp)
        for k, event in enumerate(self.config.forget):
            if event.after == exp.index:
                report = self.forget(run, event.request(), where=f"plugins.ssd.forget[{k}]")
                report["after_experience"] = exp.index
                self.reports.append(report)
                self._announce(run, report)

    @hookimpl
    def unlearn(self, run: Any, request: Any) -> dict[str, Any]:
        _refuse_what_cannot_unlearn(run)
        return self.forget(run, dict(request))

    # ---------------------------------------------------------------- F_D cache

    def _ordered(self, data: Any, order: str) -> Any:
        if order == "class" and len(data):
            return data.subset(torch.sort(data.y, stable=True).indices)
        return data

    def _weight(self, n_samples: int, mode: str, batch_size: int) -> float:
        return float(n_samples if mode == "per_sample" else math.ceil(n_samples / batch_size))

    def _importance(
        self, run: Any, data: Any, mode: str, batch_size: int, order: str
    ) -> dict[str, torch.Tensor]:
        return fisher_information(run.model, self._ordered(data, order), batch_size, mode, run.dist)

    def _cache_experience(self, run: Any, exp: Any) -> None:
        cfg = self.config
        if len(exp.train) == 0 or exp.index in self.fisher_d_experiences:
            return
        data = self._ordered(exp.train, cfg.fisher_d_order)
        new, w_news = fisher_and_divisors(run.model, data, cfg.batch_size, cfg.fisher, run.dist)
        merged, weights = {}, {}
        for name, f in new.items():
            old, w_new = self.fisher_d.get(name), w_news[name]
            w_old = self.fisher_d_weights.get(name)
            if w_old is None:  # new, or cached by a version that kept one weight for all parameters
                w_old = self._legacy_weight(run, w_new, len(exp.train))
            weights[name] = w_new
            if old is None or w_old == 0:
                merged[name] = f
                continue
            if old.shape != f.shape:  # a grown head: its new rows had no importance before
                if old.dim() != f.dim() or any(
                    o > s for o, s in zip(old.shape, f.shape, strict=True)
                ):
                    merged[name] = f
                    continue
                grown = f.new_zeros(f.shape)
                grown[tuple(slice(0, s) for s in old.shape)] = old
                old = grown
            merged[name] = (old * w_old + f * w_new) / (w_old + w_new)
            weights[name] = w_old + w_new
        self.fisher_d, self.fisher_d_weights = merged, weights
        self.fisher_d_weight += self._weight(len(exp.train), cfg.fisher, cfg.batch_size)
        self.fisher_d_experiences.append(exp.index)

    def _legacy_weight(self, run: Any, w_new: float, n_new: int) -> float:
        """What a parameter's cached value is a mean over, for a cache written with
        one weight (``fisher_d_weight``: batches, or samples in per-sample mode):
        the batches of the cached experiences for a parameter that per-sample mode
        computes from batch gradients (its ``w_new`` is not the samples' count)."""
        cfg = self.config
        if cfg.fisher != "per_sample" or w_new == n_new:
            return self.fisher_d_weight
        return float(sum(math.ceil(len(run.stream[k].train) / cfg.batch_size) for k in self.fisher_d_experiences))

    def _cache_fits(
        self, run: Any, upto: int, fisher_f: dict[str, torch.Tensor], settings: dict[str, Any]
    ) -> str | None:
        """Why the cache cannot serve this request, or ``None`` when it can."""
        cfg = self.config
        if not self.fisher_d:
            return "no cached F_D" + ("" if cfg.cache else " (plugins.ssd.cache is off)")
        asked = (settings["fisher"], settings["batch_size"], settings["fisher_d_order"])
        if asked != (cfg.fisher, cfg.batch_size, cfg.fisher_d_order):
            return (
                f"the cache holds {cfg.fisher} importance with batch size {cfg.batch_size} "
                f"in {cfg.fisher_d_order} order"
            )
        if sorted(self.fisher_d_experiences) != list(range(upto)):
            return f"the cache covers experiences {self.fisher_d_experiences}, not 0 to {upto - 1}"
        wrong = [
            n
            for n, f in fisher_f.items()
            if n not in self.fisher_d or self.fisher_d[n].shape != f.shape
        ]
        if wrong:
            return f"the cache does not fit the model's parameters {wrong[:3]}"
        return None

    # ---------------------------------------------------------------- requests

    def _settings(self, request: dict[str, Any], where: str) -> dict[str, Any]:
        unknown = [k for k in request if k not in REQUEST_KEYS]
        if unknown:
            raise ConfigError(
                f"{where}: unknown request key(s) {unknown}; valid keys: {choices(REQUEST_KEYS)}"
            )
        cfg = self.config
        defaults = {
            "alpha": cfg.alpha, "lam": cfg.lam, "auto": cfg.auto, "target": cfg.target, "recompute": False,
            "fisher": cfg.fisher, "batch_size": cfg.batch_size, "fisher_d_order": cfg.fisher_d_order,
            "metrics": cfg.metrics,
        }  # fmt: skip
        s = {k: request[k] if request.get(k) is not None else d for k, d in defaults.items()}
        s["alpha"] = _check_number(f"{where}: alpha", s["alpha"])
        s["lam"] = _check_number(f"{where}: lam", s["lam"])
        s["target"] = _check_number(f"{where}: target", s["target"], 0.0, 1.0)
        if s["fisher"] not in FISHERS:
            raise ConfigError(
                f"{where}: fisher must be one of {choices(FISHERS)}, got {s['fisher']!r}"
            )
        if s["fisher_d_order"] not in ORDERS:
            raise ConfigError(
                f"{where}: fisher_d_order must be one of {choices(ORDERS)}, got {s['fisher_d_order']!r}"
            )
        if (
            isinstance(s["batch_size"], bool)
            or not isinstance(s["batch_size"], int)
            or s["batch_size"] < 1
        ):
            raise ConfigError(
                f"{where}: batch_size must be an integer >= 1, got {s['batch_size']!r}"
            )
        if s["auto"] and (request.get("alpha") is not None or request.get("lam") is not None):
            raise ConfigError(f"{where}: give either alpha and lam, or auto, not both")
        return s

    def _check_event(self, run: Any, k: int, event: ForgetEvent) -> None:
        where = f"plugins.ssd.forget[{k}]"
        if event.after >= len(run.stream):
            raise ConfigError(
                f"{where}.after is {event.after}, but the stream has {len(run.stream)} experiences"
            )
        self._settings(event.request(), where)
        if event.classes is not None and event.experience is not None:
            raise ConfigError(f"{where}: 'experience' selects where sample indices point; it needs 'samples'")
        upto = event.after + 1
        if event.classes is not None:
            fs.class_ids(run.stream, event.classes, upto, where)
        else:
            if event.experience is not None:
                if not 0 <= event.experience <= event.after:
                    raise ConfigError(
                        f"{where}.experience must be between 0 and after ({event.after}), got {event.experience}"
                    )
                size = len(run.stream[event.experience].train)
            else:
                size = sum(len(e.train) for e in run.stream.experiences[:upto])
            fs.sample_index(event.samples or [], size, where)

    def forget(self, run: Any, request: dict[str, Any], where: str = "unlearn") -> dict[str, Any]:
        """Run one request on ``run.model``; return its report (see docs/plugins/ssd.md).

        Everything is checked before a weight changes; on an error the model is left as it was.
        """
        settings = self._settings(request, where)
        t0 = time.perf_counter()
        sets = fs.resolve(run, request, where)
        t_resolve = time.perf_counter() - t0
        eval_bs = int(run.config.train.eval_batch_size)
        model = run.model

        def predict(b: Batch) -> torch.Tensor:
            return run.hook.predict(run=run, batch=b)

        def measure() -> dict[str, Any]:
            out = forgetting_metrics(
                model, predict, retain_test=sets.retain_test, forget_eval=sets.forget_eval,
                retain_train=sets.retain_train, test=sets.test, forget_train=sets.forget_train,
                batch_size=eval_bs, mia=True,
            )  # fmt: skip
            out["forget_train_accuracy"] = accuracy(model, predict, sets.forget_train, eval_bs)
            return out

        before = measure() if settings["metrics"] else None
        _sync(run.device)
        t1 = time.perf_counter()
        mode, bs = settings["fisher"], settings["batch_size"]
        fisher_f = self._importance(run, sets.forget_train, mode, bs, settings["fisher_d_order"])  # as F_D's
        t2 = time.perf_counter()
        reason = (
            "recompute was asked for"
            if settings["recompute"]
            else self._cache_fits(run, fs.n_seen(run), fisher_f, settings)
        )
        if reason is None:
            fisher_d, source = self.fisher_d, "cache"
        else:
            if len(sets.seen_train) == 0:
                raise DataError(f"{where}: {reason}, and no training data to compute F_D from")
            fisher_d = self._importance(run, sets.seen_train, mode, bs, settings["fisher_d_order"])
            source = f"computed ({reason})"
        _sync(run.device)
        t3 = time.perf_counter()
        params = {n: p for n, p in model.named_parameters() if n in fisher_f}
        original = {n: p.detach().clone() for n, p in params.items()}
        try:
            if settings["auto"]:
                alpha, lam, dampened, trials, reached = self._auto(
                    run, params, original, fisher_d, fisher_f, sets, settings, predict
                )
            else:
                alpha, lam = settings["alpha"], settings["lam"]
                dampened, trials, reached = (
                    dampen_(params, fisher_d, fisher_f, alpha, lam),
                    [],
                    None,
                )
        except ValueError as exc:  # non-finite importance or weights: dampen_ changed nothing
            self._restore(params, original)
            raise TrainingError(
                f"{where}: SSD cannot dampen the model ({exc}); the model is unchanged"
            ) from None
        except BaseException:
            self._restore(params, original)
            raise
        _sync(run.device)
        t4 = time.perf_counter()
        if not settings["auto"] and dampened == 0 and run.dist.is_main:
            n_d = 0.0
            if mode == "per_sample" and request.get("data") is None:  # the forget set is part of D
                n_d = self.fisher_d_weight if reason is None else len(sets.seen_train)
            _warn_nothing_selected(where, alpha, n_d, len(sets.forget_train))
        total = sum(p.numel() for p in params.values())
        report: dict[str, Any] = {
            "method": "ssd",
            **sets.described,
            "alpha": alpha,
            "lam": lam,
            "auto": bool(settings["auto"]),
            "fisher": mode,
            "batch_size": bs,
            "fisher_d_order": settings["fisher_d_order"],
            "fisher_d": source,
            "dampened": int(dampened),
            "dampened_fraction": dampened / max(total, 1),
            "seconds": t_resolve + (t4 - t1),
            "seconds_fisher_f": t2 - t1,
            "seconds_fisher_d": t3 - t2,
            "seconds_dampen": t4 - t3,
        }
        if settings["auto"]:
            report.update(target=settings["target"], target_reached=reached, trials=trials)
        after = measure() if settings["metrics"] else {}
        report.update(
            {
                k: after.get(k)
                for k in ("retain_accuracy", "forget_accuracy", "mia", "forget_train_accuracy")
            }
        )
        report["before"] = before
        return report

    def _auto(self, run, params, original, fisher_d, fisher_f, sets, settings, predict):  # type: ignore[no-untyped-def]
        """Weakest to strongest: no dampening, then alpha from large to small at
        lam = 1, then lam from large to small at the list's last alpha; each trial
        from the original weights. The first whose forget-set training accuracy is
        <= target is kept (else the last). A model that already meets the target
        is left as it is: alpha and lam are then ``None``."""
        cfg = self.config
        walk: list[tuple[float | None, float | None]] = [(None, None)]
        walk += [(float(a), 1.0) for a in cfg.auto_alphas]
        walk += [(float(cfg.auto_alphas[-1]), float(lam)) for lam in cfg.auto_lams]
        trials: list[dict[str, Any]] = []
        eval_bs = int(run.config.train.eval_batch_size)
        dampened = 0
        for k, (alpha, lam) in enumerate(walk):
            if k > 1:
                self._restore(params, original)
            dampened = 0 if alpha is None or lam is None else dampen_(params, fisher_d, fisher_f, alpha, lam)
            acc = accuracy(run.model, predict, sets.forget_train, eval_bs)
            trials.append(
                {
                    "alpha": alpha,
                    "lam": lam,
                    "forget_train_accuracy": acc,
                    "dampened": int(dampened),
                }
            )
            if acc is not None and acc <= settings["target"]:
                return alpha, lam, dampened, trials, True
        return walk[-1][0], walk[-1][1], dampened, trials, False

    @staticmethod
    @torch.no_grad()
    def _restore(params: dict[str, torch.Tensor], original: dict[str, torch.Tensor]) -> None:
        for n, p in params.items():
            p.copy_(original[n])

    def _announce(self, run: Any, report: dict[str, Any]) -> None:
        """Log a forget event (``on_metrics`` with ``kind: "unlearn"``) and write
        ``RUN_DIR/forget-events.json``."""
        flat = {
            k: report[k]
            for k in (
                "forget_accuracy",
                "retain_accuracy",
                "mia",
                "dampened_fraction",
                "seconds",
                "alpha",
                "lam",
            )
        }
        run.hook.on_metrics(
            run=run,
            metrics={
                "kind": "unlearn",
                "experience": report["after_experience"],
                "epoch": None,
                **flat,
            },
        )
        if run.out_dir is not None and run.dist.is_main:
            try:
                write_atomic(
                    run.out_dir / "forget-events.json", json.dumps(self.reports, indent=2) + "\n"
                )
            except OSError as exc:
                raise ContlearnError(
                    f"cannot write forget-events.json in '{run.out_dir}': {exc}"
                ) from None

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """The cached F_D (by parameter name), what it covers, and the reports of the forget events done."""
        return {
            "fisher_d": dict(self.fisher_d),
            "fisher_d_weight": self.fisher_d_weight,
            "fisher_d_weights": dict(self.fisher_d_weights),
            "fisher_d_experiences": list(self.fisher_d_experiences),
            "reports": json.loads(json.dumps(self.reports)),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.fisher_d = dict(state["fisher_d"])
        self.fisher_d_weight = float(state["fisher_d_weight"])
        self.fisher_d_weights = {str(n): float(w) for n, w in state.get("fisher_d_weights", {}).items()}
        self.fisher_d_experiences = [int(i) for i in state["fisher_d_experiences"]]
        self.reports = list(state["reports"])


def _refuse_what_cannot_unlearn(run: Any) -> None:
    """:raises PluginError: a plugin keeps what SSD would have to dampen out of the
    model (its ``cannot_unlearn`` says why): dampening could not forget."""
    for name in declaring(run, "cannot_unlearn"):
        raise PluginError(f"ssd dampens the model's parameters and cannot make a run with plugin {name!r} "
                          f"forget: {run.plugins[name].cannot_unlearn}")
