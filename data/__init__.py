"""Dialogue data: formats, validation, chat-template tokenisation, corpora, constraints, builders.

Imports neither `dialogrl.evaluation` nor `dialogrl.training`.
"""
