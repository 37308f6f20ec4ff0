/*
libFuzzer harness for run.c's readers of untrusted input. One source, three targets:

    -DFUZZ_MODEL      the bytes are a model file (version 0, 1 or 2): read_checkpoint,
                      then, if it loads, a forward pass over 4 tokens and a sample
    -DFUZZ_TOKENIZER  2 bytes of vocab_size (3..2050), then a tokenizer.bin: build_tokenizer,
                      then, if it loads, encode a few strings and decode every id
    -DFUZZ_PROMPT     the bytes are a prompt (cut at the first NUL, as argv would be), checked
                      with valid_utf8 as the CLI does, then encoded with fuzz/tokenizer.bin
                      (vocab 512, or $FUZZ_TOKENIZER) with and without the dummy prefix, and
                      decoded: the decoded text must be the prompt again

    make fuzz                     # all three, FUZZ_SECONDS (600) each
    make fuzz FUZZ_TARGETS=prompt FUZZ_SECONDS=60

    # without libFuzzer: -DFUZZ_REPLAY adds a main() that runs every file named (a directory:
    # every file in it, sorted by name) through the target once, and prints "N inputs replayed"
    gcc -O1 -DFUZZ_MODEL -DFUZZ_REPLAY -o /tmp/fz fuzz/fuzz.c -lm
    /tmp/fz fuzz/corpus/model fuzz/regressions/model

run.c is compiled with RUN_FUZZ: die() longjmps back here instead of exiting, and main()
is left out. What an error path leaves behind is released here (the model file's bytes, the
tokenizer's arrays, the descriptor read_checkpoint had open), so that the fuzzer can run
for hours. State that lives across the longjmp is static, so it keeps its value.
*/
#define _GNU_SOURCE
#define RUN_FUZZ
#pragma GCC diagnostic ignored "-Wunused-function" // run.c's command line and loops: not used here
#include "../run.c"

#include <sys/mman.h>

static int mem_fd = -1; // the input, as a file that read_checkpoint and build_tokenizer can open
static char mem_path[64];
#if defined(FUZZ_MODEL) || defined(FUZZ_TOKENIZER)
static jmp_buf jump;    // where die() returns to
#endif

static void put_file(const uint8_t *data, size_t n) {
    if (ftruncate(mem_fd, 0) != 0 || (n && pwrite(mem_fd, data, n, 0) != (ssize_t)n)) abort();
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc; (void)argv;
    mem_fd = memfd_create("fuzz_input", 0);
    if (mem_fd < 0) abort();
    snprintf(mem_path, sizeof(mem_path), "/proc/self/fd/%d", mem_fd);
    if (!freopen("/dev/null", "w", stdout)) abort(); // decode() prints
    return 0;
}

// the descriptor the next open() will get: the lowest free one
static int next_fd(void) {
    int fd = dup(STDIN_FILENO);
    if (fd < 0) abort();
    close(fd);
    return fd;
}

#ifdef FUZZ_MODEL
static Transformer tf;
static Sampler sm;
static int model_fd = -1;
static uint64_t weight_bytes; // what read_checkpoint read into tf.file: the file after its header

// every tensor must lie inside the file: this checks expected_size() against map_weights()
static void check_inside(const void *p, uint64_t bytes) {
    const char *lo = tf.file, *hi = lo + weight_bytes, *q = p;
    if (q < lo || q > hi || bytes > (uint64_t)(hi - q)) {
        fprintf(stderr, "tensor outside the file\n");
        abort();
    }
}

static void check_matrix(const Matrix *m, uint64_t cols) {
    uint64_t n = (uint64_t)m->rows * cols;
    if (tf.group_size == 0) check_inside(m->w, 4 * n);
    else { check_inside(m->q, n); check_inside(m->scale, 4 * (n / tf.group_size)); }
}

static void check_weights(void) {
    const Config *c = &tf.config;
    uint64_t dim = c->dim;
    for (int l = 0; l < c->n_layers; l++) {
        const Layer *w = &tf.layers[l];
        check_inside(w->rms_att, 4 * dim);
        check_inside(w->rms_ffn, 4 * dim);
        const Matrix *ms[] = {&w->wq, &w->wk, &w->wv, &w->wo};
        for (int i = 0; i < 4; i++) check_matrix(ms[i], dim);
        if (w->router) check_inside(w->router, 4 * dim * c->n_experts);
        const FFN *ffns = w->experts ? w->experts : &w->ffn;
        for (int e = 0; e < (w->experts ? c->n_experts : 1); e++) {
            check_matrix(&ffns[e].w1, dim);
            check_matrix(&ffns[e].w3, dim);
            check_matrix(&ffns[e].w2, c->hidden_dim);
        }
    }
    check_inside(tf.rms_final, 4 * dim);
    check_matrix(&tf.token_embedding, dim);
    check_matrix(&tf.wcls, dim);
}

