"""Training: recipes, the model resolver, stages and the `dialogrl` command.

Imports `dialogrl.data` and `dialogrl.evaluation`; nothing imports it.
"""
