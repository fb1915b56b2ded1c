#!/usr/bin/env python3
"""Writes the safetensors fixtures of tests/checkpoint.rs with the
safetensors Python package and NumPy, and checks a checkpoint that embtable
wrote.

    python3 -m venv /tmp/st && /tmp/st/bin/pip install safetensors numpy
    /tmp/st/bin/python scripts/make_checkpoint_fixture.py

writes

- tests/fixtures/tables.safetensors: a table in each float dtype embtable
  reads (F32, F16, BF16, F64), each beside `{name}_as_f32`, the float32
  values NumPy converts it to (for BF16, which NumPy lacks, the bits shifted
  into the high half of a float32, which is what bfloat16 means), plus
  tensors a table cannot be read from;
- tests/fixtures/checkpoint_py.safetensors: an embtable checkpoint built
  from the layout documented in src/io/checkpoint.rs only: tables "user"
  (SGD with momentum, DenseExact, lagging rows), "item" (row-wise Adagrad)
  and "frozen" (no optimizer). Values are small multiples of 1/8, so the
  Rust test recomputes them exactly.

The other direction (Python reads what Rust wrote):

    EMBTABLE_CHECKPOINT_OUT=/tmp/ck cargo test --release --test checkpoint written_for_python
    /tmp/st/bin/python scripts/make_checkpoint_fixture.py verify /tmp/ck

checks /tmp/ck/checkpoint.safetensors against /tmp/ck/expected.txt (every
tensor's dtype, shape and value bits, and every metadata entry, as the Rust
test saw them).
"""

import sys
from pathlib import Path

import numpy as np
from safetensors import TensorSpec, safe_open, serialize_file
from safetensors.numpy import load_file, save_file

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures"


def f32(x):
    """The shortest repr of a float32 value widened to float64, as embtable
    writes config values."""
    return repr(float(np.float32(x)))


def tables():
    f32_table = np.array(
        [
            [0.1, -0.0, 1e-8, 3.4028235e38, -1.5],
            [1.4e-45, 123456.79, np.nan, np.inf, -np.inf],
            [1.0, 2.0, 3.0, -4.0, 5.5],
        ],
        dtype=np.float32,
    )
    f16_bits = np.array(
        [
            [0x0000, 0x8000, 0x0001, 0x03FF],  # zeros, smallest and largest subnormal
            [0x0400, 0x7BFF, 0xFBFF, 0x3C00],  # smallest normal, ±65504, 1
            [0x7C00, 0xFC00, 0x7E00, 0xFE01],  # ±inf, quiet NaNs (one with a payload)
            [0x3555, 0x2E66, 0xC100, 0x8001],  # 1/3, 0.1, -2.5, -smallest subnormal
        ],
        dtype=np.uint16,
    )
    f16_table = f16_bits.view(np.float16)
    f64_table = np.array(
        [
            [0.1, 1 / 3, 1e-300, -2.5],
            [1e300, 3.4028235677973366e38, 3.4028234663852886e38, -1e-46],
        ],
        dtype=np.float64,
    )
    bf16_bits = np.array(
        [
            [0x3F80, 0xBF80, 0x0001, 0x7F80],  # 1, -1, smallest subnormal, inf
            [0xFF80, 0x7FC0, 0x4049, 0x8000],  # -inf, NaN, 3.140625, -0
        ],
        dtype=np.uint16,
    )
    with np.errstate(over="ignore"):
        f64_as_f32 = f64_table.astype(np.float32)
    arrays = {
        "f32": f32_table,
        "f16": f16_table,
        "f16_as_f32": f16_table.astype(np.float32),
        "f64": f64_table,
        "f64_as_f32": f64_as_f32,
        "bf16_as_f32": (bf16_bits.astype(np.uint32) << 16).view(np.float32),
        "vector": np.arange(5, dtype=np.float32),
        "ids": np.arange(4, dtype=np.int64).reshape(2, 2),
        "no_rows": np.zeros((0, 3), dtype=np.float32),
    }
    specs = {
        name: TensorSpec(
            dtype=a.dtype.name, shape=list(a.shape), data_ptr=a.ctypes.data, data_len=a.nbytes
        )
        for name, a in arrays.items()
    }
    specs["bf16"] = TensorSpec(
        dtype="bfloat16",
        shape=list(bf16_bits.shape),
        data_ptr=bf16_bits.ctypes.data,
        data_len=bf16_bits.nbytes,
    )
    path = OUT / "tables.safetensors"
    serialize_file(specs, str(path))
    # The arrays stay alive until here, as serialize_file requires. NumPy
    # cannot hold the BF16 tensor, so the others are read back one by one.
    with safe_open(str(path), "np") as f:
        for name, a in arrays.items():
            back = f.get_tensor(name)
            assert back.dtype == a.dtype and back.shape == a.shape, name
            assert back.tobytes() == a.tobytes(), name


