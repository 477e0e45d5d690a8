"""Synthetic skills with a fixed answer format, as ``(prompt, answer)`` pairs with disjoint splits.

A model is asked the prompt and must generate exactly the answer (then its end-of-text token):

- :func:`addition`: prompt ``"12+345="``, answer ``"357"``;
- :func:`modular_addition`: prompt ``"17 + 5 mod 4\\n"``, answer ``"The result is 2"`` (the task and
  the "format-hard" answer of Zimmermann & Boussard's layer grafting, with n = 4);
- :func:`reversal`: prompt ``"reverse: stone\\n"``, answer ``"enots"``;
- :func:`copying`: prompt ``"copy: stone\\n"``, answer ``"<<stone>>"`` (a formatted copy).

Operands are drawn uniformly from ``0 .. 10**digits - 1`` and written in decimal without leading
zeros. Whether an operand pair belongs to the test side is a fixed hash of the unordered pair, the
same for every seed: a test prompt, or its operands swapped, never appears in any training split.
The seed only chooses which pairs of each side are drawn, so splits are reproducible.
"""

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import HfGraftError

__all__ = ["Example", "Task", "addition", "copying", "modular_addition", "reversal"]

Example = tuple[str, str]
"""A ``(prompt, answer)`` pair."""


@dataclass(frozen=True)
class Task:
    """A skill's training and test examples; no operand pair is on both sides."""

    name: str
    train: list[Example]
    test: list[Example]


def addition(
    digits: int = 2, *, train_size: int = 4000, test_size: int = 500, test_fraction: float = 0.1, seed: int = 0
) -> Task:
    """Addition of two operands of up to ``digits`` digits: ``"12+345="`` -> ``"357"``."""
    return _arithmetic(
        f"addition-{digits}d",
        digits,
        lambda a, b: (f"{a}+{b}=", str(a + b)),
        train_size,
        test_size,
        test_fraction,
        seed,
    )


def modular_addition(
    n: int = 4,
    *,
    operand_digits: int = 2,
    train_size: int = 2000,
    test_size: int = 500,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Task:
    """``a + b mod n``: ``"17 + 5 mod 4\\n"`` -> ``"The result is 2"``."""
    if not (isinstance(n, int) and n >= 2):
        raise HfGraftError(f"modular_addition needs an integer modulus n >= 2, got {n!r}.")
    return _arithmetic(
        f"modular-addition-{n}",
        operand_digits,
        lambda a, b: (f"{a} + {b} mod {n}\n", f"The result is {(a + b) % n}"),
        train_size,
        test_size,
        test_fraction,
        seed,
    )


def _arithmetic(
    name: str,
    digits: int,
    render: Callable[[int, int], Example],
    train_size: int,
    test_size: int,
    test_fraction: float,
    seed: int,
) -> Task:
    """Draw distinct operand pairs for each side of the fixed partition and render them."""
    if not (isinstance(digits, int) and digits >= 1):
        raise HfGraftError(f"{name}: the number of digits must be a positive integer, got {digits!r}.")
    for label, size in (("train_size", train_size), ("test_size", test_size)):
        if not (isinstance(size, int) and size >= 1):
            raise HfGraftError(f"{name}: {label} must be a positive integer, got {size!r}.")
    if not 0 < test_fraction < 1:
        raise HfGraftError(f"{name}: test_fraction must lie strictly between 0 and 1, got {test_fraction!r}.")
    limit = 10**digits
    splits = {}
    for is_test, size in ((False, train_size), (True, test_size)):
        rng = random.Random(2 * seed + is_test)
        pairs: dict[tuple[int, int], None] = {}
        for _ in range(50 * size + 10_000):
            if len(pairs) == size:
                break
            a, b = rng.randrange(limit), rng.randrange(limit)
            if _is_test_pair(a, b, test_fraction) == is_test:
                pairs[a, b] = None
        else:
            side = "test" if is_test else "train"
            raise HfGraftError(
                f"{name}: found only {len(pairs)} distinct {side} operand pairs of {size} asked for "
                f"({limit * limit} pairs in all, about {test_fraction:.0%} of them on the test side); "
                "ask for fewer examples or allow more digits."
            )
        splits[is_test] = [render(a, b) for a, b in pairs]
    return Task(name=name, train=splits[False], test=splits[True])


def _is_test_pair(a: int, b: int, test_fraction: float) -> bool:
    """The fixed partition: a hash of the unordered pair, below ``test_fraction`` of its range."""
    digest = hashlib.blake2b(f"{min(a, b)},{max(a, b)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < test_fraction * 2**64


def reversal(*, length: tuple[int, int] = (3, 6), train_size: int = 2000, test_size: int = 500,
             test_fraction: float = 0.2, seed: int = 0) -> Task:
    """Reverse a lowercase letter string: ``"reverse: stone\\n"`` -> ``"enots"``."""
    return _strings("reversal", lambda w: (f"reverse: {w}\n", w[::-1]), length, train_size, test_size, test_fraction, seed)


def copying(*, length: tuple[int, int] = (3, 6), train_size: int = 2000, test_size: int = 500,
            test_fraction: float = 0.2, seed: int = 0) -> Task:
    """Copy a lowercase letter string inside a fixed frame: ``"copy: stone\\n"`` -> ``"<<stone>>"``."""
    return _strings("copying", lambda w: (f"copy: {w}\n", f"<<{w}>>"), length, train_size, test_size, test_fraction, seed)


def _strings(name, render, length, train_size, test_size, test_fraction, seed) -> Task:
    """Random letter strings of ``length[0]..length[1]`` letters, split by a fixed hash of the string."""
    shortest, longest = length
    if not (isinstance(shortest, int) and 1 <= shortest <= longest):
        raise HfGraftError(f"{name}: length must be (shortest, longest) with 1 <= shortest <= longest, got {length!r}.")
    splits = {}
    for is_test, size in ((False, train_size), (True, test_size)):
        rng = random.Random(2 * seed + is_test + 7919)
        words: dict[str, None] = {}
        for _ in range(50 * size + 10_000):
            if len(words) == size:
                break
            word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(shortest, longest)))
            if _is_test_word(word, test_fraction) == is_test:
                words[word] = None
        else:
            raise HfGraftError(f"{name}: found only {len(words)} distinct strings of {size} asked for; allow longer strings.")
        splits[is_test] = [render(word) for word in words]
    return Task(name=name, train=splits[False], test=splits[True])


def _is_test_word(word: str, test_fraction: float) -> bool:
    digest = hashlib.blake2b(word.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < test_fraction * 2**64
