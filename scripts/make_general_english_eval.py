"""Build the general-English evaluation set: sentences of the World English Bible, a public-domain translation in
present-day English that no corpus source holds.

    apt-get install sword-text-web diatheke
    python scripts/make_general_english_eval.py --train data/corpus/train.txt

Reads the whole text of the `sword-text-web` module through `diatheke` and keeps the verses that are whole sentences
of 8 to 40 words (a capital first, a full stop, question or exclamation mark last, balanced quotation marks), with
typographic quotes and apostrophes made ASCII as most general text writes them. It leaves out duplicates and every
verse that shares an 8-word window with the `--train` files (scripts/ngram_overlap.py), then keeps the `--examples`
verses whose salted hash is smallest: a spread over every book that depends only on the text and the seed. Writes
them one a line, in that hash order, to `--output` (data/eval/general_english.txt).
"""

import argparse
import hashlib
import logging
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ngram_overlap import line_ngrams, ngrams_found_in  # noqa: E402
from prepare_corpus import normalize_text, write_lines  # noqa: E402

logger = logging.getLogger("make_general_english_eval")
REPO_ROOT = Path(__file__).resolve().parent.parent

WEB_MODULE = "engWEB2015eb"  # the World English Bible with Deuterocanon, as sword-text-web installs it
WHOLE_TEXT = "Genesis 1:1-Revelation of John 22:21"
# "Ruth 1:1: <w>In</w> <w>the</w> <w>days</w> ...": the reference, then the verse in OSIS markup. diatheke repeats the
# last psalm title before the reference of every verse after it ("A Psalm by David.  Psalms 3:1: ..."), so the
# reference is searched for, not expected at the start.
VERSE_LINE = re.compile(r"[A-Z][\w ]*? \d+:\d+: (?P<osis>.*)$")
ASCII_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"'})
SENTENCE = re.compile(r"^[A-Z].*[.!?][\"']*$")
MIN_WORDS, MAX_WORDS = 8, 40


def verse_text(osis: str) -> str:
    # Some words of the module are tagged back to back (<w>God</w><w>created</w>): keep them apart.
    text = osis.replace("</w><w", "</w> <w").replace('<milestone type="line"/>', " ")
    text = re.sub(r"<(note|title)\b.*?</\1>", "", text)  # translators' footnotes, psalm titles
    text = re.sub(r"<[^>]+>", "", text)
    return normalize_text(text.translate(ASCII_QUOTES))


def read_verses(module: str) -> list[str]:
    try:
        result = subprocess.run(["diatheke", "-b", module, "-f", "OSIS", "-k", WHOLE_TEXT],
                                capture_output=True, text=True, check=True)
    except FileNotFoundError:
        raise SystemExit("make_general_english_eval.py: error: diatheke not found; "
                         "apt-get install diatheke sword-text-web")
    verses = [verse_text(match["osis"]) for match in map(VERSE_LINE.search, result.stdout.splitlines()) if match]
    if not verses:
        raise SystemExit(f"make_general_english_eval.py: error: diatheke printed no verse of {module}; "
                         f"apt-get install sword-text-web")
    return verses


def is_plain_sentence(text: str) -> bool:
    words = len(text.split())
    return MIN_WORDS <= words <= MAX_WORDS and bool(SENTENCE.match(text)) and text.count('"') % 2 == 0


def select(verses: list[str], train_paths: list[Path], examples: int, seed: int, n: int = 8) -> list[str]:
    candidates, seen = [], set()
    for text in verses:
        if is_plain_sentence(text) and text.casefold() not in seen:
            seen.add(text.casefold())
            candidates.append(text)
    wanted = set().union(*(line_ngrams(text, n) for text in candidates))
    in_training = ngrams_found_in(train_paths, wanted, n)
    held_out = [text for text in candidates if not line_ngrams(text, n) & in_training]
    logger.info("%d verses, %d plain sentences, %d without an %d-gram of the training text",
                len(verses), len(candidates), len(held_out), n)
    salted = sorted(held_out, key=lambda text: hashlib.sha256(f"{seed}\n{text}".encode("utf-8")).digest())
    return salted[:examples]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=Path, nargs="+", default=[REPO_ROOT / "data" / "corpus" / "train.txt"],
                        help="training text the set must not overlap (default: data/corpus/train.txt)")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "data" / "eval" / "general_english.txt")
    parser.add_argument("--examples", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.examples < 1:
        parser.error(f"--examples must be an integer >= 1, got {args.examples}")
    for path in args.train:
        if not path.is_file():
            parser.error(f"--train {path}: no such file")
    return args


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    sentences = select(read_verses(WEB_MODULE), args.train, args.examples, args.seed)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_lines(args.output, sentences)
    logger.info("wrote %d sentences to %s", len(sentences), args.output)


if __name__ == "__main__":
    main()
