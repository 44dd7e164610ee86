"""`python -m codistill.experiment`: the experiment command, kept where the README and scripts call it
(codistill/sweeps/experiment)."""
