"""Multi-round adherence evaluation: rollouts, user sources, metrics, reports.

Imports `dialogrl.data`, never `dialogrl.training`.
"""
