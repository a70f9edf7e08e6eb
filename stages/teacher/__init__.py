"""Stage one: frozen teachers (captioner, LanguageBind) run once per sample into the cache."""
