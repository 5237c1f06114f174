"""Checks M's tile layout in `narrow_matmul_bench.cu` without a GPU: writes codes the way
`fill_tiles` does, unpacks each lane's words the way `fd_codes_f16x2` orders them, assembles the
warp's mma operands from the fragments as the PTX ISA places them for `mma.m16n8k16` (A: register
r of lane (g, t) holds rows g, g + 8, g, g + 8 at k 2t, 2t, 2t + 8, 2t + 8 and the next k; B:
k 2t, 2t + 1 and 2t + 8, 2t + 9 of column g; D: rows g, g + 8 at columns 2t, 2t + 1), and compares
the kernel's sums with the matrix product. Exact arithmetic (the low halves of x are zero here):
the error printed should be at rounding level. Standard library only.

    python3 kernels/cuda/experiments/mma_layout_check.py
"""

import random
n, k, group = 32, 256, 128
rng = random.Random(3)
code = [[rng.randrange(1, 16) for _ in range(k)] for _ in range(n)]
x = [rng.uniform(-1, 1) for _ in range(k)]
scale = [[rng.uniform(0.5, 1.5) for _ in range(k // group)] for _ in range(n)]
# fill_tiles
words = {}
for row in range(n):
    for kk in range(k):
        tile, r16 = row // 16, row % 16
        g, half = r16 % 8, r16 // 8
        chunk, w, kin = kk // 64, (kk % 64) // 16, kk % 16
        high8, t, odd = kin // 8, (kin % 8) // 2, kin % 2
        j = half | (high8 << 1) | (odd << 2)
        lane = g * 4 + t
        word = ((tile * (k // 64) + chunk) * 32 + lane) * 4 + w
        words[word] = words.get(word, 0) | (code[row][kk] << (4 * j))
def unpack(wd):
    nib = [(wd >> (4 * j)) & 15 for j in range(8)]
    # registers: a0 = (n0, n4), a1 = (n1, n5), a2 = (n2, n6), a3 = (n3, n7); value - 8
    return [(nib[0] - 8, nib[4] - 8), (nib[1] - 8, nib[5] - 8), (nib[2] - 8, nib[6] - 8), (nib[3] - 8, nib[7] - 8)]
out = [0.0] * n
chunks, groups, per_group = k // 64, k // group, group // 64
for tile in range(n // 16):
    acc = [[0.0, 0.0] for _ in range(32)]
    for grp in range(groups):
        D = [[0.0] * 4 for _ in range(32)]
        for c in range(per_group):
            chunk = grp * per_group + c
            for w in range(4):
                k0 = chunk * 64 + w * 16
                # gather the warp's fragments into A (16x16) and B (16x8) per the PTX layout
                A = [[None] * 16 for _ in range(16)]
                B = [[0.0] * 8 for _ in range(16)]
                for lane in range(32):
                    g, t = lane >> 2, lane & 3
                    regs = unpack(words.get(((tile * chunks + chunk) * 32 + lane) * 4 + w, 0))
                    pos = [(g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8), (g + 8, 2 * t + 8)]
                    for r, (row, col) in enumerate(pos):
                        A[row][col], A[row][col + 1] = regs[r]
                    if g < 2:
                        src = x if g == 0 else [0.0] * k  # lo = 0 in this emulation
                        B[2 * t][g], B[2 * t + 1][g] = src[k0 + 2 * t], src[k0 + 2 * t + 1]
                        B[2 * t + 8][g], B[2 * t + 9][g] = src[k0 + 2 * t + 8], src[k0 + 2 * t + 9]
                assert all(v is not None for rowv in A for v in rowv)
                C = [[sum(A[m][kk] * B[kk][nn] for kk in range(16)) for nn in range(8)] for m in range(16)]
                for lane in range(32):
                    g, t = lane >> 2, lane & 3
                    D[lane][0] += C[g][2 * t]; D[lane][1] += C[g][2 * t + 1]
                    D[lane][2] += C[g + 8][2 * t]; D[lane][3] += C[g + 8][2 * t + 1]
        for lane in range(32):
            g, t = lane >> 2, lane & 3
            if t == 0:
                acc[lane][0] += scale[16 * tile + g][grp] * (D[lane][0] + D[lane][1])
                acc[lane][1] += scale[16 * tile + g + 8][grp] * (D[lane][2] + D[lane][3])
    for lane in range(0, 32, 4):
        g = lane >> 2
        out[16 * tile + g] = acc[lane][0]
        out[16 * tile + g + 8] = acc[lane][1]
ref = [sum(scale[r][kk // group] * (code[r][kk] - 8) * x[kk] for kk in range(k)) for r in range(n)]
err = max(abs(a - b) for a, b in zip(out, ref))
print("max abs error", err, "largest", max(abs(v) for v in ref))
