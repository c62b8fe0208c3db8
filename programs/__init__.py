"""DSPy programs and the tasks they run on (data, splits, rubrics).

Programs run on any ``dspy.LM`` and import nothing from ``rl``; the embedded models built from this task data live
in ``embedded``.

``programs.registry.get_task(name)`` returns a registered task (``last_digit``, ``rg_*``, ``gsm``, ``multihop``,
``react_tools``, ``file``...; see ``programs/README.md``). ``programs.tasks.last_digit`` is the embedded default
task; ``embedded.tiny_policy()`` loads the tiny model warm-started on it.
"""
