"""DSPy programs and the tasks they run on (data, splits, rubrics), plus the embedded tiny model's recipe.

``programs.registry.get_task(name)`` returns a registered task (``last_digit``, ``rg_*``, ``gsm``, ``multihop``,
``react_tools``, ``file``...; see ``programs/README.md``). ``programs.tasks.last_digit`` is the embedded default
task; ``programs.embedded.tiny_policy()`` builds (once) and loads the tiny model warm-started on it.
"""
