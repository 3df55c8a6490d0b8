"""Measure how much of an evaluation set occurs word for word in the training text.

    python scripts/ngram_overlap.py --train data/corpus/train.txt \
        --eval data/corpus/validation.txt data/eval/general_english.txt

An evaluation example that shares a long window of words with the training text may be recalled rather than
predicted, so its score says little about text the model has not seen. Words are the runs of letters and digits of
the lower-cased text: case and punctuation are ignored, as the uncased tokenizer mostly ignores them. For each
evaluation file this prints its distinct n-grams (8 words by default), how many of them occur in the training text
and what fraction that is, and how many examples hold at least one such n-gram; `--output` writes the same as JSON.
Files hold one example per line, and n-grams never cross a line.
"""

import argparse
import json
import logging
import re
import sys
from pathlib import Path

from tqdm.auto import tqdm

logger = logging.getLogger("ngram_overlap")

WORD = re.compile(r"\w+")


def line_ngrams(line: str, n: int) -> set[tuple[str, ...]]:
    words = WORD.findall(line.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def read_lines(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as file:
        return [line.rstrip("\n") for line in file if line.strip()]


def ngrams_found_in(train_paths: list[Path], wanted: set[tuple[str, ...]], n: int) -> set[tuple[str, ...]]:
    """The n-grams of `wanted` that occur in the training files; one pass, holding only `wanted` in memory."""
    found = set()
    for path in train_paths:
        with open(path, encoding="utf-8") as file:
            for line in tqdm(file, desc=f"scanning {path.name}", unit=" lines"):
                found |= line_ngrams(line, n) & wanted
    return found


def overlap(train_paths: list[Path], eval_paths: list[Path], n: int = 8) -> dict[str, dict]:
    """Per evaluation file (by path): examples, distinct n-grams, those also in the training text, their fraction,
    and the examples (with their line numbers) that hold one."""
    per_example = {path: [line_ngrams(line, n) for line in read_lines(path)] for path in eval_paths}
    wanted = set().union(*(grams for examples in per_example.values() for grams in examples))
    found = ngrams_found_in(train_paths, wanted, n)
    report = {}
    for path, examples in per_example.items():
        distinct = set().union(*examples)
        overlapping = distinct & found
        report[str(path)] = {
            "examples": len(examples),
            "ngrams": len(distinct),
            "overlapping_ngrams": len(overlapping),
            "overlap_fraction": len(overlapping) / len(distinct) if distinct else 0.0,
            "examples_with_overlap": sum(bool(grams & found) for grams in examples),
        }
    return report


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=Path, nargs="+", required=True, help="training text, one example per line")
    parser.add_argument("--eval", type=Path, nargs="+", required=True, help="evaluation sets, one example per line")
    parser.add_argument("-n", type=int, default=8, help="words per n-gram")
    parser.add_argument("--output", type=Path, default=None, help="also write the report here as JSON")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error(f"-n must be an integer >= 1, got {args.n}")
    for option, paths in (("--train", args.train), ("--eval", args.eval)):
        for path in paths:
            if not path.is_file():
                parser.error(f"{option} {path}: no such file")
    return args


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    report = overlap(args.train, args.eval, args.n)
    for path, entry in report.items():
        print(f"{path}: {entry['overlapping_ngrams']} of {entry['ngrams']} {args.n}-grams in the training text "
              f"({100 * entry['overlap_fraction']:.3f}%), {entry['examples_with_overlap']} of {entry['examples']} "
              f"examples hold one")
    if args.output:
        result = {"n": args.n, "train": [str(path) for path in args.train], "eval": report}
        args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
