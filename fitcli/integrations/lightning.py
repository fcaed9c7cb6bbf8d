"""A PyTorch Lightning callback that runs a ``fitcli.Tracker`` during ``Trainer.fit``.

>>> from fitcli.integrations.lightning import FitcliCallback
>>> trainer = Trainer(callbacks=[FitcliCallback("history.jsonl", every=50)])

The tracker is attached to the LightningModule (or to ``getattr(module, attr)`` with ``attr``,
when ``training_step`` calls an inner model directly instead of ``self(...)``) when training
starts, and removed when it ends (or fails). Its steps are the optimizer steps
(``trainer.global_step``): step k's record covers the batches of the k-th optimizer step,
accumulated batches included. Validation and sanity-check forwards run in eval mode and are not
observed.
"""

from __future__ import annotations

from typing import Any

try:
    from lightning.pytorch import Callback
except ImportError:  # pragma: no cover - depends on which distribution is installed
    try:
        from pytorch_lightning import Callback
    except ImportError as e:
        raise ImportError("fitcli.integrations.lightning needs PyTorch Lightning: "
                          "pip install lightning (or pytorch-lightning)") from e

from fitcli.tracker import Tracker


class FitcliCallback(Callback):
    """``history``, ``every`` and further keyword arguments are ``fitcli.Tracker``'s."""

    def __init__(self, history: Any = None, *, every: int = 1, attr: str | None = None, **tracker_options: Any):
        super().__init__()
        self.history, self.every, self.attr, self.options = history, every, attr, tracker_options
        self.tracker: Tracker | None = None
        self._seen = 0  # trainer.global_step when the tracker last advanced

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        model = getattr(pl_module, self.attr) if self.attr else pl_module
        self.tracker = Tracker(model, self.history, every=self.every, **self.options)
        self.tracker.steps = self._seen = int(trainer.global_step)  # a resumed run keeps its step numbers

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.tracker is None:
            return
        while self._seen < int(trainer.global_step):  # an optimizer step ended (not on accumulation)
            self._seen += 1
            self.tracker.step()

    def _close(self) -> None:
        if self.tracker is not None:
            tracker, self.tracker = self.tracker, None
            tracker.close()

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._close()


__all__ = ["FitcliCallback"]
