"""The bundled corpus: a small fictional world (people, companies, cities, countries) and questions about it.

Why fictional and generated: a multi-hop or tool-use task is only a test of retrieval and reasoning when the
model cannot answer from memory, and a generated world has no licence to track. The generator is
deterministic; its output is shipped in ``programs/corpus/`` (so loading needs no generation) and a test checks
that regenerating gives the same bytes. Regenerate after changing this file with::

    python -m programs.tasks.world

Files (JSON lines):
    passages.jsonl   {"id", "title", "text"}: one short passage per person, company, city and country.
    multihop.jsonl   {"id", "group", "kind", "question", "answer", "gold_ids", "gold_queries"}: two-hop questions;
                     hop i needs passage ``gold_ids[i]``, which BM25 finds for query ``gold_queries[i]``.
    tools.jsonl      {"id", "group", "kind", "question", "answer", "gold_calls", "gold_steps"}: questions needing
                     lookups, arithmetic or a unit conversion; ``gold_calls`` is one correct sequence of tool calls.

``group`` names the founder/company pair a question is about: splits hash the group, so every question about one
pair lands in the same split, in both tasks (a test question's main entities were never trained on).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

CORPUS_DIR = Path(__file__).resolve().parent.parent / "corpus"
FILES = ("passages.jsonl", "multihop.jsonl", "tools.jsonl")
SEED = 0
SIZES = {"countries": 12, "cities": 60, "people": 300}  # one company per person
FEET_PER_METER = 3.28084

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr", "tr",
           "st", "sh", "th", "pl", "fl", "cl", "h", "j", "w"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou", "ia", "eo"]
_CODAS = ["", "", "", "n", "r", "l", "s", "m", "th", "x"]
_PROFESSIONS = ["chemist", "engineer", "painter", "economist", "architect", "physician", "geologist", "baker",
                "pilot", "lawyer", "botanist", "teacher"]
_INDUSTRIES = ["shipping", "software", "textile", "mining", "food", "energy", "publishing", "robotics",
               "glassware", "insurance"]
_SUFFIXES = ["Labs", "Works", "Holdings", "Industries", "Partners", "Group", "Collective", "Trading"]


@dataclass
class World:
    passages: list[dict]
    multihop: list[dict]
    tools: list[dict]


def invented_word(rng: random.Random, syllables: int) -> str:
    """One invented capitalised word of ``syllables`` syllables, as every name of a world is made."""
    parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)]
    return ("".join(parts) + rng.choice(_CODAS)).capitalize()


def _names(rng: random.Random, n: int, syllables: tuple[int, int], used: set[str], suffix: str = "") -> list[str]:
    """``n`` invented words, unique across the whole world (so each name is a precise BM25 query)."""
    out = []
    while len(out) < n:
        name = invented_word(rng, rng.randint(*syllables)) + suffix
        if name.lower() not in used and len(name) >= 4:
            used.add(name.lower())
            out.append(name)
    return out


def build(seed: int = SEED) -> World:
    """Generate the world and its questions (pure function of ``seed``)."""
    rng = random.Random(f"world/{seed}")
    countries, cities, people, companies = _entities(rng)  # every random draw of the world
    city_of = {c["name"]: c for c in cities}
    passages, ids = _passages(countries, cities, people, companies)
    multihop = _per_pair(people, companies, lambda i, p, c: _multihop_questions(p, c, city_of, ids))
    tools = _per_pair(people, companies, lambda i, p, c: _tool_questions(i, p, c, companies, city_of))
    # Questions of one world are distinct; ids are stable positions (kind-prefixed, so adding kinds appends).
    for i, q in enumerate(multihop):
        q["id"] = f"mh{i:05d}"
    for i, q in enumerate(tools):
        q["id"] = f"tq{i:05d}"
        q["gold_steps"] = len(q["gold_calls"]) + 1  # the tool calls, then "finish"
    return World(passages, multihop, tools)


def _entities(rng: random.Random) -> tuple[list[str], list[dict], list[dict], list[dict]]:
    """The countries, cities, people and companies (one per person, founded by them), drawn from ``rng`` in a fixed
    order: the shipped corpus is these draws, so reordering them changes every file."""
    used: set[str] = set()
    countries = _names(rng, SIZES["countries"], (2, 3), used, suffix="ia")
    rivers = _names(rng, 25, (2, 2), used)
    cities = [{"name": name, "country": rng.choice(countries), "river": rng.choice(rivers),
               "elevation": rng.randint(5, 2400)} for name in _names(rng, SIZES["cities"], (2, 3), used)]
    firsts = _names(rng, 60, (2, 2), used)
    lasts = _names(rng, SIZES["people"], (2, 3), used)
    people, companies = [], []
    for last, company_word in zip(lasts, _names(rng, SIZES["people"], (2, 3), used), strict=True):
        born = rng.randint(1900, 1990)
        person = {"name": f"{rng.choice(firsts)} {last}", "profession": rng.choice(_PROFESSIONS),
                  "birth_city": rng.choice(cities)["name"], "born": born}
        company = {"name": f"{company_word} {rng.choice(_SUFFIXES)}", "industry": rng.choice(_INDUSTRIES),
                   "city": rng.choice(cities)["name"], "founded": born + rng.randint(20, 45),
                   "employees": rng.randint(12, 9000), "founder": person["name"]}
        person["company"] = company["name"]
        people.append(person)
        companies.append(company)
    return countries, cities, people, companies


def _passages(countries: list[str], cities: list[dict], people: list[dict],
              companies: list[dict]) -> tuple[list[dict], dict[str, str]]:
    """One passage per person, company, city and country (in that order), and the passage id of each title."""
    capitals = {}
    for c in cities:
        capitals.setdefault(c["country"], c["name"])
    passages = []
    ids: dict[str, str] = {}

    def add(title: str, text: str) -> None:
        ids[title] = f"p{len(passages):04d}"
        passages.append({"id": ids[title], "title": title, "text": text})

    for p in people:
        article = "an" if p["profession"][0] in "aeiou" else "a"
        add(p["name"], f"{p['name']} is {article} {p['profession']} born in {p['birth_city']} in {p['born']}. "
                       f"{p['name'].split()[0]} founded {p['company']}.")
    for c in companies:
        article = "an" if c["industry"][0] in "aeiou" else "a"
        add(c["name"], f"{c['name']} is {article} {c['industry']} company headquartered in {c['city']}. It was founded "
                       f"in {c['founded']} by {c['founder']} and employs {c['employees']} people.")
    for c in cities:
        add(c["name"], f"{c['name']} is a city in {c['country']} on the {c['river']} river, at an elevation of "
                       f"{c['elevation']} meters.")
    for country in countries:
        add(country, f"{country} is a country whose capital is {capitals.get(country, 'not recorded')}.")
    return passages, ids


def _per_pair(people: list[dict], companies: list[dict],
              questions: Callable[[int, dict, dict], list[dict]]) -> list[dict]:
    """``questions(i, person, company)`` for every founder/company pair, each tagged with the pair's ``group``."""
    rows = []
    for i, (p, c) in enumerate(zip(people, companies, strict=True)):
        group = {"group": f"g{i:04d}"}
        rows += [{**group, **q} for q in questions(i, p, c)]
    return rows


