"""Bit allocation: per-layer error tables, the rules that turn them into bit-widths
(QEM, and the budget rule with its exact knapsack solver), and :class:`BitConfig`
with its strict file parser.

Named for what it does rather than ``search``: ``mixquant.search`` is the public
function (:mod:`mixquant.api.search`), and a subpackage of the same name would be
shadowed by it. Imports :mod:`mixquant.core`, :mod:`mixquant.nn` and
:mod:`mixquant.io.files` only.
"""
