"""Do calibration samples overlap the evaluation texts? (issue 17: a calibration sample must not
share text with the held-out windows it is scored on.)

    python bench/calibration_overlap.py --text ../shared/data/wikitext-2-raw/wiki.test.raw

Counts the word n-grams (default n=8, lower-cased, punctuation stripped) that each sample shares
with each evaluation text (pydoc topics always; --text adds files). 0 everywhere is the bar.
"""

from __future__ import annotations

import argparse
import os
import re

from any4.builtin import heldout_description, heldout_text
from any4.calibration import SAMPLE_NAMES, read_text, sample_text


def ngrams(text: str, n: int) -> set:
    """The set of word n-grams (tuples of lower-cased alphanumeric words) of a text."""
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--text", action="append", default=[], help="another evaluation text file")
    p.add_argument("-n", type=int, default=8, help="words per n-gram")
    args = p.parse_args()
    samples = {f"any4/data/{n}.txt": sample_text(n) for n in SAMPLE_NAMES}
    texts = {heldout_description(): heldout_text()}
    for path in args.text:
        texts[os.path.basename(path)] = read_text(path)
    grams = {name: ngrams(t, args.n) for name, t in texts.items()}
    print(f"| sample | {args.n}-grams | " + " | ".join(f"shared with {t}" for t in texts) + " |")
    print("|---|---|" + "---|" * len(texts))
    bad = 0
    for name, sample in samples.items():
        own = ngrams(sample, args.n)
        shared = [len(own & g) for g in grams.values()]
        bad += sum(shared)
        print(f"| {name} | {len(own)} | " + " | ".join(str(s) for s in shared) + " |")
    raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