def _multihop_questions(p: dict, c: dict, city_of: dict[str, dict], ids: dict[str, str]) -> list[dict]:
    """The two-hop questions about person ``p`` and their company ``c``: each hop's passage is the one titled by
    the name the hop searches for."""
    born = city_of[p["birth_city"]]
    hq = city_of[c["city"]]

    def two_hop(kind: str, question: str, answer: str, first: str, second: str) -> dict:
        return {"kind": kind, "question": question, "answer": answer, "gold_ids": [ids[first], ids[second]],
                "gold_queries": [first, second]}

    return [
        two_hop("company_city", f"In which city is the company founded by {p['name']} headquartered?", c["city"],
                p["name"], c["name"]),
        two_hop("founder_birthplace", f"In which city was the founder of {c['name']} born?", p["birth_city"],
                c["name"], p["name"]),
        two_hop("birthplace_river", f"Which river flows through the city where {p['name']} was born?",
                born["river"], p["name"], born["name"]),
        two_hop("company_country", f"In which country is {c['name']} headquartered?", hq["country"],
                c["name"], hq["name"]),
    ]


def _tool_questions(i: int, p: dict, c: dict, companies: list[dict], city_of: dict[str, dict]) -> list[dict]:
    """The tool-use questions about pair ``i`` (person ``p``, company ``c``; a second company is picked by
    position), with one correct sequence of tool calls each."""
    other = companies[(i * 7 + 3) % len(companies)]
    if other is c:
        other = companies[(i + 1) % len(companies)]
    early, late = sorted((c, other), key=lambda x: (x["founded"], x["name"]))
    city = city_of[c["city"]]
    feet = round(city["elevation"] * FEET_PER_METER, 1)
    gap, total = late["founded"] - early["founded"], c["employees"] + other["employees"]
    return [
        {"kind": "founding_gap", "question": f"How many years after {early['name']} was {late['name']} founded?",
         "answer": str(gap), "gold_calls": [
             {"tool": "lookup", "args": {"name": early["name"]}},
             {"tool": "lookup", "args": {"name": late["name"]}},
             {"tool": "calculator", "args": {"expression": f"{late['founded']} - {early['founded']}"}}]},
        {"kind": "elevation_feet", "question": f"What is the elevation of {city['name']} in feet?",
         "answer": f"{feet:g}", "gold_calls": [
             {"tool": "lookup", "args": {"name": city["name"]}},
             {"tool": "convert_units", "args": {"value": city["elevation"], "from_unit": "m", "to_unit": "ft"}}]},
        {"kind": "total_employees", "question": f"How many people do {c['name']} and {other['name']} employ "
         f"together?", "answer": str(total), "gold_calls": [
             {"tool": "lookup", "args": {"name": c["name"]}},
             {"tool": "lookup", "args": {"name": other["name"]}},
             {"tool": "calculator", "args": {"expression": f"{c['employees']} + {other['employees']}"}}]},
        {"kind": "founding_age", "question": f"How old was {p['name']} in the year they founded "
         f"{c['name']}?", "answer": str(c["founded"] - p["born"]), "gold_calls": [
             {"tool": "lookup", "args": {"name": p["name"]}},
             {"tool": "lookup", "args": {"name": c["name"]}},
             {"tool": "calculator", "args": {"expression": f"{c['founded']} - {p['born']}"}}]},
    ]


def dumps(rows: list[dict]) -> str:
    """The shipped JSON-lines text of ``rows`` (stable key order, one row per line)."""
    return "".join(json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n" for row in rows)


def write(directory: Path = CORPUS_DIR, seed: int = SEED) -> dict[str, int]:
    """Write the three files of :data:`FILES` into ``directory``; returns their sizes in bytes."""
    world = build(seed)
    directory.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for name, rows in zip(FILES, (world.passages, world.multihop, world.tools), strict=True):
        text = dumps(rows)
        tmp = directory / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(directory / name)
        sizes[name] = len(text.encode())
    return sizes


if __name__ == "__main__":
    for file, size in write().items():
        print(f"{CORPUS_DIR / file}: {size / 1024:.0f} KiB")
