"""Fine-tuning: plain sequential training, the lower bound of every benchmark.

Each experience is trained with the default loss and optimizer, with nothing
done against forgetting. In class-incremental streams it forgets almost all
earlier classes (McCloskey and Cohen, 1989; French, 1999).
"""

from __future__ import annotations


class Finetune:
    """Sequential fine-tuning: adds no behaviour to the defaults."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
