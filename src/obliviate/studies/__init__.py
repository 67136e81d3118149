"""Studies: multi-run experiments that answer one question each.

- :mod:`obliviate.studies.id_ood`: unlearning in- vs out-of-distribution examples (Baluta et al.
  2024, arXiv 2411.04388), ``obliviate study id-ood``.
"""
