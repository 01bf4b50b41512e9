"""Training: recipes (recipe.py), data (data.py), the TRL trainer (trainer.py), evaluation
(evaluate.py) and the embedded demo (demo.py). Builds on qvera.core and qvera.adapters."""
