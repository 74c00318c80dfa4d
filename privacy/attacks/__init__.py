"""Attacks that test the privacy claims: gradient inversion, membership inference, audits.

Usable without fedsim: each attack takes what the adversary sees (an update, a model)
and pure functions that describe the victim's computation.
"""
