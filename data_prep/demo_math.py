"""Seeded arithmetic word problems with worked answers: the demo corpus' ``math`` source.

Each document is a short worksheet of problems whose solutions show the intermediate steps
(products, carries, equation rearrangements), so a small model has structure to learn and the
digit-split tokenizer sees many numbers. Numbers are chosen so every answer is exact.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from fractions import Fraction

_NAMES = [
    "Ada",
    "Ben",
    "Chloe",
    "Dev",
    "Eva",
    "Farid",
    "Grace",
    "Hugo",
    "Iris",
    "Jun",
    "Kemal",
    "Lena",
    "Mina",
    "Noah",
    "Omar",
    "Priya",
    "Quinn",
    "Rosa",
    "Sam",
    "Tara",
]
_ITEMS = ["apple", "notebook", "pencil", "ticket", "sandwich", "marble", "stamp", "candle"]


def _shopping(r: random.Random) -> tuple[str, str]:
    name, item = r.choice(_NAMES), r.choice(_ITEMS)
    n, price = r.randint(2, 40), r.randint(2, 95)
    return (
        f"{name} buys {n} {item}s at {price} dollars each. How much does {name} spend?",
        f"{n} x {price} = {n * price}. {name} spends {n * price} dollars.",
    )


def _library(r: random.Random) -> tuple[str, str]:
    a, b, c = r.randint(200, 5000), r.randint(10, 190), r.randint(5, 300)
    return (
        f"A library has {a} books. It lends out {b} and receives {c} donated books. "
        "How many books are on its shelves now?",
        f"{a} - {b} = {a - b}. Then {a - b} + {c} = {a - b + c}. It has {a - b + c} books.",
    )


def _teams(r: random.Random) -> tuple[str, str]:
    k, n = r.randint(3, 12), r.randint(20, 400)
    q, rem = divmod(n, k)
    return (
        f"{n} students are split into teams of {k}. How many full teams are there, and "
        "how many students are left over?",
        f"{n} = {k} x {q} + {rem}. There are {q} full teams and {rem} students left over.",
    )


def _discount(r: random.Random) -> tuple[str, str]:
    price, pct = 20 * r.randint(1, 50), r.choice([10, 20, 25, 50])
    off = price * pct // 100
    return (
        f"A jacket costs {price} dollars and is on sale for {pct}% off. What is the sale price?",
        f"{pct}% of {price} is {price} x {pct} / 100 = {off}. "
        f"The sale price is {price} - {off} = {price - off} dollars.",
    )


def _equation(r: random.Random) -> tuple[str, str]:
    a, x, b = r.randint(2, 12), r.randint(-20, 30), r.randint(-50, 50)
    c = a * x + b
    sign, mag = ("+", b) if b >= 0 else ("-", -b)
    return (
        f"Solve for x: {a}x {sign} {mag} = {c}.",
        f"Subtract {b} from both sides: {a}x = {c} - ({b}) = {c - b}. "
        f"Divide by {a}: x = {c - b} / {a} = {x}.",
    )


def _rectangle(r: random.Random) -> tuple[str, str]:
    w, h = r.randint(2, 60), r.randint(2, 60)
    return (
        f"A rectangle is {w} cm wide and {h} cm tall. What are its area and perimeter?",
        f"Area = {w} x {h} = {w * h} square cm. "
        f"Perimeter = 2 x ({w} + {h}) = 2 x {w + h} = {2 * (w + h)} cm.",
    )


def _travel(r: random.Random) -> tuple[str, str]:
    v, t = r.randint(30, 120), r.randint(2, 9)
    return (
        f"A train travels at {v} km per hour for {t} hours. How far does it go?",
        f"Distance = speed x time = {v} x {t} = {v * t} km.",
    )


def _fractions(r: random.Random) -> tuple[str, str]:
    a, b, c, d = r.randint(1, 9), r.randint(2, 12), r.randint(1, 9), r.randint(2, 12)
    den = b * d
    total = Fraction(a, b) + Fraction(c, d)
    return (
        f"What is {a}/{b} + {c}/{d}?",
        f"Use the common denominator {b} x {d} = {den}: {a * d}/{den} + {b * c}/{den} = "
        f"{a * d + b * c}/{den}, which simplifies to {total}.",
    )


def _long_multiplication(r: random.Random) -> tuple[str, str]:
    a, b = r.randint(12, 999), r.randint(12, 99)
    tens, ones = b // 10 * 10, b % 10
    return (
        f"Compute {a} x {b}.",
        f"{a} x {b} = {a} x {tens} + {a} x {ones} = {a * tens} + {a * ones} = {a * b}.",
    )


PROBLEMS: list[Callable[[random.Random], tuple[str, str]]] = [
    _shopping,
    _library,
    _teams,
    _discount,
    _equation,
    _rectangle,
    _travel,
    _fractions,
    _long_multiplication,
]


def math_documents(n_problems: int, seed: int = 0) -> Iterator[str]:
    """Worksheets of 3-8 problems each, ``n_problems`` problems in total."""
    r = random.Random(seed)
    done = 0
    while done < n_problems:
        k = min(r.randint(3, 8), n_problems - done)
        parts = []
        for i in range(k):
            question, answer = r.choice(PROBLEMS)(r)
            parts.append(f"Problem {i + 1}. {question}\nSolution. {answer}")
        done += k
        yield "\n\n".join(parts)
