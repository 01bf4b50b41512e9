"""The engine: VeRA's math (vera.py), attaching it to a model (attach.py), bitsandbytes'
quirks (bnb.py), loading a base (base.py) and the configs that describe both (config.py).
Imports nothing from the rest of qvera."""
