"""Files: pretrained vectors, .npy, safetensors, and checkpoints shared with
the Rust library bit for bit."""

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import embtable

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"


def expected_vectors():
    """tests/fixtures/expected.txt: what gensim and NumPy read from each fixture."""
    files, current = {}, None
    for line in (FIXTURES / "expected.txt").read_text(encoding="utf-8").splitlines():
        if line.startswith("#") or not line:
            continue
        parts = line.split(" ")
        if parts[0] == "file":
            current = files.setdefault(parts[1], [])
        else:
            bits = np.array([int(h, 16) for h in parts[1:]], dtype=np.uint32)
            current.append((parts[0], bits.view(np.float32)))
    return files


@pytest.mark.parametrize("name, read", [
    ("w2v.txt", lambda p: embtable.read_word2vec(p)),
    ("w2v.bin", lambda p: embtable.read_word2vec(p, binary=True)),
    ("glove.txt", lambda p: embtable.read_glove(p)),
    ("fasttext.vec", lambda p: embtable.read_fasttext_vec(p)),
])
def test_pretrained_vectors_read_as_gensim_reads_them(name, read):
    want = expected_vectors()[name]
    pretrained = read(FIXTURES / name)
    vocab, table = pretrained
    assert list(vocab) == [w for w, _ in want]
    assert len(vocab) == table.num_rows == len(want)
    values = table.to_numpy()
    for row, (word, bits) in enumerate(want):
        assert vocab[word] == row and word in vocab
        np.testing.assert_array_equal(values[row].view(np.uint32), bits.view(np.uint32))
        np.testing.assert_array_equal(pretrained.vector(word).view(np.uint32), bits.view(np.uint32))


def test_vocab_is_a_mapping(tmp_path):
    from collections.abc import Mapping

    vocab, table = embtable.read_word2vec(FIXTURES / "w2v.txt")
    assert isinstance(vocab, Mapping)
    assert vocab.get("king") == 1 and vocab.get("pawn") is None and vocab.get("pawn", -1) == -1
    assert dict(vocab.items()) == {w: i for i, w in enumerate(vocab.words)}
    assert "pawn" not in vocab and 3 not in vocab
    with pytest.raises(KeyError):
        vocab["pawn"]
    # write -> read is bit for bit, whatever the vocabulary is given as.
    for given in (vocab, list(vocab), dict(vocab.items())):
        for binary in (False, True):
            path = tmp_path / f"out-{binary}.w2v"
            embtable.write_word2vec(path, given, table, binary=binary)
            back_vocab, back = embtable.read_word2vec(path, binary=binary)
            assert back_vocab == vocab and back == table
    embtable.write_glove(tmp_path / "g.txt", vocab, table)
    assert embtable.read_glove(tmp_path / "g.txt").table == table
    with pytest.raises(ValueError, match="repeats|twice|distinct|appears"):
        embtable.Vocab(["a", "b", "a"])


def test_table_for_a_task_vocabulary():
    pretrained = embtable.read_word2vec(FIXTURES / "w2v.txt")
    word_index = {"king": 1, "zzz": 2, "queen": 3}
    table, coverage = pretrained.table_for(word_index, 5, padding_idx=0)
    assert table.shape == (5, pretrained.dim)
    np.testing.assert_array_equal(table.row(1), pretrained.vector("king"))
    np.testing.assert_array_equal(table.row(3), pretrained.vector("queen"))
    assert (table.row(0) == 0).all() and (table.row(2) == 0).all()
    assert coverage["found"] == 2 and coverage["missing"] == 1
    assert coverage["first_missing"] == [(2, "zzz")]


def test_npy_and_safetensors(tmp_path, rng):
    values = rng.standard_normal((9, 5)).astype(np.float32)
    table = embtable.Table.from_numpy(values)
    embtable.save_npy(tmp_path / "t.npy", table)
    np.testing.assert_array_equal(np.load(tmp_path / "t.npy"), values)
    assert embtable.load_npy(tmp_path / "t.npy") == table
    np.save(tmp_path / "f64.npy", values.astype(np.float64))
    assert embtable.load_npy(tmp_path / "f64.npy") == table
    embtable.save_table_safetensors(tmp_path / "t.safetensors", "emb.weight", table)
    assert embtable.load_table_safetensors(tmp_path / "t.safetensors", "emb.weight") == table


