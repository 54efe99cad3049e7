"""The paper's experiments: training runs, comparisons, profiles, sweeps and plans.

Each experiment measures, stores its results (JSON/CSV + its config) in a run folder,
and leaves plotting to :mod:`thermokfac.plots`.
"""
