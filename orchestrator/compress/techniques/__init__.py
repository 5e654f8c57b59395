"""The compression techniques, one family per module; each registers its handlers with
``orchestrator.compress.technique.register`` when imported (the registry imports them all)."""
