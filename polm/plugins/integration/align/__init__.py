"""``align``: LLaVA's first stage, training connectors on captions with the language model frozen."""
