"""Tests for scripts/prepare_corpus.py on small synthetic files laid out like the Debian packages,
so they need none of the apt packages the real corpus is built from."""

import gzip
import hashlib
import importlib.util
import logging
import re
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("prepare_corpus", REPO_ROOT / "scripts" / "prepare_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


prepare_corpus = load_script()

PROSE = [
    "The quick brown fox jumps over the lazy dog while the farmer watches from the gate.",
    "A journey of a thousand miles begins with a single step, or so the proverb says.",
    "Simple things should be simple, and complex things should be possible for everyone.",
    "The river ran high after three days of rain, and the old bridge groaned under the carts.",
    "Every library in the town kept its doors open late on Thursdays for the students.",
    "She planted tomatoes along the south wall where the afternoon sun lingered longest.",
]


def write(path: Path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


@pytest.fixture
def fake_root(tmp_path):
    """A filesystem root holding tiny versions of the files four sources read."""
    root = tmp_path / "root"
    fortunes = root / "usr/share/games/fortunes"
    # The third cookie repeats the first with other case and spacing: it must be de-duplicated.
    write(fortunes / "cookie", f"{PROSE[0]}\n%\n{PROSE[1]}\n\t\t-- Anon\n%\n{PROSE[0].upper().replace(' ', '   ')}\n")
    write(fortunes / "literature", f"{PROSE[2]}\n%\n#include <stdio.h> {{ x[0] = *p++; }} /* -- */ ;;\n")
    write(fortunes / "art", "An ascii-art file is skipped by name even though this line is prose.\n")
    write(fortunes / "cookie.dat", "binary index, never read")

    wordnet = root / "usr/share/wordnet"
    licence_header = "  1 This software and database is being provided to you, the LICENSEE, by Princeton\n"
    write(wordnet / "data.noun", licence_header +
          "00001740 03 n 02 dog 0 domestic_dog 0 000 | a member of the genus Canis that has been domesticated  \n")
    write(wordnet / "data.verb", licence_header)
    write(wordnet / "data.adj", licence_header +
          "00002098 00 a 01 able(a) 0 000 | usually followed by `to' and having the necessary means or skill  \n")
    write(wordnet / "data.adv", licence_header)

    html_dir = root / "usr/share/doc/python3.11/html"
    write(html_dir / "library/demo.html",
          "<html><head><style>p { color: red }</style><script>var p = '<p>no</p>';</script></head><body>"
          f"<h1>Demo module</h1><p>{PROSE[3].replace('old bridge', '<code>old</code> <em>bridge</em>')} &amp; more.</p>"
          "<pre>for item in items:\n    print(item)  # code is not prose</pre>"
          f"<ul><li><p>{PROSE[4]}</p></li></ul></body></html>")
    write(html_dir / "genindex-A.html", "<p>An index page is a list of links and is skipped entirely.</p>")

    jargon = root / "usr/share/doc/jargon-text/jargon.txt.gz"
    jargon.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(jargon, "wt", encoding="utf-8") as f:
        wrapped = PROSE[5].replace(" where ", "\n   where ")
        f.write(f"   :gardening: n.\n\n   {wrapped} See {{hacker}}.\n\n")
    return root


def build(root, sources=("fortunes", "wordnet", "python-docs", "jargon"), validation_fraction=0.3, seed=0):
    return prepare_corpus.build_corpus(list(sources), root, min_chars=20, max_chars=200,
                                       validation_fraction=validation_fraction, seed=seed)


def test_cleaning_strips_markup_code_and_symbols(fake_root):
    train, validation, stats = build(fake_root)
    corpus = train + validation
    text = "\n".join(corpus)
    assert "<" not in text and "&amp;" not in text
    assert "old bridge groaned" in text and "& more." in text      # inline markup flattened, entity decoded
    assert "print(item)" not in text and "color: red" not in text and "var p" not in text
    assert "#include" not in text                                     # mostly-symbol cookie dropped
    assert "ascii-art" not in text and "index page" not in text      # skipped files
    assert "dog, domestic dog: a member of the genus Canis that has been domesticated" in corpus
    assert "able: usually followed by `to' and having the necessary means or skill" in corpus
    assert f"{PROSE[1]} -- Anon" in corpus                            # wrapped lines joined
    assert f"gardening: {PROSE[5]} See hacker." in corpus            # headword carried, {xref} unwrapped
    assert all(line == " ".join(line.split()) for line in corpus)
    assert stats["fortunes"]["package"] == "fortunes"
    assert stats["python-docs"]["licence"].startswith("PSF")


def test_exact_duplicates_are_removed_after_normalisation(fake_root):
    train, validation, stats = build(fake_root)
    corpus = train + validation
    keys = [prepare_corpus.dedup_key(t) for t in corpus]
    assert len(keys) == len(set(keys))
    assert sum(prepare_corpus.dedup_key(PROSE[0]) == k for k in keys) == 1
    assert sum(entry["examples"] for entry in stats.values()) == len(corpus)


def test_split_is_deterministic_disjoint_and_independent_of_other_sources(fake_root):
    train, validation, _ = build(fake_root)
    assert (train, validation) == build(fake_root)[:2]
    assert train and validation
    assert not set(train) & set(validation)
    # An example stays in its split when other sources are added or removed.
    fortunes_train, fortunes_validation, _ = build(fake_root, sources=["fortunes"])
    assert set(fortunes_train) <= set(train) and set(fortunes_validation) <= set(validation)
    # Another seed gives another split of the same examples.
    assert set(train) | set(validation) == set().union(*build(fake_root, seed=1)[:2])


def test_long_paragraphs_are_split_at_sentences():
    text = " ".join(f"Sentence number {i} is about a curious animal." for i in range(20))
    chunks = prepare_corpus.clean_paragraph(text, min_chars=20, max_chars=120)
    assert len(chunks) > 1 and all(len(c) <= 120 for c in chunks)
    assert " ".join(chunks) == text


def test_fortune_overstrike_and_mojibake():
    assert prepare_corpus.apply_backspaces("I *____\b\b\b\bknew* it, Ren'\be") == "I *knew* it, Rene"
    assert prepare_corpus.clean_paragraph("You don\u00e2\u0080\u0099t need this sentence at all, friend.", 20, 200) == []


def test_missing_required_source_names_path_and_package(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        build(tmp_path, sources=["wordnet"])
    message = str(error.value)
    assert str(tmp_path / "usr/share/wordnet/data.noun") in message
    assert "wordnet-base" in message
    # The command line reports it as an error and exits non-zero instead of writing a partial corpus.
    assert prepare_corpus.main(["--root", str(tmp_path), "--sources", "wordnet",
                                "--output-dir", str(tmp_path / "out")]) == 1
    assert not (tmp_path / "out").exists()


def test_missing_optional_source_is_skipped_with_warning(fake_root, caplog):
    with caplog.at_level(logging.WARNING, logger="prepare_corpus"):
        train, validation, stats = build(fake_root, sources=["fortunes", "gnu-standards"])
    assert "gnu-standards" not in stats and stats["fortunes"]["examples"] > 0
    assert "gnu-standards" in caplog.text and "standards.html" in caplog.text


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_main_writes_identical_files_twice(fake_root, tmp_path):
    digests = []
    for run in ("first", "second"):
        out = tmp_path / run
        prepare_corpus.main(["--root", str(fake_root), "--output-dir", str(out), "--min-chars", "20",
                             "--sources", "fortunes", "wordnet", "python-docs", "jargon"])
        digests.append({name: sha256(out / name) for name in ("train.txt", "validation.txt", "sources.json")})
    assert digests[0] == digests[1]
    lines = (tmp_path / "first" / "train.txt").read_text(encoding="utf-8").splitlines()
    assert lines and all(lines)


def test_load_tokenized_corpus(tmp_path):
    from transformers import BertTokenizer

    corpus_dir = tmp_path / "corpus"
    corpus_dir.mkdir()
    prepare_corpus.write_lines(corpus_dir / "train.txt", PROSE[:4])
    prepare_corpus.write_lines(corpus_dir / "validation.txt", PROSE[4:])
    words = sorted({w for line in PROSE for w in re.findall(r"\w+|[^\w\s]", line.lower())})
    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words)}
    tokenizer = BertTokenizer(vocab=vocab)

    tokenized = prepare_corpus.load_tokenized_corpus(corpus_dir, tokenizer, max_length=8,
                                                     cache_dir=str(tmp_path / "cache"))
    assert set(tokenized) == {"train", "validation"}
    assert tokenized["train"].num_rows == 4 and tokenized["validation"].num_rows == 2
    assert "text" not in tokenized["train"].column_names
    first = tokenized["train"][0]
    assert len(first["input_ids"]) == 8                               # truncated to max_length
    assert first["input_ids"][0] == vocab["[CLS]"] and first["input_ids"][-1] == vocab["[SEP]"]
    assert set(first) == {"input_ids", "token_type_ids", "attention_mask"} and vocab["[UNK]"] not in first["input_ids"]

    with pytest.raises(FileNotFoundError, match="prepare_corpus.py"):
        prepare_corpus.load_tokenized_corpus(tmp_path / "nowhere", tokenizer, max_length=8)


def test_install_script_installs_every_source_package():
    script = (REPO_ROOT / "scripts" / "install_corpus_sources.sh").read_text()
    for source in prepare_corpus.SOURCES:
        assert re.search(rf"(^|\s){re.escape(source.package)}(\s|$)", script, re.MULTILINE), source.package


def write_dictd(directory: Path, name: str, articles: dict[str, str]):
    """A dictd database as dictfmt writes it: NAME.dict.dz (gzip) and NAME.index, whose offsets and lengths are in
    dictd's base 64. Two headwords point at the first article, as dictfmt does for a word with variants."""
    directory.mkdir(parents=True, exist_ok=True)
    metadata = "00-database-info\n   This file was converted from the original database; a licence notice.\n\n"
    text, index = metadata, [("00-database-info", 0, len(metadata))]
    for headword, article in articles.items():
        index.append((headword, len(text.encode("utf-8")), len(article.encode("utf-8"))))
        text += article
    index.insert(2, (index[1][0] + "s", index[1][1], index[1][2]))

    def number(value):
        digits = ""
        while True:
            digits = prepare_corpus.DICTD_BASE64[value % 64] + digits
            value //= 64
            if not value:
                return digits

    with gzip.open(directory / f"{name}.dict.dz", "wt", encoding="utf-8") as f:
        f.write(text)
    (directory / f"{name}.index").write_text("".join(f"{word}\t{number(offset)}\t{number(length)}\n"
                                                     for word, offset, length in index))


GCIDE_ARTICLES = {
    "dichotomize": (
        'Dichotomize \\Di*chot"o*mize\\, v. t. [imp. & p. p.\n'
        "   {Dichotomized}; p. pr. & vb. n. {Dichotomizing}.] [See\n"
        "   {Dichotomous}.]\n"
        "   1. To cut into two parts; to part into two divisions; to\n"
        "      divide into pairs; to bisect. [R.]\n"
        "      [1913 Webster]\n\n"
        "            The apostolical benediction dichotomizes all good\n"
        "            things into grace and peace.          --Bp. Hall.\n"
        "      [1913 Webster]\n\n"
        "   2. (Astron.) To exhibit as a half disk, as the moon does at\n"
        "      its quarters. --Whewell.\n"
        "      [1913 Webster]\n\n"
    ),
    "spurt": (
        "Spurt \\Spurt\\ (sp[^u]rt), n. [Cf. Icel. sprettr a spurt.]\n"
        "   A sudden and energetic effort, as in an emergency; an\n"
        "   increased exertion for a brief space. -- {Spurt\"er}, n.\n"
        "   [1913 Webster]\n\n"
        "         And he made a sudden spurt toward the gate of the city.\n"
        "                                                  --2 Kings xxiii. 10.\n"
        "   [1913 Webster]\n\n"
        "   2. a brief and sudden gush of a liquid from an opening in a pipe.\n"
        "      [WordNet 1.5]\n\n"
    ),
}
DEVIL_ARTICLES = {
    "abdication": (
        "ABDICATION, n.  An act whereby a sovereign attests his sense of the\n"
        "high temperature of the throne.\n\n"
        "    Poor Isabella's Dead, whose _abdication_\n"
        "    Set all tongues wagging in the Spanish nation.\n"
        "                                                                  G.J.\n\n"
    ),
    "absent-minded": "ABSENT-MINDED, adj.  Thinking of something else while the kettle boils over.\n\n",
}


@pytest.fixture
def dictd_root(tmp_path):
    root = tmp_path / "root"
    write_dictd(root / "usr/share/dictd", "gcide", GCIDE_ARTICLES)
    write_dictd(root / "usr/share/dictd", "devil", DEVIL_ARTICLES)
    return root


def test_dictd_articles_are_read_once_each_without_the_database_metadata(dictd_root):
    dictd_dir = dictd_root / "usr/share/dictd"
    articles = prepare_corpus.dictd_articles(dictd_dir / "gcide.index", dictd_dir / "gcide.dict.dz")
    assert articles == list(GCIDE_ARTICLES.values())


def test_gcide_gives_definitions_under_their_headword_and_quotations_as_they_stand(dictd_root):
    train, validation, stats = build(dictd_root, sources=["gcide"])
    assert sorted(train + validation) == sorted([
        "Dichotomize: To cut into two parts; to part into two divisions; to divide into pairs; to bisect.",
        "The apostolical benediction dichotomizes all good things into grace and peace.",
        "Dichotomize: To exhibit as a half disk, as the moon does at its quarters.",
        "Spurt: A sudden and energetic effort, as in an emergency; an increased exertion for a brief space.",
        "And he made a sudden spurt toward the gate of the city.",
        # the definition from WordNet 1.5 is left out: WordNet is a source of its own
    ])
    assert stats["gcide"]["package"] == "dict-gcide" and stats["gcide"]["licence"] == "GPL-2+"


def test_devils_dictionary_gives_definitions_and_verses(dictd_root):
    train, validation, stats = build(dictd_root, sources=["devil"])
    assert sorted(train + validation) == sorted([
        "Abdication: An act whereby a sovereign attests his sense of the high temperature of the throne.",
        "Poor Isabella's Dead, whose abdication Set all tongues wagging in the Spanish nation.",
        "Absent-minded: Thinking of something else while the kettle boils over.",
    ])
    assert stats["devil"]["licence"] == "public domain"


def test_missing_dictionaries_are_skipped_with_a_warning(fake_root, caplog):
    with caplog.at_level(logging.WARNING, logger="prepare_corpus"):
        _, _, stats = build(fake_root, sources=["fortunes", "gcide", "devil"])
    assert set(stats) == {"fortunes"}
    assert "dict-gcide" in caplog.text and "dict-devil" in caplog.text
