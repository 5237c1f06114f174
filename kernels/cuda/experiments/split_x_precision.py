"""Would a tensor-core W4A16 decode matmul keep the CPU engine's accuracy? (RESULTS.md, "One round
trip in registers": the module's loop is bound by its 3.3 instructions per weight, and tensor cores
multiply in f16.)

Simulates one output row of a 4-bit matmul with groups of 128 and symmetric codes three ways
against a float64 reference:
  f32     the module's arithmetic: each code times x in f32, summed in f32 per lane piece, per
          group scaled and accumulated in f32 (the order of `qmatmul`, lanes reduced at the end);
  f16     x rounded to f16 and the products summed in f32 per 16 k (an mma's k), as a plain
          f16 tensor-core kernel would;
  split   x = hi + lo, both f16 (after a power-of-two row scale that puts max |x| near 2^14, so
          lo stays a normal number); a code (4 bits) times an f16 (11 bits) is exact in f32, so
          each 16-k chunk is sum(code * hi) + sum(code * lo) in f32.
Prints the largest error of each relative to the row's largest |output|, for activation rows
like a decoder's (mostly small, a few large outliers). Standard library only; a few seconds.

    python3 kernels/cuda/experiments/split_x_precision.py
"""

import math
import random
import struct


def f32(v: float) -> float:
    return struct.unpack("f", struct.pack("f", v))[0]


def f16(v: float) -> float:
    return struct.unpack("e", struct.pack("e", v))[0]


K, GROUP, ROWS, LANES, LANE_K = 4096, 128, 8, 128, 8


def activation_row(rng: random.Random) -> list:
    x = [rng.gauss(0.0, 0.6) for _ in range(K)]
    for _ in range(6):  # outlier features, as real hidden states have
        x[rng.randrange(K)] = rng.choice([-1, 1]) * rng.uniform(20.0, 60.0)
    return x


def row_outputs(rng: random.Random, x: list) -> tuple:
    codes = [[rng.randrange(16) for _ in range(K)] for _ in range(ROWS)]
    scales = [[f32(f16(rng.uniform(0.5, 1.5) / math.sqrt(18.7 * K))) for _ in range(K // GROUP)]
              for _ in range(ROWS)]
    exact, mod, half, split = [], [], [], []
    # The split's row scale: a power of two, exact.
    shift = 14 - math.frexp(max(abs(v) for v in x))[1]
    hi = [f16(math.ldexp(v, shift)) for v in x]
    lo = [f16(math.ldexp(v, shift) - h) for v, h in zip(x, hi)]
    xh = [f16(v) for v in x]
    for r in range(ROWS):
        c, s = codes[r], scales[r]
        exact.append(sum(s[k // GROUP] * (c[k] - 8) * x[k] for k in range(K)))
        # The module: each lane's piece of LANE_K k (one group per piece) folded with its scale:
        # scale * sum(code * x) + (-8 * scale) * sum(x), accumulated per lane, lanes summed last.
        lane_acc = [0.0] * LANES
        for k0 in range(0, K, LANE_K):
            lane = (k0 // LANE_K) % LANES
            gs = 0.0
            xsum = 0.0
            for k in range(k0, k0 + LANE_K):
                gs = f32(gs + f32(c[k] * x[k]))
                xsum = f32(xsum + x[k])
            sc = s[k0 // GROUP]
            lane_acc[lane] = f32(lane_acc[lane] + f32(f32(sc * gs) + f32(f32(-8.0 * sc) * xsum)))
        total = 0.0
        for v in lane_acc:
            total = f32(total + v)
        mod.append(total)
        # Tensor-core forms: per 16 k an f32 sum of exact products, chunks accumulated in f32
        # per group, the group scaled and its offset folded in as the module does.
        for target, parts in ((half, (xh,)), (split, (hi, lo))):
            acc = 0.0
            for g in range(K // GROUP):
                gsum = 0.0
                xsum = 0.0
                for k0 in range(g * GROUP, (g + 1) * GROUP, 16):
                    for p in parts:
                        chunk = 0.0
                        for k in range(k0, k0 + 16):
                            chunk = f32(chunk + c[k] * p[k])  # the product is exact in f32
                        gsum = f32(gsum + chunk)
                        xsum = f32(xsum + f32(sum(p[k0:k0 + 16])))
                sc = s[g]
                acc = f32(acc + f32(f32(sc * gsum) + f32(f32(-8.0 * sc) * xsum)))
            if len(parts) == 2:
                acc = math.ldexp(acc, -shift)
            target.append(acc)
    return exact, mod, half, split


def main() -> None:
    rng = random.Random(7)
    worst = {"f32 (the module)": 0.0, "f16 activations": 0.0, "split f16 hi + lo": 0.0}
    for _ in range(4):
        x = activation_row(rng)
        exact, mod, half, split = row_outputs(rng, x)
        top = max(abs(v) for v in exact)
        for name, got in zip(worst, (mod, half, split)):
            err = max(abs(a - b) for a, b in zip(got, exact)) / top
            worst[name] = max(worst[name], err)
    for name, err in worst.items():
        print(f"{name:20s} largest error / largest |output|: {err:.2e}")


if __name__ == "__main__":
    main()
