# The whole pipeline, and the C runner's builds.
#   make demo    install, write the offline corpus, train a tokenizer and a small model on
#                the CPU, and print a story (about eight minutes on 2 cores)
#   make test    the test suite
#   make run     build ./run (then: ./run out/model.bin)
PYTHON ?= python3
# gcc unless CC is given (make's own default, cc, would win over CC ?= gcc)
ifeq ($(origin CC),default)
CC = gcc
endif
TORCH ?= torch==2.13.0
VOCAB ?= 1024

# the demo model: small enough to train on a laptop CPU
DEMO_DATA = --dataset=synth --vocab_size=$(VOCAB)
DEMO_MODEL = --dim=128 --n_layers=4 --n_heads=4 --n_kv_heads=2 --max_seq_len=256
DEMO_TRAIN = $(DEMO_DATA) $(DEMO_MODEL) --device=cpu --compile=False --batch_size=32 \
	--gradient_accumulation_steps=1 --learning_rate=2e-3 --min_lr=2e-4 --warmup_iters=50 \
	--max_iters=600 --eval_interval=200 --eval_iters=20 --log_interval=20

# fine-tuning the demo model: SFT on the embedded instructions, then DPO and a reward model on
# preferences, and RL against the instructions' checks (RM_TUNE, RL_TUNE: their own settings);
# then each model answers EVAL_N held-out requests, and SFT BEST_N of them BEST_OF times
TUNE = $(DEMO_DATA) --device=cpu --compile=False --batch_size=16 --gradient_accumulation_steps=1 \
	--warmup_iters=10 --eval_iters=10 --log_interval=20

RM_TUNE = --learning_rate=1e-4 --min_lr=1e-5 --max_iters=200 --eval_interval=100
RL_TUNE = --device=cpu --batch_size=16 --group_size=8 --learning_rate=2e-4 --beta=0.05 \
	--max_iters=40 --eval_interval=20 --eval_iters=100
EVAL_N ?= 500
EVAL_PRE ?= 100
BEST_N ?= 200
BEST_OF ?= 8

.PHONY: install demo demo-chat test testc bench fuzz fuzz-replay clean run runfast runomp rundebug \
	runasan runarm

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install $(TORCH)
	$(PYTHON) -m pip install -q -r requirements.txt matplotlib  # (matplotlib: report.py's picture)

demo: install
	$(PYTHON) preprocess.py synth
	$(PYTHON) preprocess.py train_vocab $(DEMO_DATA)
	$(PYTHON) preprocess.py pretokenize $(DEMO_DATA)
	$(PYTHON) train.py $(DEMO_TRAIN) --out_dir=out
	$(PYTHON) sample.py --checkpoint=out/ckpt.pt --device=cpu --start="Once upon a time" --temperature=0.8

# pretrain (unless make demo already did) -> SFT -> DPO, a reward model, RL -> the table of
# held-out instruction following, and one chat turn in C
demo-chat: install run
	@test -f out/ckpt.pt || $(MAKE) demo
	$(PYTHON) preprocess.py sft $(DEMO_DATA)
	$(PYTHON) preprocess.py dpo $(DEMO_DATA)
	$(PYTHON) train.py --task=sft --init_from=out/ckpt.pt --out_dir=out_sft $(TUNE) \
		--learning_rate=1e-3 --min_lr=1e-4 --max_iters=400 --eval_interval=200
	$(PYTHON) train.py --task=dpo --init_from=out_sft/ckpt.pt --out_dir=out_dpo $(TUNE) \
		--learning_rate=1e-4 --min_lr=1e-5 --beta=0.1 --max_iters=150 --eval_interval=50
	$(PYTHON) train.py --task=rm --init_from=out_sft/ckpt.pt --out_dir=out_rm $(TUNE) \
		$(RM_TUNE)
	$(PYTHON) train_rl.py --init_from=out_sft/ckpt.pt --out_dir=out_rl $(RL_TUNE)
	@echo "held-out: $(EVAL_N) synth requests at temperature 0 (the pretrained model, which never"
	@echo "stops, $(EVAL_PRE)), and $(BEST_N) of them $(BEST_OF) times at temperature 1"
	@for m in out out_sft out_dpo out_rl; do $(PYTHON) sample.py --checkpoint=$$m/ckpt.pt \
		--device=cpu --max_new_tokens=160 --eval_out=$$m/eval.json \
		--eval_instruct=$$(test $$m = out && echo $(EVAL_PRE) || echo $(EVAL_N)) >/dev/null \
		|| exit 1; done
	@$(PYTHON) sample.py --checkpoint=out_sft/ckpt.pt --device=cpu --max_new_tokens=160 \
		--eval_instruct=$(BEST_N) --best_of=$(BEST_OF) --eval_out=out_sft/best_of.json >/dev/null
	$(PYTHON) report.py --png=demo_chat.png
	$(PYTHON) export.py out_rl/model.bin --checkpoint=out_rl/ckpt.pt --version=1
	./run out_rl/model.bin -m chat -t 0 -i "Tell me a story about a fox who wants a kite." </dev/null