static void release(void) {
    for (int l = 0; tf.layers && l < tf.config.n_layers; l++) free(tf.layers[l].experts);
    free(tf.file);
    free(tf.layers);
    if (model_fd >= 0 && fcntl(model_fd, F_GETFD) != -1) close(model_fd); // died with it open
    model_fd = -1;
    free_run_state(&tf.state);
    free(sm.probindex);
    free(sm.seen);
    memset(&tf, 0, sizeof(tf));
    memset(&sm, 0, sizeof(sm));
}

// The size the header of data asks for, or 0 if the header is rejected. Random bytes rarely
// have the exact size their header implies, so each input is also tried at that size: this
// reaches every shape of model that loads, not only the shapes of the corpus.
static uint64_t wanted_size(const uint8_t *data, size_t size) {
    if (size < 28) return 0;
    unsigned char h[HEADER_V12] = {0};
    memcpy(h, data, size < HEADER_V12 ? size : HEADER_V12);
    Format f;
    read_header(&tf.config, &f, "header", h, size); // dies (jumps) if it is rejected
    return expected_size(&tf.config, &f);
}

static void load_and_run(const uint8_t *data, size_t size) {
    put_file(data, size);
    model_fd = next_fd();
    read_checkpoint(&tf, mem_path);
    weight_bytes = size - ((uint32_t)read_i32(data) == MAGIC_AK42 ? HEADER_V12 : 28);
    check_weights();
    // a block of 4 tokens (the int8 path's 4-token dot product) at positions 0..3, all logits
    int vocab = tf.config.vocab_size, tokens[4] = {BOS, vocab - 1, 0, EOS};
    malloc_run_state(&tf, 4, 4, 1);
    float *logits = forward(&tf, tokens, 4, 0, 1) + (size_t)3 * vocab;
    sm = (Sampler){vocab, 1.0f, 0.9f, 42, xalloc(2 * (size_t)vocab * sizeof(ProbIndex)), 1.3f,
                   xalloc(vocab), {BOS, EOS, -1, -1}};
    for (int i = 0; i < 4; i++) remember(&sm, tokens[i]); // the repetition penalty's path too
    int next = sample(&sm, logits);
    if (next < 0 || next >= vocab) abort();
    release();
}

static uint8_t *resized;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    die_jump = &jump;
    if (setjmp(jump) == 0) load_and_run(data, size); // the bytes as they are
    release();
    if (setjmp(jump) == 0) {
        uint64_t want = wanted_size(data, size);
        if (want != 0 && want != size && want <= (1 << 18)) {
            resized = xalloc(want); // the input, cut or padded with zeros
            memcpy(resized, data, size < want ? size : want);
            load_and_run(resized, want);
        }
    }
    release();
    free(resized);
    resized = NULL;
    return 0;
}
#endif

#ifdef FUZZ_TOKENIZER
static Tokenizer tok;
static Tokens ids;

static void release(void) {
    free_tokenizer(&tok);
    free(ids.ids);
    memset(&tok, 0, sizeof(tok));
    memset(&ids, 0, sizeof(ids));
}

static void encode_decode(const char *text, int dummy_prefix) {
    ids.n = 0;
    if (dummy_prefix) push(&ids, BOS);
    encode(&tok, text, dummy_prefix, &ids);
    Utf8Buffer u = {0};
    for (size_t i = 0; i < ids.n; i++) {
        if (ids.ids[i] < 0 || ids.ids[i] >= tok.vocab_size) abort();
        decode(&tok, &u, i ? ids.ids[i - 1] : -1, ids.ids[i]);
    }
    flush_bytes(&u, 1);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 2) return 0;
    int vocab_size = 3 + (data[0] | data[1] << 8) % 2048; // a model has at least <unk>, BOS, EOS
    put_file(data + 2, size - 2);
    die_jump = &jump;
    if (setjmp(jump)) { release(); return 0; }
    build_tokenizer(&tok, mem_path, vocab_size);
    const char *texts[] = {"Once upon a time", "<|im_start|>user\nhi<|im_end|>\n",
                           "h\xC3\xA9llo \xE4\xBD\xA0\xE5\xA5\xBD \xE2\x96\x81x", "", " ", "<|",
                           "\xF0\x9F\x98\x80<0x41>"};
    for (size_t i = 0; i < sizeof(texts) / sizeof(texts[0]); i++)
        for (int d = 0; d < 2; d++) encode_decode(texts[i], d);
    // the tokenizer's own pieces, joined, as text: this reaches the merges it has
    char text[512];
    size_t n = 0;
    for (int i = 0; i < tok.vocab_size && n + tok.piece_len[i] < sizeof(text); i++) {
        memcpy(text + n, tok.piece[i], tok.piece_len[i]);
        n += tok.piece_len[i];
    }
    text[n] = '\0';
    if (valid_utf8(text)) for (int d = 0; d < 2; d++) encode_decode(text, d);
    Utf8Buffer u = {0};
    for (int i = 0; i < tok.vocab_size; i++) decode(&tok, &u, i % 2 ? BOS : i - 1, i);
    flush_bytes(&u, 1);
    special_id(&tok, "<|im_start|>");
    release();
    return 0;
}
#endif

