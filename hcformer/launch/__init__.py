"""Launchers: one job per run that trains then evaluates (docs/pipeline.md, "One run").

- :mod:`hcformer.launch.create`: creating a run folder, the one place a config is resolved
  (:func:`~hcformer.launch.create.create_run`);
- :mod:`hcformer.launch.run`: what ``hcformer run`` does (create, submit through a launcher,
  wait);
- :mod:`hcformer.launch.job`: what a job runs (:class:`~hcformer.launch.job.RunJob`, submitit's
  checkpointable callable);
- :mod:`hcformer.launch.executors`: submitit's ``slurm`` and ``local`` executors, SLURM options,
  waiting on a job;
- :mod:`hcformer.launch.campaign`, :mod:`hcformer.launch.scheduler`: restarting the campaign, one
  ``squeue`` for every waiting run.

They read and write run folders (``job.json``, the lock) through :mod:`hcformer.runfolder`.

Nothing here imports torch: the process that submits and waits stays small.
"""
