"""Encode and decode a model-sized state with brokerfl.wire.codec, against one plain copy of its bytes.

    python benchmarks/codec.py [--mb 100] [--repeat 5] [--tensors 20] [--torch] [--default-malloc]

The encoder cannot avoid one copy of the tensor data (pika wants ``bytes``), so the yardstick
is exactly that copy, at its fastest: the tensors' buffers copied into memory allocated once
beforehand (no page faults). A second, weaker baseline is also printed: ``b"".join`` of the
buffers into fresh memory (which pays the same page faults the encoder would). Decoding
should cost next to nothing, because it returns views of the body. For each state (the
``--mb`` one, a 10M-parameter one and a 100k-parameter one) this prints MB/s for both copies,
encode, decode and encode+decode (best of ``--repeat``), the ratio preallocated-copy time /
(encode + decode) time (the goal is >= 0.7), and whether the decoded tensors are zero-copy
views of the body.

The process tunes malloc as brokerfl's CLI does (:func:`brokerfl.transports.memory.tune_allocator`);
``--default-malloc`` keeps glibc's defaults, to see what the tuning is worth.
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

# Allow running as a plain script from anywhere, not only as `python -m`.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from brokerfl.transports.memory import allocator_mode, tune_allocator  # noqa: E402
from brokerfl.wire.codec import decode, encode  # noqa: E402

GOAL = 0.7


def make_state(parameters: int, tensors: int = 20, seed: int = 0, as_torch: bool = False) -> dict[str, Any]:
    """A state_dict-like map of float32 tensors: weight matrices and their (small) biases."""
    rng = np.random.default_rng(seed)
    layers = max(1, tensors // 2)
    per_layer = parameters // layers
    rows = max(1, int(math.sqrt(per_layer)))
    cols = max(1, (per_layer - rows) // rows)  # weight (rows x cols) + bias (rows) ~ per_layer
    state: dict[str, Any] = {}
    for i in range(layers):
        state[f"layer{i}.weight"] = rng.standard_normal((rows, cols), dtype=np.float32)
        state[f"layer{i}.bias"] = rng.standard_normal(rows, dtype=np.float32)
    short = parameters - sum(a.size for a in state.values())
    if short > 0:
        state["extra"] = rng.standard_normal(short, dtype=np.float32)
    if as_torch:
        import torch

        state = {k: torch.from_numpy(v) for k, v in state.items()}
    return state


def best_time(fn: Callable[[], Any], repeat: int) -> float:
    """Best of ``repeat`` timings of fn, each averaged over enough calls to last >= 20 ms."""
    start = time.perf_counter()
    fn()
    once = time.perf_counter() - start
    number = max(1, int(0.02 / max(once, 1e-9)))
    best = math.inf
    for _ in range(repeat):
        gc.collect()
        start = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - start) / number)
    return best


def as_numpy(value: Any) -> np.ndarray:
    return value if isinstance(value, np.ndarray) else value.numpy()


def measure(label: str, state: dict[str, Any], repeat: int) -> dict[str, float]:
    buffers = [as_numpy(v).reshape(-1).view(np.uint8) for v in state.values()]
    nbytes = sum(b.nbytes for b in buffers)
    body = encode(state)
    decoded = decode(body)
    flat = np.frombuffer(body, np.uint8)
    zero_copy = all(np.shares_memory(as_numpy(v), flat) for v in decoded.values() if as_numpy(v).size)
    exact = all(np.array_equal(as_numpy(decoded[k]), as_numpy(v)) for k, v in state.items())
    del decoded

    target = np.empty(nbytes, np.uint8)  # allocated and touched once: no page faults below
    target.fill(0)

    def copy_preallocated() -> None:
        at = 0
        for b in buffers:
            np.copyto(target[at : at + b.nbytes], b)
            at += b.nbytes

    copy = best_time(copy_preallocated, repeat)
    fresh = best_time(lambda: b"".join(buffers), repeat)
    enc = best_time(lambda: encode(state), repeat)
    dec = best_time(lambda: decode(body), repeat)
    both = best_time(lambda: decode(encode(state)), repeat)

    mb = nbytes / 1e6
    print(
        f"{label:<22} {mb:9.1f} MB  {len(state):3d} tensors | MB/s: copy preallocated {mb / copy:7.0f}  copy fresh "
        f"{mb / fresh:7.0f}  encode {mb / enc:8.0f}  "
        f"decode {mb / dec:10.0f}  enc+dec {mb / both:8.0f} | ratio {copy / both:5.2f} "
        f"({'ok' if copy / both >= GOAL else 'BELOW GOAL'})  zero-copy {'yes' if zero_copy else 'NO'}"
        f"  overhead {len(body) - nbytes} B{'' if exact else '  MISMATCH'}"
    )
    print(
        f"{'':<22} times: copy preallocated {copy * 1e3:.3f} ms  copy fresh {fresh * 1e3:.3f} ms (ratio vs fresh "
        f"{fresh / both:.2f})  encode {enc * 1e3:.3f} ms  decode {dec * 1e6:.1f} us  enc+dec {both * 1e3:.3f} ms"
    )
    return {
        "copy": copy,
        "copy_fresh": fresh,
        "encode": enc,
        "decode": dec,
        "both": both,
        "ratio": copy / both,
        "zero_copy": zero_copy,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mb", type=float, default=100, help="size of the main state in MB (10^6 bytes) of float32")
    parser.add_argument("--repeat", type=int, default=5, help="best of this many timings")
    parser.add_argument("--tensors", type=int, default=20, help="tensors per state")
    parser.add_argument("--torch", action="store_true", help="torch tensors instead of numpy arrays")
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="keep glibc's malloc defaults (no brokerfl.transports.memory tuning)",
    )
    args = parser.parse_args(argv)
    tuned = False if args.default_malloc else tune_allocator()

    sizes = [
        (f"{args.mb:g} MB state", int(args.mb * 1e6 / 4)),
        ("10M-param state", 10_000_000),
        ("100k-param state", 100_000),
    ]
    print(
        f"brokerfl.wire.codec benchmark: {'torch' if args.torch else 'numpy'} float32, best of {args.repeat}, malloc "
        f"{allocator_mode() if tuned else 'glibc defaults'}, goal ratio (vs preallocated copy) >= {GOAL}"
    )
    ok = True
    for label, parameters in sizes:
        state = make_state(parameters, args.tensors, as_torch=args.torch)
        result = measure(label, state, args.repeat)
        ok &= result["zero_copy"]
        del state
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
