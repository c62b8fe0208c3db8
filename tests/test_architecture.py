"""The package import graph, computed from the code with ``ast``, against the diagram in docs/architecture.md.

Why: the layering (programs run on any dspy.LM; metrics is the bottom; experiments is the top) is what lets a
newcomer read one package without the others, and it erodes one convenient import at a time. The diagram in the doc
is generated from the code (``.venv/bin/python -m tests.test_architecture`` prints it) and these tests fail when
the code grows an arrow the diagram does not draw, or the diagram keeps one the code no longer has. Every import
counts: module level, inside functions (lazy) and under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("programs", "metrics", "embedded", "rl", "optimizers", "experiments")
DOC = ROOT / "docs" / "architecture.md"


def import_graph() -> dict[tuple[str, str], list[str]]:
    """``{(importer, imported): [files that import it]}`` between our packages (self-imports left out)."""
    edges: dict[tuple[str, str], list[str]] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top in PACKAGES and top != package:
                        files = edges.setdefault((package, top), [])
                        if str(path.relative_to(ROOT)) not in files:
                            files.append(str(path.relative_to(ROOT)))
    return edges


def mermaid(edges: dict[tuple[str, str], list[str]]) -> str:
    """The diagram as it appears in docs/architecture.md: one ``a --> b`` line per arrow, sorted."""
    lines = ["```mermaid", "graph TD"]
    lines += [f"    {a} --> {b}" for a, b in sorted(edges)]
    return "\n".join([*lines, "```"])


def documented_arrows() -> set[tuple[str, str]]:
    """The arrows of the mermaid block in docs/architecture.md."""
    block = re.search(r"```mermaid\n(.*?)```", DOC.read_text(), re.S)
    assert block, f"{DOC} has no ```mermaid block"
    return set(re.findall(r"^\s*(\w+)\s*-->\s*(\w+)\s*$", block.group(1), re.M))


def test_the_code_has_no_import_arrow_the_diagram_does_not_draw():
    edges = import_graph()
    undrawn = {arrow: files for arrow, files in edges.items() if arrow not in documented_arrows()}
    assert not undrawn, (
        f"imports the diagram in docs/architecture.md does not draw: {undrawn}; remove the import, or (if the new "
        "arrow is right) regenerate the diagram with `.venv/bin/python -m tests.test_architecture` and say why in "
        "the doc")


def test_the_diagram_draws_no_arrow_the_code_lacks():
    stale = documented_arrows() - set(import_graph())
    assert not stale, f"docs/architecture.md draws arrows no code has: {sorted(stale)}; regenerate the diagram"


def test_programs_run_on_any_dspy_lm():
    """Task data and programs import only metrics (their rubrics): no policy, no embedded model, no optimizer."""
    edges = import_graph()
    assert not {b for a, b in edges if a == "programs"} - {"metrics"}, {k: v for k, v in edges.items()
                                                                      if k[0] == "programs"}


def test_metrics_is_the_bottom_and_nothing_imports_experiments():
    edges = import_graph()
    assert not [arrow for arrow in edges if arrow[0] == "metrics"], "metrics imports nothing of ours"
    assert not [arrow for arrow in edges if arrow[1] == "experiments"], "experiments is the top: nothing imports it"


if __name__ == "__main__":
    print(mermaid(import_graph()))