test:
	$(PYTHON) -m pytest -q -rs test_all.py

# ---------------------------------------------------------------------------
# run.c
run: run.c
	$(CC) -O3 -o run run.c -lm

runfast: run.c
	$(CC) -Ofast -o run run.c -lm

runomp: run.c
	$(CC) -Ofast -fopenmp -march=native -o run run.c -lm

rundebug: run.c
	$(CC) -g -O0 -o run run.c -lm

# AddressSanitizer + UBSan build; testc runs the malformed-input tests with it
runasan: run.c
	$(CC) -g -O1 -fsanitize=address,undefined -fno-omit-frame-pointer -o runasan run.c -lm

# aarch64 (ARM) from an x86 machine: Debian's gcc-aarch64-linux-gnu, run with qemu-aarch64
CROSS_CC ?= aarch64-linux-gnu-gcc
runarm: run.c
	$(CROSS_CC) -O3 -static -o run-aarch64 run.c -lm

testc: run runasan
	RUN_BINARIES=./runasan $(PYTHON) -m pytest -q -rs test_all.py -k "malformed"

clean:
	rm -f run runasan run-aarch64

# ---------------------------------------------------------------------------
# benchmarks beside llama2.c (bench.py): random-weight models, built into BENCH_DIR
#   make bench                                    every item, ../llama2.c as the peer if present
#   make bench LLAMA2C=/path/to/llama2.c BENCH_ARGS="--only=decode --rounds=3"
BENCH_DIR ?= /tmp/bench
LLAMA2C ?= $(wildcard ../llama2.c)
BENCH_ARGS ?=

bench:
	CC=$(CC) $(PYTHON) bench.py --dir=$(BENCH_DIR) --llama2c=$(LLAMA2C) $(BENCH_ARGS)

# ---------------------------------------------------------------------------
# fuzzing run.c's readers of untrusted input with libFuzzer (clang), see fuzz/fuzz.c:
#   make fuzz                                     model, tokenizer and prompt, FUZZ_SECONDS each
#   make fuzz FUZZ_TARGETS=prompt FUZZ_SECONDS=60
# New corpus entries and crashes go to FUZZ_DIR, never into fuzz/corpus.
FUZZ_CC ?= clang
FUZZ_SECONDS ?= 600
FUZZ_TARGETS ?= model tokenizer prompt
FUZZ_DIR ?= /tmp/run-fuzz
FUZZ_FLAGS = -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer

fuzz:
	@mkdir -p $(FUZZ_DIR); failed=""; \
	for t in $(FUZZ_TARGETS); do \
		T=$$(echo $$t | tr a-z A-Z); \
		R=$$(ls -d fuzz/regressions/$$t 2>/dev/null || true); \
		mkdir -p $(FUZZ_DIR)/corpus_$$t; \
		$(FUZZ_CC) $(FUZZ_FLAGS) -DFUZZ_$$T -o $(FUZZ_DIR)/fuzz_$$t fuzz/fuzz.c -lm && \
		ASAN_OPTIONS=detect_leaks=0 $(FUZZ_DIR)/fuzz_$$t $(FUZZ_DIR)/corpus_$$t fuzz/corpus/$$t $$R \
			-max_total_time=$(FUZZ_SECONDS) -timeout=10 -rss_limit_mb=2048 -close_fd_mask=3 \
			-artifact_prefix=$(FUZZ_DIR)/$$t- -print_final_stats=1 \
		|| failed="$$failed $$t"; \
	done; \
	if [ -n "$$failed" ]; then \
		echo "fuzz: FAILED:$$failed (inputs that crashed: $(FUZZ_DIR)/<target>-crash-*)"; exit 1; \
	fi; echo "fuzz: $(FUZZ_TARGETS): no crash in $(FUZZ_SECONDS) s each"

# the same three targets built with $(CC) and a main() that replays the corpus and the
# regressions (no libFuzzer needed): make test runs this, so a change to run.c that breaks
# the harness fails the tests
fuzz-replay:
	@mkdir -p $(FUZZ_DIR); failed=""; \
	for t in $(FUZZ_TARGETS); do \
		T=$$(echo $$t | tr a-z A-Z); \
		R=$$(ls -d fuzz/regressions/$$t 2>/dev/null || true); \
		$(CC) -g -O1 -Wall -Wextra -DFUZZ_$$T -DFUZZ_REPLAY -o $(FUZZ_DIR)/replay_$$t fuzz/fuzz.c -lm \
		&& $(FUZZ_DIR)/replay_$$t fuzz/corpus/$$t $$R || failed="$$failed $$t"; \
	done; \
	if [ -n "$$failed" ]; then echo "fuzz-replay: FAILED:$$failed"; exit 1; fi
