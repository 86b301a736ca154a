"""Training and evaluation loops, checkpoints and resume, DDP, AMP: one run into its run folder
(docs/interfaces.md, "The run folder"), stopped cleanly by signals, replayed exactly on resume.

- :mod:`~hcformer.engine.train`: ``hcformer train`` / :func:`~hcformer.engine.train.train`;
- :mod:`~hcformer.engine.evaluate`: ``hcformer evaluate`` / :func:`~hcformer.engine.evaluate.evaluate`;
- :mod:`~hcformer.engine.signals`: :func:`~hcformer.engine.signals.request_stop` (save at the next
  iteration boundary and stop) and :func:`~hcformer.engine.signals.save_now` for launchers;
- :mod:`~hcformer.engine.benchmark`: ``hcformer benchmark-train``;
- :mod:`~hcformer.engine.checkpoint`, :mod:`~hcformer.engine.randomness`,
  :mod:`~hcformer.engine.distributed`, :mod:`~hcformer.engine.optim`,
  :mod:`~hcformer.engine.predictions`, :mod:`~hcformer.engine.runinfo` (the config and run info
  of a run folder; the folder itself: :mod:`hcformer.runfolder`).

Submodules import torch; this package itself imports nothing heavy.
"""