def test_file_errors_are_oserror_and_valueerror(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError) as err:
        embtable.read_word2vec(missing)
    assert err.value.errno == 2 and "nope.txt" in str(err.value)
    with pytest.raises(OSError):
        embtable.load_npy(tmp_path)  # a directory
    bad = tmp_path / "bad.txt"
    bad.write_text("2 3\nking 1 2 3\nqueen 1 x 3\n")
    with pytest.raises(ValueError, match=r"bad\.txt: line 3.*\"x\""):
        embtable.read_word2vec(bad)
    with pytest.raises(OSError):
        embtable.save_npy(tmp_path / "no" / "dir" / "t.npy", embtable.Table.zeros(2, 2))


def test_checkpoints_round_trip_in_python(tmp_path, rng):
    values = rng.standard_normal((12, 4)).astype(np.float32)
    layer = embtable.Embedding(values, embtable.RmsProp.keras(momentum=0.9, semantics="dense_exact"))
    for step in range(4):
        layer.backward_step([step, 2], rng.standard_normal((2, 4)).astype(np.float32))
    other = embtable.Table.from_numpy(values)
    path = tmp_path / "ckpt.safetensors"
    embtable.save_checkpoint(path, {"user": layer, "frozen": other}, metadata={"epoch": "3"})
    ckpt = embtable.load_checkpoint(path)
    assert ckpt.names == ["user", "frozen"] and "user" in ckpt and len(ckpt) == 2
    assert ckpt.metadata("epoch") == "3" and ckpt.metadata("seed") is None
    table, opt = ckpt["user"]
    assert opt.config == layer.optimizer.config
    frozen_table, none = ckpt["frozen"]
    assert none is None and frozen_table == other
    # Lagging rows were saved as such: resuming gives the same bits.
    resumed = embtable.Embedding(np.zeros((12, 4)), embtable.Sgd.keras())
    resumed.load_state_dict(ckpt.state_dict("user"))
    g = rng.standard_normal((2, 4)).astype(np.float32)
    layer.backward_step([7, 9], g)
    resumed.backward_step([7, 9], g)
    layer.flush()
    resumed.flush()
    np.testing.assert_array_equal(resumed.weight, layer.weight)


def test_checkpoint_written_by_rust_loads_in_python_and_back_bit_for_bit(tmp_path):
    """The Rust test `written_for_python` saves a checkpoint and lists every
    tensor's bits and every metadata entry; Python reads exactly those, and
    saving what it read gives the same file, byte for byte."""
    cargo = shutil.which("cargo")
    assert cargo, "cargo is needed to write the Rust side of this test"
    out = tmp_path / "from-rust"
    subprocess.run(
        [cargo, "test", "--release", "--test", "checkpoint", "written_for_python", "--quiet"],
        cwd=REPO, env=dict(os.environ, EMBTABLE_CHECKPOINT_OUT=str(out)), check=True,
    )
    path = out / "checkpoint.safetensors"
    ckpt = embtable.load_checkpoint(path)
    assert ckpt.names == ["user", "item"]
    tensors = {}
    for line in (out / "expected.txt").read_text().splitlines():
        kind, name, *rest = line.split("\t")
        if kind == "tensor":
            dtype, shape, values = rest
            tensors[name] = (dtype, [int(s) for s in shape.split(",") if s], values.split(","))
    for name in ckpt.names:
        table, opt = ckpt[name]
        dtype, shape, values = tensors[f"{name}.weight"]
        assert list(table.shape) == shape
        np.testing.assert_array_equal(
            table.to_numpy().reshape(-1).view(np.uint32),
            np.array([int(v, 16) for v in values], dtype=np.uint32))
        state = opt.state_dict()
        for array, got in state["arrays"].items():
            _, shape, values = tensors[f"{name}.optim.{array}"]
            assert list(got.shape) == shape
            np.testing.assert_array_equal(
                got.reshape(-1).view(np.uint32),
                np.array([int(v, 16) for v in values], dtype=np.uint32))
        if f"{name}.optim.last_step" in tensors:
            _, _, values = tensors[f"{name}.optim.last_step"]
            assert state["last_step"].tolist() == [int(v) for v in values]
    # Back: what Python saves is what Rust wrote, byte for byte.
    again = tmp_path / "from-python.safetensors"
    embtable.save_checkpoint(again, {name: ckpt[name] for name in ckpt.names})
    assert again.read_bytes() == path.read_bytes()


