"""A Hugging Face ``TrainerCallback`` that runs a ``fitcli.Tracker`` during ``Trainer.train``.

>>> from fitcli.integrations.hf import FitcliTrainerCallback
>>> trainer = Trainer(model, args, train_dataset=ds, callbacks=[FitcliTrainerCallback("history.jsonl", every=50)])

The tracker is attached to the model when training begins and removed when it ends. Its steps
are the Trainer's optimizer steps (``state.global_step``): step k's record covers the batches of
the k-th optimizer step, accumulated batches included. Evaluation runs in eval mode and is not
observed. The Trainer divides the loss by ``gradient_accumulation_steps`` and models average it
over their samples (or tokens): pass ``loss_reduction``/``loss_scale`` to match (see
``fitcli.Tracker``); by default the loss is taken as the batch mean, and ``loss_scale`` is
1/``gradient_accumulation_steps``.
"""

from __future__ import annotations

from typing import Any

try:
    from transformers import TrainerCallback
except ImportError as e:  # pragma: no cover - transformers is an optional extra
    raise ImportError("fitcli.integrations.hf needs transformers: pip install transformers") from e

from fitcli.tracker import Tracker


class FitcliTrainerCallback(TrainerCallback):
    """``history``, ``every`` and further keyword arguments are ``fitcli.Tracker``'s."""

    def __init__(self, history: Any = None, *, every: int = 1, **tracker_options: Any):
        self.history, self.every, self.options = history, every, tracker_options
        self.tracker: Tracker | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        options = dict(self.options)
        if "loss_scale" not in options:  # the Trainer divides the loss by the accumulation steps
            options["loss_scale"] = 1.0 / int(getattr(args, "gradient_accumulation_steps", 1) or 1)
        self.tracker = Tracker(model, self.history, every=self.every, **options)
        self.tracker.steps = int(state.global_step)  # a resumed run keeps its step numbers

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.tracker is not None:
            self.tracker.step()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.tracker is not None:
            tracker, self.tracker = self.tracker, None
            tracker.close()


__all__ = ["FitcliTrainerCallback"]
