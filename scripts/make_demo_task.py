"""Write the demo's synthetic instruction task: sort three words alphabetically.

    python scripts/make_demo_task.py            # rewrites data/sort/{train,eval}.jsonl

A task a tiny model learns on a CPU in the demo's few minutes, and that a person recognises as learned
when it is: the answer is a deterministic function of the input, so exact match is meaningful, and the
eval rows are word triples whose three words no training row holds together, in any order (held out, not
memorised: the model must sort, not recall an answer it saw). The words are ones
the demo's tokenizer (trained on data/tiny) holds as single tokens, and the answer starts with a fixed
word so that each answer word is the same token as in the prompt: the task is the order, not spelling.
Sorting needs only which words are present, not where: an early, easy thing for attention to learn.
Deterministic: the same seed writes the same files.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from pathlib import Path

WORDS = (
    "after", "before", "fast", "first", "large", "last", "less", "more", "over", "slow", "small", "start",
    "stop", "under",
)  # fmt: skip
INSTRUCTION = "Sort these words alphabetically: {}"
ANSWER = "Sorted: {}"


def row(words: tuple[str, ...]) -> dict[str, str]:
    return {
        "instruction": INSTRUCTION.format(" ".join(words)),
        "response": ANSWER.format(" ".join(sorted(words))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("data/sort"))
    parser.add_argument("--held-out", type=int, default=16, help="word sets kept out of training")
    parser.add_argument("--orders", type=int, default=4, help="eval rows per held-out set (its orders)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    sets = list(itertools.combinations(WORDS, 3))
    rng.shuffle(sets)
    held, kept = sets[: args.held_out], sets[args.held_out :]
    orders = [rng.sample(list(itertools.permutations(s)), args.orders) for s in held]
    evals = [per_set[i] for i in range(args.orders) for per_set in orders]  # neighbours: other sets
    train = [order for s in kept for order in itertools.permutations(s)]
    rng.shuffle(train)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, part in (("eval", evals), ("train", train)):
        path = args.out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row(words)) + "\n" for words in part))
        print(f"wrote {path} ({len(part)} rows)")


if __name__ == "__main__":
    main()
