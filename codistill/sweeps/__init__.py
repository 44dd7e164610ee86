"""Sweeps and experiments: many whole runs as Ray Tune trials.

    settings.py      a sweep file: the job, its `search:` domains and `tune:` settings (SweepConfig)
    trial.py         one trial: a run whose rounds are Tune's iterations, with checkpoints
    tune.py          run_sweep and `python -m codistill.tune`
    stop_signals.py  Ctrl-C during a sweep
    experiment/      arms x seeds over run_sweep, with spreads and paired differences (`python -m codistill.experiment`)

Imports flow one way: experiment -> tune -> settings, trial, stop_signals; the trial never imports the runner.
"""
