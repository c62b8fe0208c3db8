"""DSPy programs and the tasks they run on (data, splits, metrics), plus the embedded tiny model's recipe.

``programs.tasks.last_digit`` is the embedded default task; ``programs.embedded.tiny_policy()`` builds (once)
and loads the tiny model warm-started on it.
"""
