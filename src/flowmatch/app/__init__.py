"""The application layer: what the ``flowmatch`` command does with a run.

It alone knows the run config schema (:mod:`~flowmatch.app.config`), the presets, the objective
registry (:mod:`~flowmatch.app.objectives`), run folders (:mod:`~flowmatch.app.run_folder`),
how a config becomes live objects (:mod:`~flowmatch.app.build`), trained runs
(:mod:`~flowmatch.app.runs`), training (:mod:`~flowmatch.app.training`) and evaluation
(:mod:`~flowmatch.app.evaluation`). The library (paths, couplings, losses, solvers, nets, data,
metrics, training) never imports it.
"""
