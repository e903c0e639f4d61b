"""Files: safe writing and reading (:mod:`.files`), strict JSON
(:mod:`.strict_json`), loading a user's model (:mod:`.models`), and
export/load of quantized models with packed weights (:mod:`.export`).

:mod:`.files`, :mod:`.strict_json` and :mod:`.models` import nothing else of
the package, so every room may use them; :mod:`.export` sits above :mod:`mixquant.api`. This
``__init__`` imports nothing, so that using one never loads the other.
"""
