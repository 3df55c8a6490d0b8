#!/usr/bin/env bash
# Install the Debian packages whose files scripts/prepare_corpus.py reads (Debian 12 "bookworm").
# Keep this list in step with SOURCES in prepare_corpus.py (tests/test_prepare_corpus.py checks it).
#
#   bash scripts/install_corpus_sources.sh
#
# python3.11-doc        Python 3.11 documentation (HTML)        PSF-2.0
# wordnet-base          WordNet 3.0 database (glosses)          WordNet-3.0
# fortunes              fortune cookies (pulls in fortunes-min) BSD-3-Clause
# debian-reference-en   Debian Reference, English HTML          GPL-2+
# jargon-text           The Jargon File 4.4.7                   public domain
# gnu-standards         GNU Coding Standards / Maintainers      GFDL-1.3+
# dict-gcide            GNU Collaborative International         GPL-2+
#                       Dictionary of English (Webster's 1913)
# dict-devil            The Devil's Dictionary (Ambrose Bierce) public domain
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
$SUDO apt-get install -y --no-install-recommends \
    python3.11-doc \
    wordnet-base \
    fortunes \
    fortunes-min \
    debian-reference-en \
    jargon-text \
    gnu-standards \
    dict-gcide \
    dict-devil
