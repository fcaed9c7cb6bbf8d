"""Thin adapters running a ``fitcli.Tracker`` inside training frameworks (optional extras):

- ``fitcli.integrations.lightning.FitcliCallback``: a PyTorch Lightning ``Callback``
  (``lightning.pytorch`` or ``pytorch_lightning``);
- ``fitcli.integrations.hf.FitcliTrainerCallback``: a Hugging Face ``transformers.TrainerCallback``.

Each module imports its framework when imported; this package imports neither.
"""
