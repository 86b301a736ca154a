"""Training and evaluation loops, checkpoints and resume, DDP, AMP: one run into its run folder
(docs/interfaces.md, "The run folder"), stopped cleanly by signals, replayed exactly on resume.

The contract is two calls on a run folder created by :func:`hcformer.launch.create.create_run`
(it holds the resolved config; the engine never reads the paper's tables):

- :func:`hcformer.engine.train.train` ``(run_dir)``: train or resume it;
- :func:`hcformer.engine.evaluate.evaluate` ``(run_dir)``: score it, write ``metrics.json``;

and the modules they use:

- :mod:`~hcformer.engine.signals`: :func:`~hcformer.engine.signals.request_stop` (save at the next
  iteration boundary and stop) and :func:`~hcformer.engine.signals.save_now` for launchers;
- :mod:`~hcformer.engine.benchmark`: what ``hcformer benchmark-train`` times;
- :mod:`~hcformer.engine.checkpoint`, :mod:`~hcformer.engine.randomness`,
  :mod:`~hcformer.engine.distributed`, :mod:`~hcformer.engine.optim`,
  :mod:`~hcformer.engine.predictions`, :mod:`~hcformer.engine.runinfo` (reading the config and
  run info of a run folder; the folder itself: :mod:`hcformer.runfolder`).

Submodules import torch; this package itself imports nothing heavy.
"""