def pattern(rows, cols, scale, offset):
    """rows × cols float32 values (i * scale + offset), exact for the
    scales used here."""
    return (np.arange(rows * cols, dtype=np.float64) * scale + offset).astype(np.float32).reshape(
        rows, cols
    )


def checkpoint():
    tensors = {
        "user.weight": pattern(5, 3, 0.25, -1.0),
        "user.optim.momentum": pattern(5, 3, -0.125, 0.5),
        "user.optim.last_step": np.array([4, 2, 4, 0, 3], dtype=np.int64),
        "item.weight": pattern(6, 2, 0.5, -3.0),
        "item.optim.accumulator": (np.arange(6, dtype=np.float32) * 0.5 + 0.125),
        "frozen.weight": pattern(2, 4, 1.0, 10.0),
    }
    metadata = {
        "embtable.format": "embtable-checkpoint",
        "embtable.version": "1",
        "embtable.tables": "user,item,frozen",
        "user.optim.kind": "sgd",
        "user.optim.steps": "4",
        "user.optim.config": ",".join(
            [
                f"lr={f32(0.05)}",
                f"momentum={f32(0.9)}",
                "nesterov=0.0",
                "weight_decay=0.0",
                "semantics=1.0",
                "style=0.0",
            ]
        ),
        "user.optim.shape": "5,3",
        "user.optim.arrays": "momentum",
        "item.optim.kind": "rowwise_adagrad",
        "item.optim.steps": "7",
        "item.optim.config": f"lr={f32(0.01)},initial_accumulator_value=0.0,epsilon={f32(1e-10)}",
        "item.optim.shape": "6,2",
        "item.optim.arrays": "accumulator",
    }
    path = OUT / "checkpoint_py.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    with safe_open(str(path), "np") as f:
        assert f.metadata() == metadata


def verify(out_dir):
    """Checks DIR/checkpoint.safetensors against DIR/expected.txt."""
    out_dir = Path(out_dir)
    path = out_dir / "checkpoint.safetensors"
    tensors = load_file(str(path))
    with safe_open(str(path), "np") as f:
        metadata = f.metadata()
    want_meta = {}
    want_tensors = {}
    for line in (out_dir / "expected.txt").read_text().splitlines():
        kind, name, *rest = line.split("\t")
        if kind == "meta":
            want_meta[name] = rest[0]
        else:
            dtype, shape, values = rest
            shape = tuple(int(d) for d in shape.split(",") if d)
            if dtype == "F32":
                bits = np.array([int(v, 16) for v in values.split(",")], dtype=np.uint32)
                array = bits.view(np.float32).reshape(shape)
            else:
                array = np.array([int(v) for v in values.split(",")], dtype=np.int64).reshape(shape)
            want_tensors[name] = array
    assert metadata == want_meta, (metadata, want_meta)
    assert sorted(tensors) == sorted(want_tensors), (sorted(tensors), sorted(want_tensors))
    for name, want in want_tensors.items():
        got = tensors[name]
        assert got.dtype == want.dtype, (name, got.dtype, want.dtype)
        assert got.shape == want.shape, (name, got.shape, want.shape)
        assert got.tobytes() == want.tobytes(), name
    config = dict(kv.split("=") for kv in metadata["item.optim.config"].split(","))
    print(
        f"ok: {len(tensors)} tensors, {len(metadata)} metadata entries; "
        f"item: {metadata['item.optim.kind']} lr {np.float32(float(config['lr']))}, "
        f"weight {tensors['item.weight'].shape} {tensors['item.weight'].dtype}"
    )


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "verify":
        verify(sys.argv[2])
        return
    OUT.mkdir(parents=True, exist_ok=True)
    tables()
    checkpoint()
    print(f"wrote {OUT / 'tables.safetensors'} and {OUT / 'checkpoint_py.safetensors'}")


if __name__ == "__main__":
    main()
