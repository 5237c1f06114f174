// Host check of the DCU's W4A8 piece (`fd_qpiece_i8dot` in quant.cu), which no DCU here can run:
// the function's own text (pasted below this file by the test `the_dcu_w4a8_piece_sums_what_the_f32_
// path_sums` in kernels/src/cuda.rs) compiled for the CPU, with the two device intrinsics it uses
// written out as CUDA and HIP document them, and its sums compared with the plain definition over
// random codes and int8 activations. Prints "ok N" or the first mismatch.
#include <cstdio>
#include <cstdlib>

#define __device__
#define __forceinline__ inline
#define QPANEL 8

// Byte i of the result is byte (s >> 4i) & 7 of the eight bytes y:x (x bytes 0 to 3).
static unsigned host_byte_perm(unsigned x, unsigned y, unsigned s) {
    const unsigned long long v = ((unsigned long long)y << 32) | x;
    unsigned r = 0;
    for (int i = 0; i < 4; i++) r |= (unsigned)((v >> (8 * ((s >> (4 * i)) & 7))) & 0xff) << (8 * i);
    return r;
}
// v_dot4_i32_i8: the four signed byte products summed into c.
static int host_sdot4(int a, int b, int c, bool) {
    for (int i = 0; i < 4; i++) c += (signed char)(a >> (8 * i)) * (signed char)(b >> (8 * i));
    return c;
}
#define __byte_perm host_byte_perm
#define __builtin_amdgcn_sdot4 host_sdot4

#include "i8dot_piece.inc"

int main() {
    srand(7);
    const int TOKENS = 4;
    int checked = 0;
    for (int trial = 0; trial < 2000; trial++) {
        unsigned slots[4][2];
        for (int kk = 0; kk < 4; kk++)
            for (int s = 0; s < 2; s++) {
                unsigned w = 0;
                for (int j = 0; j < 4; j++) w |= (unsigned)(rand() % 16) << (8 * j);
                slots[kk][s] = w;
            }
        const int base_k = 4 * (trial % 4);
        float xv[TOKENS][16];
        for (int m = 0; m < TOKENS; m++)
            for (int i = 0; i < 16; i++) xv[m][i] = (float)(rand() % 255 - 127);
        float gs[TOKENS][QPANEL], want[TOKENS][QPANEL];
        for (int m = 0; m < TOKENS; m++)
            for (int r = 0; r < QPANEL; r++) {
                gs[m][r] = want[m][r] = (float)(m * 8 + r);
                // Row 4s + j at k: byte j of slots[k][s] (quant.cu's panel layout).
                for (int kk = 0; kk < 4; kk++)
                    want[m][r] += (float)((slots[kk][r / 4] >> (8 * (r % 4))) & 0xff) *
                                  xv[m][base_k + kk];
            }
        fd_qpiece_i8dot<TOKENS>(slots, xv, base_k, gs);
        for (int m = 0; m < TOKENS; m++)
            for (int r = 0; r < QPANEL; r++) {
                if (gs[m][r] != want[m][r]) {
                    printf("mismatch trial %d token %d row %d: %g, want %g\n", trial, m, r,
                           gs[m][r], want[m][r]);
                    return 1;
                }
                checked++;
            }
    }
    printf("ok %d\n", checked);
    return 0;
}
