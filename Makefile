# surveyproc build. `make` builds bin/surveyproc and lib/libsurveyproc.a.
# Every dependency is found with pkg-config; fftw3_mpi / fftw3_omp have no .pc file.
# Targets: all deps check demo bench fuzz install format clean  (SANITIZE=1 for ASan+UBSan)

PREFIX  ?= /usr/local
CC      := mpicc
PKGS    := hdf5-openmpi cfitsio wcslib fftw3 openblas lapacke yaml-0.1
TESTPKG := cmocka

GIT_HASH := $(shell git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
GIT_DIRTY := $(shell test -n "$$(git status --porcelain --untracked-files=no 2>/dev/null)" && echo -dirty)
VERSION := 0.1.0

OPT      ?= -O2
CFLAGS   ?= $(OPT) -g
CFLAGS   += -std=c11 -D_GNU_SOURCE -Wall -Wextra -fopenmp -MMD -MP -Iinclude \
            -DSP_VERSION='"$(VERSION)"' -DSP_GIT_HASH='"$(GIT_HASH)$(GIT_DIRTY)"'
ifeq ($(SANITIZE),1)
  CFLAGS  += -fsanitize=address,undefined -fno-omit-frame-pointer -O1
  LDFLAGS += -fsanitize=address,undefined
  BUILD   := build/san
else
  BUILD   := build/rel
endif
# wcslib's include dir must come AFTER ours: it has generic names (log.h, tab.h).
PKG_CFLAGS := $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
PKG_LIBS   := -lfftw3_mpi -lfftw3_omp $(shell pkg-config --libs $(PKGS) 2>/dev/null) -lm
CFLAGS  += $(PKG_CFLAGS)
LDFLAGS += -fopenmp

LIB_SRC  := $(sort $(wildcard src/*/*.c src/*.c))
LIB_SRC  := $(filter-out src/cli/%,$(LIB_SRC))
CLI_SRC  := $(sort $(wildcard src/cli/*.c))
LIB_OBJ  := $(patsubst %.c,$(BUILD)/%.o,$(LIB_SRC))
CLI_OBJ  := $(patsubst %.c,$(BUILD)/%.o,$(CLI_SRC))
TEST_SRC := $(sort $(wildcard tests/unit/test_*.c tests/mpi/test_*.c))
TEST_BIN := $(patsubst tests/%.c,$(BUILD)/tests/%,$(TEST_SRC))
TEST_SUPPORT := $(BUILD)/tests/support.o
# fuzz harnesses (tests/fuzz/fuzz_*.c) replayed on their corpora by make check, without libFuzzer
FUZZ_NAMES := config csv fits_wcs
FUZZ_REPLAY := $(patsubst %,$(BUILD)/tests/fuzz/replay_%,$(FUZZ_NAMES))

LIBA := lib/libsurveyproc.a
BIN  := bin/surveyproc
ifeq ($(SANITIZE),1)
  LIBA := $(BUILD)/libsurveyproc.a
  BIN  := $(BUILD)/surveyproc
endif

.PHONY: all deps check check-unit check-slurm demo bench bench-fit install format clean tests fuzz fuzz-build
all: $(BIN) $(LIBA)

deps:
	@bash scripts/install-deps.sh

$(BUILD)/%.o: %.c
	@mkdir -p $(dir $@)
	@echo "  CC  $<"
	@$(CC) $(CFLAGS) -c $< -o $@

$(LIBA): $(LIB_OBJ)
	@mkdir -p $(dir $@)
	@rm -f $@
	@echo "  AR  $@"
	@ar rcs $@ $^

$(BIN): $(CLI_OBJ) $(LIBA)
	@mkdir -p $(dir $@)
	@echo "  LD  $@"
	@$(CC) $(LDFLAGS) $(CLI_OBJ) $(LIBA) $(PKG_LIBS) -o $@

$(BUILD)/tests/support.o: tests/support.c
	@mkdir -p $(dir $@)
	@echo "  CC  $<"
	@$(CC) $(CFLAGS) -c $< -o $@

$(BUILD)/tests/%: tests/%.c $(LIBA) $(TEST_SUPPORT)
	@mkdir -p $(dir $@)
	@echo "  LD  $@"
	@$(CC) $(CFLAGS) -Itests $< $(TEST_SUPPORT) $(LIBA) $(PKG_LIBS) $(shell pkg-config --libs $(TESTPKG)) $(LDFLAGS) -o $@

tests: $(BIN) $(TEST_BIN) $(FUZZ_REPLAY)

$(BUILD)/tests/fuzz/replay_%: tests/fuzz/fuzz_%.c tests/fuzz/replay_main.c $(LIBA)
	@mkdir -p $(dir $@)
	@echo "  LD  $@"
	@$(CC) $(CFLAGS) $< tests/fuzz/replay_main.c $(LIBA) $(PKG_LIBS) $(LDFLAGS) -o $@

# The README's test command. Installs what is missing, builds, runs every suite
# (unit tests, MPI tests at 1/2/4 ranks, end-to-end scripts, the sanitizer build),
# and closes with one line "N passed, N failed".
check: deps
	@$(MAKE) --no-print-directory tests
	@$(MAKE) --no-print-directory SANITIZE=1 tests
	@bash tests/run_all.sh $(BUILD)

# Quicker loop while developing: release build only, no sanitizer pass.
check-unit: tests
	@SP_SKIP_SANITIZE=1 bash tests/run_all.sh $(BUILD)

# libFuzzer (clang) on the config parser, the CSV reader and the FITS header/WCS reader,
# FUZZ_SECONDS each (default 60); seeds in tests/fuzz/corpus/<name>, the growing corpus in
# build/fuzz/corpus/<name>, crashes in build/fuzz/artifacts/ (copy them to tests/fuzz/regress/).
FUZZ_SECONDS ?= 60
FUZZ_CC      ?= clang-14
FUZZ_CFLAGS  := -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -std=c11 \
                -D_GNU_SOURCE -Iinclude $(shell pkg-config --cflags cfitsio wcslib yaml-0.1 2>/dev/null)
FUZZ_SRC_config   := src/core/config.c src/core/config_schema.c src/core/error.c
FUZZ_SRC_csv      := src/core/csv.c src/core/error.c
FUZZ_SRC_fits_wcs := src/io/fits.c src/io/wcs.c src/core/error.c
FUZZ_LIBS := $(shell pkg-config --libs cfitsio wcslib yaml-0.1 2>/dev/null) -lm
.SECONDEXPANSION:
build/fuzz/fuzz_%: tests/fuzz/fuzz_%.c $$(FUZZ_SRC_$$*) $(wildcard include/surveyproc/*.h src/core/*.h)
	@mkdir -p $(dir $@)
	@echo "  FUZZ-LD $@"
	@$(FUZZ_CC) $(FUZZ_CFLAGS) $< $(FUZZ_SRC_$*) $(FUZZ_LIBS) -o $@
fuzz-build: $(patsubst %,build/fuzz/fuzz_%,$(FUZZ_NAMES))
fuzz: fuzz-build
	@bash tests/fuzz/run.sh $(FUZZ_SECONDS) $(FUZZ_NAMES)

check-slurm: all
	@bash tests/scripts/test_slurm.sh

demo: deps
	@$(MAKE) --no-print-directory all
	@bash scripts/demo.sh

# Benchmark suite (issue 7; not part of check): installs the peers, writes docs/performance.md.
# BENCH_QUICK=1 for a few-minute version (demo tile, 1 repeat); see scripts/bench.sh for the knobs.
bench:
	@bash scripts/install-deps.sh --with-peers
	@$(MAKE) --no-print-directory all
	@bash scripts/bench.sh

# Dev benchmark of the fitting engine (tests/bench/bench_fit.c; run by hand, not a test).
bench-fit: $(BUILD)/bench/bench_fit
$(BUILD)/bench/%: tests/bench/%.c $(LIBA)
	@mkdir -p $(dir $@)
	@echo "  LD  $@"
	@$(CC) $(CFLAGS) -Itests $< $(LIBA) $(PKG_LIBS) $(LDFLAGS) -o $@

install: $(BIN) $(LIBA)
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/lib $(DESTDIR)$(PREFIX)/include/surveyproc \
	           $(DESTDIR)$(PREFIX)/share/surveyproc
	install -m 755 $(BIN) $(DESTDIR)$(PREFIX)/bin/surveyproc
	install -m 644 $(LIBA) $(DESTDIR)$(PREFIX)/lib/libsurveyproc.a
	install -m 644 include/surveyproc/*.h $(DESTDIR)$(PREFIX)/include/surveyproc/
	install -m 755 scripts/qa.py $(DESTDIR)$(PREFIX)/share/surveyproc/qa.py

format:
	clang-format -i $$(git ls-files '*.c' '*.h')

clean:
	rm -rf build bin lib

# The per-pixel kernels of frame prep and of the direct FITS reader are written to vectorise; -O2's
# "very cheap" vectoriser model refuses loops that need a scalar epilogue, so these two files ask for
# the "cheap" model (same IEEE results: vector and scalar float ops round alike, no FMA in ISO C).
$(BUILD)/src/image/prep.o $(BUILD)/src/io/fits.o: CFLAGS += -fvect-cost-model=cheap

# `surveyproc qa` also looks for the script where `make install` puts it (besides <bindir>/../share)
$(BUILD)/src/cli/cmd_qa.o: CFLAGS += -DSP_DATADIR='"$(PREFIX)/share/surveyproc"'

-include $(LIB_OBJ:.o=.d) $(CLI_OBJ:.o=.d)
