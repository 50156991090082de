"""The labels convention, owned by the data side that makes labels (`chat.py`, `packing.py`).

`labels[t]` is the token that should follow `input_ids[t]`, or IGNORE_INDEX where no loss is
taken (a prompt token, a pad). -100 is the value every Hugging Face tool and
`F.cross_entropy(ignore_index=...)` share. The loss (`loss.py`) and the kernels read it from here.
"""

from __future__ import annotations

from torch import Tensor

IGNORE_INDEX = -100


def count_trained_tokens(labels: Tensor) -> int:
    """How many positions carry a loss: the normaliser N of the loss (see loss.py)."""
    return int((labels != IGNORE_INDEX).sum())