def test_layer_save_and_load_resume_bit_for_bit(tmp_path, rng):
    values = rng.standard_normal((30, 5)).astype(np.float32)
    layer = embtable.Embedding(values, embtable.Adam.keras(lr=0.01), padding_idx=0,
                               max_norm=2.0, max_norm_at="lookup")
    for _ in range(4):
        ids = rng.integers(0, 30, size=8)
        layer.forward(ids)
        layer.backward_step(ids, rng.standard_normal((8, 5)).astype(np.float32))
    path = tmp_path / "layer.safetensors"
    layer.backward([1], np.ones((1, 5), np.float32))
    with pytest.raises(ValueError, match="grad"):
        layer.save(path)  # the pending gradient would be lost
    assert not path.exists()
    layer.clear_grad()
    layer.save(path)
    back = embtable.Embedding.load(path)
    assert (back.padding_idx, back.max_norm, back.max_norm_at, back.trainable) == (
        0, 2.0, "lookup", True)
    assert isinstance(back.optimizer, embtable.Adam)
    assert back.optimizer.config == layer.optimizer.config
    a, b = layer.optimizer.state_dict(), back.optimizer.state_dict()
    assert a["steps"] == b["steps"] and a["lr_history"] == b["lr_history"]
    np.testing.assert_array_equal(a["last_step"], b["last_step"])
    for name in a["arrays"]:
        np.testing.assert_array_equal(a["arrays"][name], b["arrays"][name])
    np.testing.assert_array_equal(back.weight, layer.weight)
    for _ in range(3):  # both go on alike, bit for bit
        ids = rng.integers(0, 30, size=8)
        g = rng.standard_normal((8, 5)).astype(np.float32)
        np.testing.assert_array_equal(back.forward(ids), layer.forward(ids))
        layer.backward_step(ids, g)
        back.backward_step(ids, g)
    layer.flush()
    back.flush()
    np.testing.assert_array_equal(back.weight, layer.weight)
    # The file is an ordinary checkpoint of one layer.
    ckpt = embtable.load_checkpoint(path)
    assert len(ckpt) == 1


def test_frozen_layers_and_several_layers_per_checkpoint(tmp_path, rng):
    frozen = embtable.Embedding(rng.standard_normal((6, 2)).astype(np.float32), trainable=False)
    path = tmp_path / "frozen.safetensors"
    frozen.save(path)
    back = embtable.Embedding.load(path)
    assert back.optimizer is None and not back.trainable
    np.testing.assert_array_equal(back.weight, frozen.weight)
    with pytest.raises(TypeError, match="optimizer"):
        back.trainable = True
    back.optimizer = embtable.Sgd.torch(lr=0.5)
    back.trainable = True
    back.backward_step([1], np.ones((1, 2), np.float32))
    assert not np.array_equal(back.weight[1], frozen.weight[1])

    users = embtable.Embedding((8, 3), embtable.Ftrl.keras(), padding_idx=7)
    users.backward_step([1, 2], np.ones((2, 3), np.float32))
    both = tmp_path / "both.safetensors"
    embtable.save_checkpoint(both, {"users": users, "words": frozen})
    with pytest.raises(ValueError, match="take_layer"):
        embtable.Embedding.load(both)
    ckpt = embtable.load_checkpoint(both)
    table, none = ckpt["words"]
    assert none is None and table == frozen.table
    taken = ckpt.take_layer("users")
    assert taken.padding_idx == 7 and isinstance(taken.optimizer, embtable.Ftrl)
    np.testing.assert_array_equal(taken.weight, users.weight)
    assert ckpt.names == ["words"]
    with pytest.raises(KeyError):
        ckpt.take_layer("users")
    assert ckpt.take_layer("words").optimizer is None
