"""The public operations: :func:`~mixquant.search` / :func:`~mixquant.uniform`
(:mod:`.search`) and :func:`~mixquant.quantize` / :func:`~mixquant.quant_info`
(:mod:`.quantize`), which tie the rooms below together.
"""
