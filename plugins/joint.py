"""Joint (cumulative) training: each experience trains on all the data seen so far.

The upper bound of rehearsal: experience i trains on the training data of
experiences 0..i together (the ``train_data`` hook), continuing from the model
of the previous experience, as the "cumulative" baseline of continual-learning
benchmarks (e.g. Lomonaco and Maltoni, CORe50, CoRL 2017; van de Ven et al.,
"Three types of incremental learning", Nature Machine Intelligence 2022).
After the last experience the model has been trained on the whole stream, so
its final accuracy is the usual upper bound for a sequential learner with the
same model and epochs per experience (joint sees more data per experience:
experience i trains on i + 1 experiences' samples).
"""

from __future__ import annotations

from typing import Any

from contlearn.scenarios import TensorData

from contlearn.hookspecs import hookimpl


class Joint:
    """Cumulative training on all data seen so far (the upper bound)."""

    @hookimpl
    def train_data(self, run: Any, exp: Any) -> TensorData:
        seen = [e.train for e in run.stream.experiences[: exp.index + 1]]
        return TensorData.concat(seen) if len(seen) > 1 else seen[0]

    def state_dict(self) -> dict[str, Any]:
        """Nothing: the data seen so far is the stream's, up to the current experience."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
