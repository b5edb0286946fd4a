"""Synthetic instruction data for the LoRA example: a byte-level tokenizer and six task domains.

Every sample is one instruction, ``"<domain>: <input>\\n"``, and its answer, e.g.
``"add: 17+25\\n"`` -> ``"42"``. Tokens are the UTF-8 bytes (0..255) plus three ids of our
own: ``BOS`` opens a sample, ``EOS`` closes its answer, ``PAD`` fills a row to the batch's
length. The model learns (and is scored on) the answer and its ``EOS`` only: the input of
most domains is random, so predicting it teaches nothing.

The domains are tasks a few-million-parameter model can learn from a few thousand samples
on a CPU, each a different skill (so one client's data says little about another's):

- ``add``: the sum of two numbers below 100;
- ``reverse``: a random lowercase word, reversed;
- ``upper``: a random lowercase word, upper-cased;
- ``sort``: random letters, sorted;
- ``date``: an ISO date (2026-12-07) as day/month/year (07/12/2026);
- ``length``: the number of letters of a random word.

(No country->capital domain: its answers are facts to memorise, so a held-out test split
would ask facts never seen in training.)

Everything is generated from a seed: the same seed gives the same samples on every machine.
A split's test samples never appear in its training samples (their instructions differ).
"""

from __future__ import annotations

import string
from collections.abc import Callable, Sequence

import numpy as np

BYTES = 256
BOS, EOS, PAD = 256, 257, 258
VOCAB_SIZE = 259  # the byte-level tokenizer's ids
IGNORE = -100  # a label position the loss skips (the instruction, the padding)


def encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def decode(ids: Sequence[int]) -> str:
    """The text of ``ids``, the special ids left out (an invalid byte sequence as U+FFFD)."""
    return bytes(int(i) for i in ids if 0 <= int(i) < BYTES).decode("utf-8", errors="replace")


def _word(rng: np.random.Generator, low: int = 3, high: int = 8) -> str:
    return "".join(rng.choice(list(string.ascii_lowercase), size=int(rng.integers(low, high + 1))))


def _add(rng: np.random.Generator) -> tuple[str, str]:
    a, b = (int(v) for v in rng.integers(0, 100, size=2))
    return f"{a}+{b}", str(a + b)


def _reverse(rng: np.random.Generator) -> tuple[str, str]:
    word = _word(rng)
    return word, word[::-1]


def _upper(rng: np.random.Generator) -> tuple[str, str]:
    word = _word(rng)
    return word, word.upper()


def _sort(rng: np.random.Generator) -> tuple[str, str]:
    word = _word(rng, 4, 8)
    return word, "".join(sorted(word))


def _date(rng: np.random.Generator) -> tuple[str, str]:
    year, month, day = int(rng.integers(1950, 2050)), int(rng.integers(1, 13)), int(rng.integers(1, 29))
    return f"{year:04d}-{month:02d}-{day:02d}", f"{day:02d}/{month:02d}/{year:04d}"


def _length(rng: np.random.Generator) -> tuple[str, str]:
    word = _word(rng, 1, 12)
    return word, str(len(word))


GENERATORS: dict[str, Callable[[np.random.Generator], tuple[str, str]]] = {
    "add": _add,
    "reverse": _reverse,
    "upper": _upper,
    "sort": _sort,
    "date": _date,
    "length": _length,
}
DOMAINS = tuple(GENERATORS)


def instruction(domain: str, given: str) -> str:
    return f"{domain}: {given}\n"


def samples(
    domain: str, count: int, rng: np.random.Generator, exclude: set[str] | None = None
) -> list[tuple[str, str]]:
    """``count`` distinct (instruction, answer) pairs of ``domain``, none of whose
    instructions is in ``exclude`` (a domain with fewer distinct instructions than asked for
    is refused rather than looped over forever)."""
    seen = set(exclude or ())
    out: list[tuple[str, str]] = []
    for _ in range(50 * count + 1000):
        if len(out) == count:
            return out
        given, answer = GENERATORS[domain](rng)
        prompt = instruction(domain, given)
        if prompt not in seen:
            seen.add(prompt)
            out.append((prompt, answer))
    raise ValueError(f"domain {domain!r} has fewer than {count} distinct instructions to draw")


def domain_of(ids: Sequence[int]) -> str | None:
    """The domain a tokenised sample's instruction names (the text before the first ':')."""
    text = decode(ids[:16])
    name, colon, _ = text.partition(":")
    return name if colon and name in GENERATORS else None


def tokenize(pairs: Sequence[tuple[str, str]], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, labels)``: int64 arrays of shape (samples, length), ``length`` the longest
    sample (at most ``max_length``, the model's positions). ``labels[i, t]`` is the token
    that should follow ``ids[i, t]`` where it belongs to the answer (its bytes and EOS),
    else :data:`IGNORE`: the loss of position ``t`` is ``cross_entropy(logits[i, t],
    labels[i, t])``, no shifting needed."""
    rows = []
    for prompt, answer in pairs:
        head, tail = [BOS, *encode(prompt)], [*encode(answer), EOS]
        if len(head) + len(tail) > max_length:
            raise ValueError(f"sample {prompt + answer!r} needs {len(head) + len(tail)} positions, over {max_length}")
        rows.append((head, tail))
    length = max(len(h) + len(t) for h, t in rows)
    ids = np.full((len(rows), length), PAD, np.int64)
    labels = np.full((len(rows), length), IGNORE, np.int64)
    for i, (head, tail) in enumerate(rows):
        sequence = head + tail
        ids[i, : len(sequence)] = sequence
        # position t predicts token t+1: the answer's tokens are predicted from len(head)-1 on
        labels[i, len(head) - 1 : len(sequence) - 1] = tail
    return ids, labels
