"""Multi-hop question answering over the bundled fictional corpus: query -> retrieve -> query -> retrieve -> answer.

Why: a program with several distinct predictors (two query writers and an answerer) is what the weight stage's
per-(example, predictor) advantage groups are for, and what a prompt stage must optimise jointly. The corpus is
invented (:mod:`programs.tasks.world`), so the answer must come from retrieval, never from memory: "In which
country is Vialem Industries headquartered?" needs the company's passage (its city) and then the city's passage
(its country).

Rubric: normalised exact match of the answer (gated on format, weight 3), format validity (1) and the recall of
the two gold passages among those retrieved (1): a shaped signal for the query writers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import dspy

from metrics import ExactMatch, FormatValidity, Rubric
from metrics.base import ComponentResult, get_field
from programs.tasks.corpus import Retriever, count_option, default_retriever, question_loader

__all__ = ["KINDS", "OneHopQA", "RetrievalRecall", "TwoHopQA", "rubric", "task"]

KINDS = ("company_city", "founder_birthplace", "birthplace_river", "company_country")


class FirstQuery(dspy.Signature):
    """Write a short search query that finds the first fact needed to answer the question."""

    question: str = dspy.InputField()
    search_query: str = dspy.OutputField()


class SecondQuery(dspy.Signature):
    """Given what the first search found, write a short search query for the missing fact."""

    question: str = dspy.InputField()
    context: list[str] = dspy.InputField(desc="passages found so far")
    search_query: str = dspy.OutputField()


class Answer(dspy.Signature):
    """Answer the question with a short name taken from the passages."""

    question: str = dspy.InputField()
    context: list[str] = dspy.InputField(desc="retrieved passages")
    answer: str = dspy.OutputField()


class TwoHopQA(dspy.Module):
    """Three distinct predictors: ``first_query`` -> search -> ``second_query`` -> search -> ``answer``.

    Returns the answer with what was retrieved (``retrieved_ids``, ``queries``) so the rubric can score retrieval.
    """

    def __init__(self, k: int = 3, retriever: Retriever | None = None, reason: bool = True) -> None:
        super().__init__()
        self.k = k
        self.retriever = retriever
        self.first_query = dspy.Predict(FirstQuery)
        self.second_query = dspy.Predict(SecondQuery)
        self.answer = dspy.ChainOfThought(Answer) if reason else dspy.Predict(Answer)

    def _search(self, query: str) -> list:
        return (self.retriever or default_retriever()).search(query, k=self.k)

    def forward(self, question: str) -> dspy.Prediction:
        q1 = self.first_query(question=question).search_query
        hop1 = self._search(q1)
        q2 = self.second_query(question=question, context=[str(p) for p in hop1]).search_query
        passages = list({p.id: p for p in hop1 + self._search(q2)}.values())
        pred = self.answer(question=question, context=[str(p) for p in passages])
        return dspy.Prediction(answer=pred.answer, reasoning=pred.get("reasoning"), queries=[q1, q2],
                               retrieved_ids=[p.id for p in passages])


class OneHopQA(dspy.Module):
    """Baseline: retrieve with the question itself, then answer (one predictor)."""

    def __init__(self, k: int = 3, retriever: Retriever | None = None) -> None:
        super().__init__()
        self.k = k
        self.retriever = retriever
        self.answer = dspy.Predict(Answer)

    def forward(self, question: str) -> dspy.Prediction:
        passages = (self.retriever or default_retriever()).search(question, k=self.k)
        pred = self.answer(question=question, context=[str(p) for p in passages])
        return dspy.Prediction(answer=pred.answer, queries=[question], retrieved_ids=[p.id for p in passages])


class RetrievalRecall:
    """Rubric component: the share of the example's ``gold_ids`` among the prediction's ``retrieved_ids``."""

    name = "retrieval_recall"

    def __call__(self, example: Any, prediction: Any, trace: Any = None) -> ComponentResult:
        gold = list(example["gold_ids"])
        got = get_field(prediction, "retrieved_ids", None) or []
        found = [g for g in gold if g in set(got)]
        missing = [g for g in gold if g not in set(got)]
        return ComponentResult(len(found) / len(gold), f"gold passages not retrieved: {missing}" if missing else "")

    def __repr__(self) -> str:
        return "RetrievalRecall()"


def rubric() -> Rubric:
    """Exact match (3, gated on format) + format (1) + retrieval recall of the gold passages (1)."""
    return Rubric([ExactMatch("answer", normalize=True, name="correct"), FormatValidity(["answer"]),
                   RetrievalRecall()], weights={"correct": 3, "format": 1, "retrieval_recall": 1},
                  gates={"correct": "format"}, name="multihop")


def _example(row: dict) -> dspy.Example:
    return dspy.Example(question=row["question"], answer=row["answer"], gold_ids=row["gold_ids"],
                        gold_queries=row["gold_queries"], kind=row["kind"], id=row["id"]).with_inputs("question")


def task(k: int = 3, kinds: Sequence[str] = KINDS):
    """The registered ``multihop`` task: ``k`` passages per search; ``kinds`` restricts the question types.

    1200 questions about 300 founder/company pairs; splits hash the pair, so a test question is about a pair no
    training question is about.
    """
    from programs.registry import Task

    loader = question_loader("multihop", "multihop.jsonl", kinds, KINDS, _example)
    count_option(k, "multihop k (passages per search)")

    return Task(
        name="multihop",
        description="Two-hop questions over a bundled fictional corpus (BM25 retrieval; 3 predictors)",
        loader=loader,
        programs={"two_hop": lambda: TwoHopQA(k=k), "two_hop_predict": lambda: TwoHopQA(k=k, reason=False),
                  "one_hop": lambda: OneHopQA(k=k)},
        rubric_factory=rubric,
        default_program="two_hop",
        gold_metric=Rubric([ExactMatch("answer", normalize=True, name="correct")], name="multihop_gold"),
        options={"k": k, "kinds": list(kinds)},
    )
