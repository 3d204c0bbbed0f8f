/* replay_main.c — runs a libFuzzer harness once on each file given, without libFuzzer: the
 * fuzz corpora and the inputs that once crashed (tests/fuzz/regress/) become ordinary
 * regression tests of `make check`, built with gcc in the release and ASan+UBSan builds.
 * Prints one line per file; exit 1 if any input could not be read (a crash ends it anyway). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int main(int argc, char **argv)
{
    int bad = 0;
    for (int i = 1; i < argc; i++) {
        FILE *f = fopen(argv[i], "rb");
        if (!f) {
            fprintf(stderr, "replay: cannot open %s\n", argv[i]);
            bad = 1;
            continue;
        }
        size_t cap = 1 << 16, n = 0, got;
        uint8_t *buf = malloc(cap);
        while (buf && (got = fread(buf + n, 1, cap - n, f)) > 0) {
            n += got;
            if (n == cap) {
                uint8_t *nb = realloc(buf, cap *= 2);
                if (!nb) { free(buf); buf = NULL; }
                else buf = nb;
            }
        }
        fclose(f);
        if (!buf) { fprintf(stderr, "replay: out of memory\n"); return 1; }
        LLVMFuzzerTestOneInput(buf, n);
        free(buf);
        printf("ok %s (%zu bytes)\n", argv[i], n);
    }
    return bad;
}