#ifdef FUZZ_PROMPT
static Tokenizer tok;
static Tokens ids;
static char *out_buf;
static size_t out_len;

// encode text, decode the ids into out_buf: with the dummy prefix as generate() does (after
// BOS, whose decode drops the prefix's space), without it as chat does
static void round_trip(const char *text, int dummy_prefix) {
    ids.n = 0;
    if (dummy_prefix) push(&ids, BOS);
    encode(&tok, text, dummy_prefix, &ids);
    FILE *saved = stdout, *mem = open_memstream(&out_buf, &out_len);
    if (!mem) abort();
    stdout = mem; // glibc: stdout is an ordinary variable
    Utf8Buffer u = {0};
    for (size_t i = dummy_prefix; i < ids.n; i++) {
        // no <unk>: the tokenizer has byte pieces
        if (ids.ids[i] <= EOS || ids.ids[i] >= tok.vocab_size) abort();
        decode(&tok, &u, i ? ids.ids[i - 1] : -1, ids.ids[i]);
    }
    flush_bytes(&u, 1);
    fclose(mem);
    stdout = saved;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!tok.data) { // once: the tokenizer is not under test here
        const char *path = getenv("FUZZ_TOKENIZER");
        build_tokenizer(&tok, path ? path : "fuzz/tokenizer.bin", 512);
    }
    char *text = malloc(size + 1);
    memcpy(text, data, size);
    text[size] = '\0';
    if (valid_utf8(text)) { // else the CLI stops with an error
        // what decode gives back: the text, except that SentencePiece reads U+2581 as a space
        char *want = malloc(size + 1);
        size_t n = 0;
        for (const char *p = text; *p;) {
            if (strncmp(p, "\xE2\x96\x81", 3) == 0) { want[n++] = ' '; p += 3; }
            else want[n++] = *p++;
        }
        for (int d = 0; d < 2; d++) {
            round_trip(text, d);
            if (out_len != n || memcmp(out_buf, want, n) != 0) {
                fprintf(stderr, "decode(encode(text)) != text (dummy_prefix %d): %zu bytes, "
                                "not %zu\n", d, out_len, n);
                abort();
            }
            free(out_buf);
        }
        ids.n = 0;
        append_message(&tok, &ids, "user", text); // the chat template
        free(want);
    }
    free(text);
    return 0;
}
#endif

#ifdef FUZZ_REPLAY
// A main() for builds without libFuzzer (any C compiler): every file named on the command line,
// or every file in a directory named (sorted by name), goes once through the target. A crash
// or abort fails as it does under libFuzzer; otherwise "N inputs replayed" and exit status 0.
#include <dirent.h>

static void replay(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) { fprintf(stderr, "%s: cannot open: %s\n", path, strerror(errno)); exit(1); }
    size_t n = 0, cap = 1 << 16;
    uint8_t *data = malloc(cap);
    for (size_t got; data && (got = fread(data + n, 1, cap - n, f)) > 0;)
        if ((n += got) == cap) data = realloc(data, cap *= 2);
    if (!data || ferror(f)) { fprintf(stderr, "%s: cannot read\n", path); exit(1); }
    fclose(f);
    LLVMFuzzerTestOneInput(data, n);
    free(data);
}

static int is_dir(const char *path) {
    struct stat st;
    if (stat(path, &st) != 0) { fprintf(stderr, "%s: %s\n", path, strerror(errno)); exit(1); }
    return S_ISDIR(st.st_mode);
}

int main(int argc, char **argv) {
    int out = dup(STDOUT_FILENO); // LLVMFuzzerInitialize sends stdout to /dev/null
    LLVMFuzzerInitialize(&argc, &argv);
    int count = 0;
    for (int i = 1; i < argc; i++) {
        if (!is_dir(argv[i])) { replay(argv[i]); count++; continue; }
        struct dirent **names;
        int k = scandir(argv[i], &names, NULL, alphasort);
        if (k < 0) { fprintf(stderr, "%s: %s\n", argv[i], strerror(errno)); return 1; }
        for (int j = 0; j < k; j++) {
            char path[4096];
            snprintf(path, sizeof(path), "%s/%s", argv[i], names[j]->d_name);
            if (!is_dir(path)) { replay(path); count++; }
            free(names[j]);
        }
        free(names);
    }
    dprintf(out, "%d inputs replayed\n", count);
    return 0;
}
#endif
