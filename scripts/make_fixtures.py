#!/usr/bin/env python3
"""Writes the pretrained-vector fixtures of tests/io.rs with the real tools.

gensim writes word2vec text and binary files, NumPy writes .npy files, and
GloVe, fastText .vec and C-tool binary files are written the way those
tools' C/C++ code prints them. Then gensim and NumPy read every file back,
and what they read is written to tests/fixtures/expected.txt, one row per
line with each float32 as the hex of its bits, so the Rust tests compare
bit for bit and need no Python.

    python3 -m venv /tmp/fx && /tmp/fx/bin/pip install gensim numpy
    /tmp/fx/bin/python scripts/make_fixtures.py
"""

import io
import logging
from pathlib import Path

import gensim
import numpy as np
from gensim.models import KeyedVectors

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures"

WORDS = ["the", "king", "queen", "naïve", "東京", "</s>", "Straße"]
DIM = 6


def vectors():
    rng = np.random.default_rng(20240605)
    v = rng.standard_normal((len(WORDS), DIM)).astype(np.float32)
    # Values that exercise number formatting and parsing.
    v[0] = [0.1, -0.0, 1e-8, 3.4028235e38, -1.5, 2.0]
    v[1, 0] = np.float32(1.4e-45)  # smallest subnormal
    v[1, 1] = np.float32(123456.79)
    return v


def load_w2v(path, **kw):
    kv = KeyedVectors.load_word2vec_format(str(path), **kw)
    # With repeated words gensim 4.4 keeps the first occurrence but leaves
    # a `None` key and an unused row at the end; keep the words it indexed.
    words = [w for w in kv.index_to_key if w is not None]
    assert all(kv.key_to_index[w] == i for i, w in enumerate(words)), path
    return words, np.asarray(kv.vectors[: len(words)], dtype=np.float32)


def main():
    logging.basicConfig(level=logging.WARNING)
    OUT.mkdir(parents=True, exist_ok=True)
    vec = vectors()
    kv = KeyedVectors(vector_size=DIM)
    kv.add_vectors(WORDS, vec)

    expected = []  # (file name, words or None, array as read by the tools)

    # word2vec text and binary, as gensim writes them.
    kv.save_word2vec_format(str(OUT / "w2v.txt"), binary=False)
    kv.save_word2vec_format(str(OUT / "w2v.bin"), binary=True)
    expected.append(("w2v.txt", *load_w2v(OUT / "w2v.txt", binary=False)))
    expected.append(("w2v.bin", *load_w2v(OUT / "w2v.bin", binary=True)))

    # word2vec binary as the original C tool writes it: a newline after
    # each vector (word2vec.c: fprintf(fo, "%s ", word); fwrite(...);
    # fprintf(fo, "\n")).
    with open(OUT / "w2v_ctool.bin", "wb") as f:
        f.write(f"{len(WORDS)} {DIM}\n".encode())
        for w, row in zip(WORDS, vec):
            f.write(w.encode() + b" " + row.astype("<f4").tobytes() + b"\n")
    expected.append(("w2v_ctool.bin", *load_w2v(OUT / "w2v_ctool.bin", binary=True)))

    # GloVe as glove.c prints it: fprintf(fout, "%s", word), then
    # fprintf(fout, " %lf", value) per value, no header. Read by gensim with
    # no_header=True.
    with open(OUT / "glove.txt", "w", encoding="utf-8") as f:
        for w, row in zip(WORDS, vec):
            f.write(w + "".join(f" {float(x):f}" for x in row) + "\n")
    expected.append(("glove.txt", *load_w2v(OUT / "glove.txt", binary=False, no_header=True)))

    # fastText .vec as fasttext.cc prints it: a header, then per word
    # `word v1 v2 ... ` with std::setprecision(5) and a space after every
    # value (so each line ends in " \n").
    with open(OUT / "fasttext.vec", "w", encoding="utf-8") as f:
        f.write(f"{len(WORDS)} {DIM}\n")
        for w, row in zip(WORDS, vec):
            f.write(w + " " + "".join(f"{float(x):.5g} " for x in row) + "\n")
    expected.append(("fasttext.vec", *load_w2v(OUT / "fasttext.vec", binary=False)))

    # A text file with a repeated word: gensim keeps the first occurrence.
    with open(OUT / "w2v_dups.txt", "w", encoding="utf-8") as f:
        f.write(f"4 {DIM}\n")
        for w, row in [(WORDS[0], vec[0]), (WORDS[1], vec[1]), (WORDS[0], vec[2]), (WORDS[3], vec[3])]:
            f.write(w + " " + " ".join(str(x) for x in row) + "\n")
    expected.append(("w2v_dups.txt", *load_w2v(OUT / "w2v_dups.txt", binary=False)))

    # A binary file whose second word was cut in the middle of a UTF-8
    # character, as the C tool's byte-count truncation does. gensim needs
    # unicode_errors='replace' for it.
    with open(OUT / "w2v_badutf8.bin", "wb") as f:
        f.write(f"3 {DIM}\n".encode())
        for w, row in [(b"ok", vec[0]), ("東京".encode()[:4], vec[1]), (b"end", vec[2])]:
            f.write(w + b" " + row.astype("<f4").tobytes())
    expected.append(
        ("w2v_badutf8.bin", *load_w2v(OUT / "w2v_badutf8.bin", binary=True, unicode_errors="replace"))
    )

    # .npy: what np.save writes for a float32 (rows, dim) array, in C and
    # Fortran order, format versions 1.0, 2.0 and 3.0, big-endian, float64.
    np.save(OUT / "table.npy", vec)
    np.save(OUT / "table_fortran.npy", np.asfortranarray(vec))
    for version in [(2, 0), (3, 0)]:
        with open(OUT / f"table_v{version[0]}.npy", "wb") as f:
            np.lib.format.write_array(f, vec, version=version)
    np.save(OUT / "table_be.npy", vec.astype(">f4"))
    # float64, as np.zeros((n, d)) makes in the usual Keras recipe.
    np.save(OUT / "table_f8.npy", vec.astype("<f8"))
    for name in ["table.npy", "table_fortran.npy", "table_v2.npy", "table_v3.npy", "table_be.npy", "table_f8.npy"]:
        a = np.load(OUT / name)
        assert a.shape == vec.shape and np.array_equal(a.astype(np.float32), vec), name
        expected.append((name, None, a.astype("<f4")))

    out = io.StringIO()
    out.write(
        f"# Written by scripts/make_fixtures.py with gensim {gensim.__version__} and "
        f"NumPy {np.__version__}:\n"
        "# what they read from each fixture. `file NAME ROWS DIM`, then per row the\n"
        "# word (`-` for .npy) and the bits of each float32 in hex.\n"
    )
    for name, words, arr in expected:
        arr = np.ascontiguousarray(arr, dtype="<f4")
        out.write(f"file {name} {arr.shape[0]} {arr.shape[1]}\n")
        for i, row in enumerate(arr):
            word = words[i] if words is not None else "-"
            out.write(word + " " + " ".join(f"{b:08x}" for b in row.view("<u4")) + "\n")
    (OUT / "expected.txt").write_text(out.getvalue(), encoding="utf-8")
    print(f"wrote {len(expected)} fixtures to {OUT}")


if __name__ == "__main__":
    main()
