/*
Inference for a Llama 2 Transformer in one C file: float32 and int8 (Q8_0) weights.

    make run       # gcc -O3 -o run run.c -lm
    make runomp    # gcc -Ofast -fopenmp -march=native -o run run.c -lm
    ./run out/model.bin -i "Once upon a time"
    ./run out/model.bin -m chat -y "You are a helpful assistant."

The file reads top to bottom: model files -> neural net pieces -> forward pass -> tokenizer
-> sampler -> generation and chat loops -> command line. What makes it fast (vector code,
the int8 layout, 2 MB pages) is one last section, fast kernels and memory layouts, which the
code above calls through the few functions declared before it. It reads the formats of
karpathy/llama2.c: version 0 (the legacy float32 file), version 1 (float32 with a 256-byte
header) and version 2 (int8 weights in groups with a float32 scale each, as written by
llama2.c's export.py and read by its runq.c). Only loading and matmul know the difference;
everything else is shared. Version 3, ours, is a mixture of experts (float32 or int8).
*/
#define _POSIX_C_SOURCE 200809L
#define _DEFAULT_SOURCE // and madvise

// The plain build (without -ffast-math) computes the same bits on every machine: the compiler
// may not fuse a multiply and an add into one FMA, which it would do on aarch64 but not on
// x86-64 (without -march), so an int8 model could print different text on the two.
#ifndef __FAST_MATH__
#ifdef __clang__
#pragma STDC FP_CONTRACT OFF
#else
#pragma GCC optimize("fp-contract=off")
#endif
#endif

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

// OpenMP is optional: without -fopenmp these pragmas vanish (and -Wall stays quiet)
#ifdef _OPENMP
#define OMP(directive) _Pragma(#directive)
#else
#define OMP(directive)
#endif

// ----------------------------------------------------------------------------
// errors: a user mistake gets one line and exit status 1

#ifdef RUN_FUZZ // fuzz/fuzz.c includes this file: die() jumps back to it, and main() is left out
#include <setjmp.h>
static jmp_buf *die_jump;
#endif

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "error: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
#ifdef RUN_FUZZ
    if (die_jump) longjmp(*die_jump, 1);
#endif
    exit(1);
}

static void *xalloc(size_t n) { // zeroed, and 64-byte aligned: a row starts on a cache line
    void *p = NULL;
    if (posix_memalign(&p, 64, n ? n : 1) != 0) die("out of memory allocating %zu bytes", n);
    memset(p, 0, n);
    return p;
}

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

// ----------------------------------------------------------------------------
// the Transformer: its hyperparameters, weights and activation buffers

typedef struct {
    int dim;         // transformer dimension
    int hidden_dim;  // for the ffn layers
    int n_layers;
    int n_heads;     // number of query heads
    int n_kv_heads;  // number of key/value heads (can be < n_heads: grouped-query attention)
    int vocab_size;
    int max_seq_len; // context length the model was trained for
    int n_experts;   // 0: dense; else each feed-forward is a mixture of this many experts
    int n_experts_per_tok; // ... of which each token uses this many
} Config;

// A weight matrix (rows, cols) in the model file's bytes in memory: float32 values w, or
// int8 values q with one float32 scale per group of group_size consecutive values of a row,
// w ~= q * scale. A group never straddles two rows (checked at load).
typedef struct {
    const float *w;      // (rows, cols) float32 files
    const int8_t *q;     // (rows, cols) int8 files
    const float *scale;  // (rows, cols / group_size) int8 files
    int rows, cols;
    int group_size;      // 0 for float32
    int slab;            // int8 rows lie interleaved in slabs of this many (pack_int8), else 1
} Matrix;

typedef struct {
    Matrix w1, w2, w3;    // SwiGLU: (hidden_dim, dim), (dim, hidden_dim), (hidden_dim, dim)
} FFN;

typedef struct {
    const float *rms_att; // (dim,) attention_norm
    const float *rms_ffn; // (dim,) ffn_norm
    Matrix wq, wk, wv;    // (dim, dim), (kv_dim, dim), (kv_dim, dim)
    Matrix wo;            // (dim, dim)
    FFN ffn;              // the feed-forward of a dense model
    const float *router;  // (n_experts, dim) float32: a mixture of experts' router, else NULL
    FFN *experts;         // (n_experts,) the mixture's feed-forwards
} Layer;

// Activations for a block of up to B tokens processed together (B = 1 when decoding).
typedef struct {
    int B;              // tokens per block
    int n_ctx;          // positions the kv cache holds
    float *x;           // (B, dim) the residual stream
    float *xb;          // (B, dim) normalized input of a block, then attention output
    float *xb2;         // (B, dim) output of wo and w2, added to x
    float *qkv;         // (B, dim + 2*kv_dim) q, k, v of each token, side by side
    float *hb;          // (B, 2*hidden_dim) w1 x and w3 x side by side
    float *hb2;         // (B, hidden_dim) silu(w1 x) * w3 x
    float *att;         // (B, n_heads, n_ctx) attention scores
    float *rope_cos;    // (B, head_size/2) rotation of each token's position
    float *rope_sin;    // (B, head_size/2)
    float *logits;      // (B, vocab_size): only the first row unless all logits are asked for
    int8_t *xq;         // (B, max(dim, hidden)) int8 activations (int8 files only)
    float *xq_scale;    // (B, max(dim, hidden) / group_size) their scales
    int32_t *xq_sum;    // (B, max(dim, hidden) / group_size) the sum of each group's values
    float *probs;       // (n_experts,) a token's router probabilities (mixtures of experts)
    int *chosen;        // (B, n_experts_per_tok) each token's experts, best first
    float *chosen_weight; // (B, n_experts_per_tok) and their weights, which sum to 1
    int *rows;          // (B,) the rows of the block (tokens) that chose one expert, and
    float *row_weight;  // (B,) its weight for each
    float *xe, *ye;     // (B, dim) their inputs, gathered, and the expert's outputs
    float *key_cache;   // (n_layers, kv_dim, n_ctx): transposed, see forward()
    float *value_cache; // (n_layers, n_ctx, kv_dim)
    FILE *logits_file;  // -L: every position's logits are written here (else NULL)
} RunState;

typedef struct {
    Config config;
    int group_size;          // 0 for float32 files, else the int8 group size
    int version, tuned;      // the file's format version and chat-tuned flag (see Format)
    Matrix token_embedding;  // (vocab_size, dim)
    Layer *layers;           // (n_layers,)
    const float *rms_final;  // (dim,)
    Matrix wcls;             // (vocab_size, dim), often the token embedding itself
    void *file;              // the model file's weights (all but the header), in memory
    RunState state;          // the activations of a forward pass, and the kv cache
} Transformer;


// one kv head of one layer's cache, as attention reads it
typedef struct {
    const float *keys;    // (head_size, n_ctx): key i of position t at keys[i * n_ctx + t]
    const float *values;  // (n_ctx, kv_dim), of which this head's head_size columns
    int head_size, n_ctx, kv_dim;
} HeadCache;

// The last section of this file, "fast kernels and memory layouts", does the work behind
// these calls. Each line says what the function computes; how is told there.

// size bytes of the file at offset, read into memory that starts on a page
static void *read_weights(int fd, const char *path, uint64_t offset, uint64_t size);
// every int8 matrix of tf rearranged for the machine's int8 dot product (else left as it is)
static void pack_int8(Transformer *tf);
// x (m->cols,) = row of the int8 matrix m, dequantized
static void dequantize_row(float *x, const Matrix *m, int row);
// x (n,) -> int8 values xq in groups of gs, max |x| -> 127, with each group's scale and sum
static void quantize(int8_t *xq, float *xq_scale, int32_t *xq_sum, const float *x, int n, int gs);
// matmul's loops (see matmul)
static void matmul_tiles(float *out, const float *x, int T, const Matrix *mats, int n_mats,
                         const RunState *s);
// att[t] = q . k_t for the positions t = 0..pos of one head
static void attention_scores(float *att, const float *q, const HeadCache *kv, int pos);
// out (head_size,) = sum over t = 0..pos of att[t] v_t
static void attention_values(float *out, const float *att, const HeadCache *kv, int pos);

// ----------------------------------------------------------------------------
// reading model files. Every header field is checked, and the file size must be
// exactly what the header implies, so that no weight pointer can leave the file.

#define MAGIC_AK42 0x616b3432u // "ak42", the versioned llama2.c formats
#define HEADER_V12 256         // header bytes of versions 1, 2 and 3
#define MAX_EXPERTS 256

typedef struct {
    int version;    // 0 (the legacy float32 file), 1 (float32), 2 (int8), 3 (ours: a mixture
                    // of experts, float32 or int8)
    int shared;     // 1: the classifier is the token embedding table
    int group_size; // versions 2 and 3: int8 values per float32 scale; 0 for float32
    int tuned;      // versions 1 to 3, header byte 41: 0 not recorded, 1 pretrained only,
                    // 2 fine-tuned to chat (our export.py writes it; llama2.c leaves 0)
} Format;

static int32_t read_i32(const unsigned char *p) { int32_t v; memcpy(&v, p, 4); return v; }

static void read_config(Config *c, const unsigned char *p) { // 7 int32, in the order of Config
    int *fields[] = {&c->dim, &c->hidden_dim, &c->n_layers, &c->n_heads, &c->n_kv_heads,
                     &c->vocab_size, &c->max_seq_len};
    for (int i = 0; i < 7; i++) *fields[i] = read_i32(p + 4 * i);
}

// Caps on header fields: generous for real models, and small enough that no size
// computed below can overflow 64 bits (the largest product is under 2^50).
static void check_config(const char *path, const Config *c) {
    const char *hint = "is this a model file written by export.py?";
    struct { const char *name; int value, min, max; } f[] = {
        {"dim", c->dim, 1, 1 << 16}, {"hidden_dim", c->hidden_dim, 1, 1 << 18},
        {"n_layers", c->n_layers, 1, 1 << 10}, {"n_heads", c->n_heads, 1, 1 << 10},
        {"n_kv_heads", c->n_kv_heads, 1, 1 << 10},
        {"vocab_size", c->vocab_size, 3, 1 << 22}, // 3: <unk>, BOS, EOS
        {"max_seq_len", c->max_seq_len, 1, 1 << 22},
    };
    for (size_t i = 0; i < sizeof(f) / sizeof(f[0]); i++) {
        if (f[i].value < f[i].min || f[i].value > f[i].max)
            die("%s: header field %s = %d is outside %d..%d — %s", path, f[i].name, f[i].value,
                f[i].min, f[i].max, hint);
    }
    if (c->dim % c->n_heads != 0)
        die("%s: n_heads = %d does not divide dim = %d — %s", path, c->n_heads, c->dim, hint);
    if (c->n_heads % c->n_kv_heads != 0)
        die("%s: n_kv_heads = %d does not divide n_heads = %d — %s", path, c->n_kv_heads,
            c->n_heads, hint);
    if ((c->dim / c->n_heads) % 2 != 0)
        die("%s: head size %d is odd, but RoPE rotates pairs — %s", path, c->dim / c->n_heads,
            hint);
}

// Read and check the header h: the first 256 bytes of a file of size bytes (zeros past its
// end), at least 28.
static void read_header(Config *c, Format *f, const char *path, const unsigned char *h,
                        uint64_t size) {
    *f = (Format){.version = 0, .shared = 1, .group_size = 0, .tuned = 0};
    if (memcmp(h, "GGUF", 4) == 0)
        die("%s is a GGUF file, which llama.cpp runs — for this program export with "
            "--version=0, 1, 2 or 3", path);
    if (memcmp(h, "PK\x03\x04", 4) == 0)
        die("%s is a zip file such as a PyTorch checkpoint — export it first: python export.py "
            "out/model.bin --checkpoint=%s", path, path);
    c->n_experts = c->n_experts_per_tok = 0; // dense, unless a version 3 header says otherwise
    if ((uint32_t)read_i32(h) == MAGIC_AK42) {
        if (size < HEADER_V12)
            die("%s: %llu bytes is too small for its 256-byte header — is the file truncated?",
                path, (unsigned long long)size);
        f->version = read_i32(h + 4);
        if (f->version < 1 || f->version > 3)
            die("%s: unknown format version %d (this program reads 0 to 3) — re-export the "
                "model", path, f->version);
        read_config(c, h + 8);
        f->shared = h[36];
        if (f->shared > 1)
            die("%s: shared_classifier flag is %d, must be 0 or 1 — is this a model file?", path,
                f->shared);
        f->tuned = h[41];
        if (f->tuned > 2)
            die("%s: header byte 41 (fine-tuned to chat) is %d, must be 0, 1 or 2 — re-export "
                "the model", path, f->tuned);
        if (f->version >= 2) {
            f->group_size = read_i32(h + 37);
            if (f->group_size < (f->version == 2)) // version 3: 0 is float32
                die("%s: group_size %d must be positive — re-export the model", path,
                    f->group_size);
        }
        if (f->version == 3) { // the mixture: header bytes 42..49
            c->n_experts = read_i32(h + 42);
            c->n_experts_per_tok = read_i32(h + 46);
            if (c->n_experts < 1 || c->n_experts > MAX_EXPERTS || c->n_experts_per_tok < 1
                    || c->n_experts_per_tok > c->n_experts)
                die("%s: n_experts = %d, n_experts_per_tok = %d: a mixture needs 1 <= "
                    "n_experts_per_tok <= n_experts <= %d — re-export the model", path,
                    c->n_experts, c->n_experts_per_tok, MAX_EXPERTS);
        }
    } else { // version 0: 7 int32, a negative vocab_size means the classifier is not shared
        read_config(c, h);
        if (c->vocab_size < 0 && c->vocab_size != INT32_MIN) {
            f->shared = 0;
            c->vocab_size = -c->vocab_size;
        }
    }
    check_config(path, c);
    int gs = f->group_size;
    if (gs && (c->dim % gs != 0 || c->hidden_dim % gs != 0))
        die("%s: group_size %d does not divide dim %d and hidden_dim %d — re-export with a group "
            "size that does", path, gs, c->dim, c->hidden_dim);
    if (gs && c->dim % 4 != 0) // else the float32 scales after the int8 values would be misaligned
        die("%s: int8 files need dim %% 4 == 0 (dim = %d) — export this model as float32", path,
            c->dim);
}

static uint64_t header_bytes(const Format *f) { return f->version == 0 ? 28 : HEADER_V12; }

// the size in bytes of one matrix, and of the whole file, in a file of this format
static uint64_t matrix_bytes(uint64_t rows, uint64_t cols, int group_size) {
    uint64_t n = rows * cols;
    return group_size == 0 ? 4 * n : n + 4 * (n / group_size);
}

static uint64_t expected_size(const Config *c, const Format *f) {
    uint64_t L = c->n_layers, dim = c->dim, hidden = c->hidden_dim, vocab = c->vocab_size;
    uint64_t kv_dim = dim * c->n_kv_heads / c->n_heads, head_size = dim / c->n_heads;
    int gs = f->group_size;
    uint64_t norms = 4 * (2 * L * dim + dim), E = c->n_experts;
    uint64_t per_layer = 2 * matrix_bytes(dim, dim, gs) + 2 * matrix_bytes(kv_dim, dim, gs)
                       + (E ? E : 1) * 3 * matrix_bytes(hidden, dim, gs) + 4 * E * dim; // router
    uint64_t size = header_bytes(f) + norms + L * per_layer
                  + matrix_bytes(vocab, dim, gs) * (f->shared ? 1 : 2);
    if (f->version == 0) size += 4 * (uint64_t)c->max_seq_len * head_size; // unused RoPE tables
    return size;
}

// A cursor that walks the file's bytes, handing out consecutive tensors.
typedef struct { const char *p; } Cursor;

static const float *take_f32(Cursor *cur, uint64_t n) {
    const float *t = (const float *)cur->p;
    cur->p += n * sizeof(float);
    return t;
}

static Matrix take_matrix(Cursor *cur, int rows, int cols, int group_size) {
    Matrix m = {.rows = rows, .cols = cols, .group_size = group_size, .slab = 1};
    uint64_t n = (uint64_t)rows * cols;
    if (group_size == 0) {
        m.w = take_f32(cur, n);
    } else { // int8 values, then one float32 scale per group
        m.q = (const int8_t *)cur->p;
        cur->p += n;
        m.scale = take_f32(cur, n / group_size);
    }
    return m;
}

// Point every weight of tf into the file's bytes. Version 0 interleaves the norms with
// the matrices; versions 1 to 3 put all norms first. Version 3 has, after wo, each layer's
// router, then w1 of each layer's experts, then their w2, then their w3.
static void map_weights(Transformer *tf, const char *weights, const Format *f) {
    Config *c = &tf->config;
    int L = c->n_layers, dim = c->dim, hidden = c->hidden_dim, gs = f->group_size;
    int E = c->n_experts;
    int kv_dim = dim * c->n_kv_heads / c->n_heads, head_size = dim / c->n_heads;
    Cursor cur = {weights};
    Layer *ls = tf->layers = xalloc(L * sizeof(Layer));
    if (f->version == 0) {
        tf->token_embedding = take_matrix(&cur, c->vocab_size, dim, 0);
        for (int l = 0; l < L; l++) ls[l].rms_att = take_f32(&cur, dim);
    } else {
        for (int l = 0; l < L; l++) ls[l].rms_att = take_f32(&cur, dim);
        for (int l = 0; l < L; l++) ls[l].rms_ffn = take_f32(&cur, dim);
        tf->rms_final = take_f32(&cur, dim);
        tf->token_embedding = take_matrix(&cur, c->vocab_size, dim, gs);
    }
    for (int l = 0; l < L; l++) ls[l].wq = take_matrix(&cur, dim, dim, gs);
    for (int l = 0; l < L; l++) ls[l].wk = take_matrix(&cur, kv_dim, dim, gs);
    for (int l = 0; l < L; l++) ls[l].wv = take_matrix(&cur, kv_dim, dim, gs);
    for (int l = 0; l < L; l++) ls[l].wo = take_matrix(&cur, dim, dim, gs);
    if (f->version == 0) for (int l = 0; l < L; l++) ls[l].rms_ffn = take_f32(&cur, dim);
    if (E) {
        for (int l = 0; l < L; l++) {
            ls[l].router = take_f32(&cur, (uint64_t)E * dim);
            ls[l].experts = xalloc(E * sizeof(FFN));
        }
        for (int l = 0; l < L; l++)
            for (int e = 0; e < E; e++) ls[l].experts[e].w1 = take_matrix(&cur, hidden, dim, gs);
        for (int l = 0; l < L; l++)
            for (int e = 0; e < E; e++) ls[l].experts[e].w2 = take_matrix(&cur, dim, hidden, gs);
        for (int l = 0; l < L; l++)
            for (int e = 0; e < E; e++) ls[l].experts[e].w3 = take_matrix(&cur, hidden, dim, gs);
    } else {
        for (int l = 0; l < L; l++) ls[l].ffn.w1 = take_matrix(&cur, hidden, dim, gs);
        for (int l = 0; l < L; l++) ls[l].ffn.w2 = take_matrix(&cur, dim, hidden, gs);
        for (int l = 0; l < L; l++) ls[l].ffn.w3 = take_matrix(&cur, hidden, dim, gs);
    }
    if (f->version == 0) {
        tf->rms_final = take_f32(&cur, dim);
        take_f32(&cur, (uint64_t)c->max_seq_len * head_size); // RoPE tables: computed instead
    }
    tf->wcls = f->shared ? tf->token_embedding : take_matrix(&cur, c->vocab_size, dim, gs);
}

// Open a file to read whole. O_NONBLOCK so that a FIFO or a device given by mistake is
// refused here instead of blocking in open(); it changes nothing for a regular file.
static int open_regular(const char *path, const char *hint, struct stat *st) {
    int fd = open(path, O_RDONLY | O_NONBLOCK);
    if (fd < 0) die("%s: cannot open: %s%s", path, strerror(errno), errno == ENOENT ? hint : "");
    if (fstat(fd, st) != 0 || !S_ISREG(st->st_mode)) die("%s: not a regular file", path);
    return fd;
}

static void read_checkpoint(Transformer *tf, const char *path) {
    struct stat st;
    int fd = open_regular(path, " — make one: make demo, then python export.py out/model.bin",
                          &st);
    uint64_t size = (uint64_t)st.st_size;
    if (size < 28)
        die("%s: %llu bytes is too small for a model header — is the file truncated?", path,
            (unsigned long long)size);
    if (size > SIZE_MAX) die("%s: too large for this machine's address space", path);
    unsigned char h[HEADER_V12] = {0}; // the header is checked before the weights are read
    if (pread(fd, h, size < HEADER_V12 ? size : HEADER_V12, 0) < 0)
        die("%s: cannot read: %s", path, strerror(errno));
    Format f;
    read_header(&tf->config, &f, path, h, size);
    uint64_t want = expected_size(&tf->config, &f);
    if (size != want)
        die("%s: file is %llu bytes but its header implies %llu — %s", path,
            (unsigned long long)size, (unsigned long long)want,
            size < want ? "was the export interrupted?" : "is the header from another model?");
    tf->group_size = f.group_size;
    tf->version = f.version;
    tf->tuned = f.tuned;
    tf->file = read_weights(fd, path, header_bytes(&f), size - header_bytes(&f));
    close(fd);
    map_weights(tf, tf->file, &f);
    pack_int8(tf);
}

static void free_transformer(Transformer *tf) {
    for (int l = 0; l < tf->config.n_layers && tf->layers; l++) free(tf->layers[l].experts);
    free(tf->file);
    free(tf->layers);
}

// ----------------------------------------------------------------------------
// neural net pieces

static void rmsnorm(float *o, const float *x, const float *weight, int size) {
    float ss = 0.0f;
    for (int j = 0; j < size; j++) ss += x[j] * x[j];
    ss = 1.0f / sqrtf(ss / size + 1e-5f);
    for (int j = 0; j < size; j++) o[j] = weight[j] * (ss * x[j]);
}

static void softmax(float *x, int size) {
    float max_val = x[0];
    for (int i = 1; i < size; i++) if (x[i] > max_val) max_val = x[i];
    float sum = 0.0f;
    for (int i = 0; i < size; i++) { // minus the max: no overflow
        x[i] = expf(x[i] - max_val);
        sum += x[i];
    }
    for (int i = 0; i < size; i++) x[i] /= sum;
}

// W (d, n) @ x (T, n) -> out (T, d): out[t][i] = sum over j of W[i][j] x[t][j], where W is
// the rows of n_mats matrices stacked, so that wq, wk, wv (or w1, w3) share one pass. By far
// the most time is spent here. For int8 weights each token of x is quantized first, in groups
// of the weights' group size, and each group's integer dot product is scaled by the weight's
// and the token's scale. matmul_tiles (in the last section) reads a band of rows once for
// all T tokens, which is what makes a batched prompt fast.
static void matmul(float *out, const float *x, int T, const Matrix *mats, int n_mats, RunState *s) {
    int n = mats[0].cols, gs = mats[0].group_size;
    if (gs) {
        OMP(omp parallel for if(T > 1))
        for (int t = 0; t < T; t++)
            quantize(s->xq + (size_t)t * n, s->xq_scale + t * (n / gs), s->xq_sum + t * (n / gs),
                     x + (size_t)t * n, n, gs);
    }
    matmul_tiles(out, x, T, mats, n_mats, s);
}

// x (dim,) = the embedding of token (a row of the table, dequantized in int8 files)
static void embed(float *x, const Transformer *tf, int token) {
    const Matrix *e = &tf->token_embedding;
    if (e->q) dequantize_row(x, e, token);
    else memcpy(x, e->w + (size_t)token * e->cols, e->cols * sizeof(float));
}

// RoPE: the angles for one position, shared by all heads and layers
static void rope_angles(float *fcos, float *fsin, int pos, int head_size) {
    for (int i = 0; i < head_size; i += 2) {
        float freq = 1.0f / powf(10000.0f, i / (float)head_size);
        float val = pos * freq;
        fcos[i / 2] = cosf(val);
        fsin[i / 2] = sinf(val);
    }
}

// rotate each adjacent pair (v[i], v[i+1]) of every head in v (n,) by its angle
static void rope(float *v, int n, const float *fcos, const float *fsin, int head_size) {
    for (int i = 0; i < n; i += 2) {
        float fcr = fcos[(i % head_size) / 2], fci = fsin[(i % head_size) / 2];
        float v0 = v[i], v1 = v[i + 1];
        v[i] = v0 * fcr - v1 * fci;
        v[i + 1] = v0 * fci + v1 * fcr;
    }
}

// One head of causal self-attention for the token at pos: its query q (head_size,) against
// the keys of positions 0..pos -> out (head_size,), the values weighted by the softmax of the
// scores, which att (n_ctx,) holds. Each sum runs over the positions (or over i) in order, so
// a token's result does not depend on how many tokens came in its block.
static void attention(float *out, const float *q, float *att, int pos, const HeadCache *kv) {
    attention_scores(att, q, kv, pos);
    float scale = sqrtf(kv->head_size);
    for (int t = 0; t <= pos; t++) att[t] /= scale;
    softmax(att, pos + 1);
    attention_values(out, att, kv, pos);
}

// The SwiGLU feed-forward of T tokens: out (T, dim) = w2 (silu(w1 x) * w3 x), x (T, dim)
static void swiglu(float *out, const float *x, int T, const FFN *f, RunState *s) {
    int hidden = f->w1.rows;
    Matrix w13[2] = {f->w1, f->w3}; // w1 x and w3 x, in one pass over both
    matmul(s->hb, x, T, w13, 2, s);
    OMP(omp parallel for if(T > 1)) // silu(w1 x) * w3 x, where silu(x) = x * sigmoid(x)
    for (int t = 0; t < T; t++) {
        const float *h1 = s->hb + (size_t)t * 2 * hidden, *h3 = h1 + hidden;
        float *o = s->hb2 + (size_t)t * hidden;
        for (int i = 0; i < hidden; i++) o[i] = h1[i] * (1.0f / (1.0f + expf(-h1[i]))) * h3[i];
    }
    matmul(out, s->hb2, T, &f->w2, 1, s);
}

// A mixture of experts for T tokens: out (T, dim). Each token's router scores the experts
// (softmax of router x) and keeps its k best, their probabilities renormalised to weights
// that sum to 1. Then each expert runs once, on the tokens that chose it, and adds its
// output times each token's weight. Only the chosen experts are computed.
static void mixture(Transformer *tf, float *out, const float *x, int T, const Layer *layer) {
    RunState *s = &tf->state;
    const Config *c = &tf->config;
    int dim = c->dim, E = c->n_experts, k = c->n_experts_per_tok;
    for (int t = 0; t < T; t++) {
        const float *xt = x + (size_t)t * dim;
        for (int e = 0; e < E; e++) {
            float sum = 0.0f;
            for (int i = 0; i < dim; i++) sum += layer->router[(size_t)e * dim + i] * xt[i];
            s->probs[e] = sum;
        }
        softmax(s->probs, E);
        float total = 0.0f;
        for (int j = 0; j < k; j++) { // the k best, by repeated argmax (ties: the lower index)
            int best = -1;
            for (int e = 0; e < E; e++)
                if (s->probs[e] >= 0.0f && (best < 0 || s->probs[e] > s->probs[best])) best = e;
            s->chosen[t * k + j] = best;
            total += s->chosen_weight[t * k + j] = s->probs[best];
            s->probs[best] = -1.0f; // taken
        }
        for (int j = 0; j < k; j++) s->chosen_weight[t * k + j] /= total;
    }
    memset(out, 0, (size_t)T * dim * sizeof(float));
    for (int e = 0; e < E; e++) {
        int n = 0; // gather the tokens that chose expert e
        for (int t = 0; t < T; t++)
            for (int j = 0; j < k; j++)
                if (s->chosen[t * k + j] == e) {
                    s->rows[n] = t;
                    s->row_weight[n] = s->chosen_weight[t * k + j];
                    memcpy(s->xe + (size_t)n++ * dim, x + (size_t)t * dim, dim * sizeof(float));
                }
        if (n == 0) continue;
        swiglu(s->ye, s->xe, n, &layer->experts[e], s);
        for (int i = 0; i < n; i++) {
            float *o = out + (size_t)s->rows[i] * dim;
            for (int d = 0; d < dim; d++) o[d] += s->ye[(size_t)i * dim + d] * s->row_weight[i];
        }
    }
}

// ----------------------------------------------------------------------------
// the forward pass

// Forward T tokens at positions pos..pos+T-1 (the prompt in blocks, or one generated
// token). Returns the logits (vocab_size,) of the last token, or of all T tokens
// (T, vocab_size) when all_logits is set.
static float *forward(Transformer *tf, const int *tokens, int T, int pos, int all_logits) {
    RunState *s = &tf->state;
    const Config *c = &tf->config;
    int dim = c->dim, n_heads = c->n_heads, n_ctx = s->n_ctx;
    int head_size = dim / n_heads, kv_dim = dim * c->n_kv_heads / n_heads;
    int kv_mul = n_heads / c->n_kv_heads; // query heads per kv head
    int qkv_dim = dim + 2 * kv_dim, half = head_size / 2;

    // each token's embedding starts the residual stream x; the RoPE angles of its position
    for (int t = 0; t < T; t++) {
        embed(s->x + (size_t)t * dim, tf, tokens[t]);
        rope_angles(s->rope_cos + t * half, s->rope_sin + t * half, pos + t, head_size);
    }
    for (int l = 0; l < c->n_layers; l++) {
        const Layer *layer = &tf->layers[l];
        float *key_cache = s->key_cache + (size_t)l * n_ctx * kv_dim;
        float *value_cache = s->value_cache + (size_t)l * n_ctx * kv_dim;

        // attention rmsnorm
        OMP(omp parallel for if(T > 1))
        for (int t = 0; t < T; t++)
            rmsnorm(s->xb + (size_t)t * dim, s->x + (size_t)t * dim, layer->rms_att, dim);

        // q, k and v of every token, in one pass over wq, wk and wv
        Matrix qkv[3] = {layer->wq, layer->wk, layer->wv};
        matmul(s->qkv, s->xb, T, qkv, 3, s);

        // RoPE rotates q and k by the token's position; k and v go into the cache. The keys
        // are stored transposed, (n_kv_heads, head_size, n_ctx), so that the scores of
        // neighbouring positions are computed side by side.
        OMP(omp parallel for if(T > 1))
        for (int t = 0; t < T; t++) {
            float *q = s->qkv + (size_t)t * qkv_dim, *k = q + dim, *v = k + kv_dim;
            rope(q, dim, s->rope_cos + t * half, s->rope_sin + t * half, head_size);
            rope(k, kv_dim, s->rope_cos + t * half, s->rope_sin + t * half, head_size);
            for (int i = 0; i < kv_dim; i++) key_cache[(size_t)i * n_ctx + pos + t] = k[i];
            memcpy(value_cache + (size_t)(pos + t) * kv_dim, v, kv_dim * sizeof(float));
        }

        // multihead attention: each token attends to the cache up to its own position, so
        // it is causal within the block too
        OMP(omp parallel for schedule(static))
        for (int th = 0; th < T * n_heads; th++) {
            int t = th / n_heads, h = th % n_heads, kv_off = (h / kv_mul) * head_size;
            HeadCache kv = {key_cache + (size_t)kv_off * n_ctx, value_cache + kv_off, head_size,
                            n_ctx, kv_dim};
            attention(s->xb + (size_t)t * dim + h * head_size,
                      s->qkv + (size_t)t * qkv_dim + h * head_size, s->att + (size_t)th * n_ctx,
                      pos + t, &kv);
        }

        // the output projection, and the residual connection
        matmul(s->xb2, s->xb, T, &layer->wo, 1, s);
        for (size_t i = 0; i < (size_t)T * dim; i++) s->x[i] += s->xb2[i];

        // ffn rmsnorm
        OMP(omp parallel for if(T > 1))
        for (int t = 0; t < T; t++)
            rmsnorm(s->xb + (size_t)t * dim, s->x + (size_t)t * dim, layer->rms_ffn, dim);

        // the feed-forward (SwiGLU, or a mixture of experts), and the residual connection
        if (layer->router) mixture(tf, s->xb2, s->xb, T, layer);
        else swiglu(s->xb2, s->xb, T, &layer->ffn, s);
        for (size_t i = 0; i < (size_t)T * dim; i++) s->x[i] += s->xb2[i];
    }

    // the final rmsnorm and the classifier into logits. The classifier is the largest
    // matrix: it runs only on the tokens whose logits are needed.
    int first = all_logits ? 0 : T - 1, n_out = T - first;
    for (int t = first; t < T; t++)
        rmsnorm(s->xb + (size_t)(t - first) * dim, s->x + (size_t)t * dim, tf->rms_final, dim);
    matmul(s->logits, s->xb, n_out, &tf->wcls, 1, s);
    return s->logits;
}

// ----------------------------------------------------------------------------
// the tokenizer: SentencePiece BPE with byte fallback, read from llama2.c's tokenizer.bin
// (int32 max_token_length, then per token: float32 score, int32 length, the bytes).

enum { BOS = 1, EOS = 2 };                              // llama2.c's (and our) ids
enum { NORMAL, UNKNOWN, CONTROL, BYTE, SPECIAL };       // kinds of piece

typedef struct {
    const char *str;
    int len, id;
} TokenIndex;

typedef struct {
    int vocab_size;
    int max_token_length;
    char *data;             // the file's bytes; pieces point into it
    const char **piece;     // (vocab_size,) ' ' stands for SentencePiece's '▁'; not NUL-terminated
    int *piece_len;         // (vocab_size,)
    float *score;           // (vocab_size,) merge priority: higher merges first
    unsigned char *kind;    // (vocab_size,)
    TokenIndex *sorted;     // the NORMAL pieces sorted by bytes, for lookup by bsearch
    int n_sorted;
    int *special;           // ids of the <|...|> pieces, which are never split or merged
    int n_special;
    int byte_id[256];       // id of piece <0xNN>, or -1
} Tokenizer;

static int compare_index(const void *a, const void *b) {
    const TokenIndex *x = a, *y = b;
    int n = x->len < y->len ? x->len : y->len, c = memcmp(x->str, y->str, n);
    return c != 0 ? c : x->len - y->len;
}

static int hex_digit(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

// which kind of piece is token id: the byte pieces <0x00>..<0xFF> are found by their
// text (not by a fixed offset: ours start at 5, llama2.c's at 3)
static int piece_kind(const char *p, int len, int id, int *byte) {
    if (id == 0) return UNKNOWN;
    if (id == BOS || id == EOS) return CONTROL;
    if (len == 6 && memcmp(p, "<0x", 3) == 0 && p[5] == '>' && hex_digit(p[3]) >= 0
        && hex_digit(p[4]) >= 0) {
        *byte = hex_digit(p[3]) * 16 + hex_digit(p[4]);
        return BYTE;
    }
    if (len > 4 && memcmp(p, "<|", 2) == 0 && memcmp(p + len - 2, "|>", 2) == 0) return SPECIAL;
    return NORMAL;
}

static void build_tokenizer(Tokenizer *tok, const char *path, int vocab_size) {
    const char *hint = "is this the tokenizer.bin of this model?";
    struct stat st;
    FILE *f = fdopen(open_regular(path, " — pass the tokenizer with -z", &st), "rb");
    if (!f) die("%s: cannot read: %s", path, strerror(errno));
    size_t size = (size_t)st.st_size;
    tok->data = xalloc(size);
    if (size > 0 && fread(tok->data, 1, size, f) != size) die("%s: read failed", path);
    fclose(f);
    if (size < 4) die("%s: %zu bytes is too small for a tokenizer — %s", path, size, hint);
    int32_t max_len;
    memcpy(&max_len, tok->data, 4);
    if (max_len <= 0 || max_len > 4096)
        die("%s: max_token_length %d is outside 1..4096 — %s", path, max_len, hint);
    tok->vocab_size = vocab_size;
    tok->max_token_length = max_len;
    tok->piece = xalloc(vocab_size * sizeof(char *));
    tok->piece_len = xalloc(vocab_size * sizeof(int));
    tok->score = xalloc(vocab_size * sizeof(float));
    tok->kind = xalloc(vocab_size);
    tok->sorted = xalloc(vocab_size * sizeof(TokenIndex));
    tok->special = xalloc(vocab_size * sizeof(int));
    for (int b = 0; b < 256; b++) tok->byte_id[b] = -1;
    size_t off = 4;
    for (int i = 0; i < vocab_size; i++) {
        if (size - off < 8)
            die("%s: ends after %d of the model's %d tokens — %s", path, i, vocab_size, hint);
        int32_t len;
        memcpy(&tok->score[i], tok->data + off, 4);
        memcpy(&len, tok->data + off + 4, 4);
        off += 8;
        if (len <= 0 || len > max_len)
            die("%s: token %d has length %d, outside 1..%d — %s", path, i, len, max_len, hint);
        if (size - off < (size_t)len)
            die("%s: token %d runs past the end of the file — is it truncated?", path, i);
        tok->piece[i] = tok->data + off;
        tok->piece_len[i] = len;
        off += len;
        int byte = 0;
        tok->kind[i] = piece_kind(tok->piece[i], len, i, &byte);
        if (tok->kind[i] == BYTE) tok->byte_id[byte] = i;
        if (tok->kind[i] == SPECIAL) tok->special[tok->n_special++] = i;
        if (tok->kind[i] == NORMAL)
            tok->sorted[tok->n_sorted++] = (TokenIndex){tok->piece[i], len, i};
    }
    if (off != size)
        die("%s: has %zu bytes after the model's %d tokens — is the tokenizer from another model?",
            path, size - off, vocab_size);
    qsort(tok->sorted, tok->n_sorted, sizeof(TokenIndex), compare_index);
}

static void free_tokenizer(Tokenizer *tok) {
    free(tok->data); free(tok->piece); free(tok->piece_len); free(tok->score);
    free(tok->kind); free(tok->sorted); free(tok->special);
}

// the id of the NORMAL piece with these bytes, or -1
static int lookup(const Tokenizer *tok, const char *str, int len) {
    if (len > tok->max_token_length) return -1;
    TokenIndex key = {str, len, 0};
    const TokenIndex *r = bsearch(&key, tok->sorted, tok->n_sorted, sizeof(TokenIndex),
                                  compare_index);
    return r ? r->id : -1;
}

// UTF-8: the length of the valid sequence at p (n bytes available), 0 if p does not
// start a valid sequence (overlong, surrogate, > U+10FFFF, stray continuation byte),
// -1 if it could still become valid with more bytes.
static int utf8_length(const unsigned char *p, size_t n) {
    unsigned char c = p[0], lo = 0x80, hi = 0xBF;
    int need;
    if (c < 0x80) return 1;
    if (c < 0xC2) return 0;
    if (c < 0xE0) need = 2;
    else if (c < 0xF0) { need = 3; if (c == 0xE0) lo = 0xA0; if (c == 0xED) hi = 0x9F; }
    else if (c < 0xF5) { need = 4; if (c == 0xF0) lo = 0x90; if (c == 0xF4) hi = 0x8F; }
    else return 0;
    for (int i = 1; i < need; i++) {
        if ((size_t)i >= n) return -1;
        if (p[i] < (i == 1 ? lo : 0x80) || p[i] > (i == 1 ? hi : 0xBF)) return 0;
    }
    return need;
}

static int valid_utf8(const char *text) {
    size_t n = strlen(text);
    for (size_t i = 0; i < n;) {
        int len = utf8_length((const unsigned char *)text + i, n - i);
        if (len <= 0) return 0;
        i += len;
    }
    return 1;
}

typedef struct { int *ids; size_t n, cap; } Tokens; // a growing array of token ids

static void push(Tokens *v, int id) {
    if (v->n == v->cap) {
        v->cap = v->cap ? 2 * v->cap : 64;
        v->ids = realloc(v->ids, v->cap * sizeof(int));
        if (!v->ids) die("out of memory");
    }
    v->ids[v->n++] = id;
}

// A candidate merge: symbols left and right (adjacent when it was made) join into piece id.
// len is their joined length then: if either has changed since, the candidate is stale.
typedef struct { float score; int left, right, len, id; } Merge;

// a binary heap of candidates, the best on top: highest score, then leftmost (as SentencePiece)
typedef struct { Merge *m; int n; } Heap;

static int better(const Merge *a, const Merge *b) {
    return a->score != b->score ? a->score > b->score : a->left < b->left;
}

static void heap_push(Heap *h, Merge x) {
    int i = h->n++;
    for (; i > 0 && better(&x, &h->m[(i - 1) / 2]); i = (i - 1) / 2) h->m[i] = h->m[(i - 1) / 2];
    h->m[i] = x;
}

static Merge heap_pop(Heap *h) {
    Merge top = h->m[0], x = h->m[--h->n];
    int i = 0;
    for (;;) {
        int c = 2 * i + 1;
        if (c >= h->n) break;
        if (c + 1 < h->n && better(&h->m[c + 1], &h->m[c])) c++;
        if (!better(&h->m[c], &x)) break;
        h->m[i] = h->m[c];
        i = c;
    }
    h->m[i] = x;
    return top;
}

// symbols a and b (adjacent) as a candidate, if their joined bytes are a piece
static void candidate(Heap *h, const Tokenizer *tok, const char *str, const int *start,
                      const int *size, int a, int b) {
    int m = lookup(tok, str + start[a], size[a] + size[b]);
    if (m >= 0) heap_push(h, (Merge){tok->score[m], a, b, size[a] + size[b], m});
}

// BPE on one segment of text (no special pieces inside), as SentencePiece does it:
// start from one symbol per UTF-8 character, then keep merging the adjacent pair whose
// concatenation is the highest-scoring piece (leftmost on ties). A character that is
// not in the vocabulary becomes its bytes, <0xNN> pieces. The symbols form a linked list
// and the candidate pairs a heap, so a merge costs O(log n), not a scan of the text.
static void encode_segment(const Tokenizer *tok, const char *text, size_t n, int dummy_prefix,
                           Tokens *out) {
    char *str = xalloc(n + 2); // the text, after a space if dummy_prefix
    size_t len = 0;
    if (dummy_prefix) str[len++] = ' ';
    for (size_t i = 0; i < n; i++) { // '▁' (U+2581) is SentencePiece's space
        if (i + 2 < n && memcmp(text + i, "\xE2\x96\x81", 3) == 0) { str[len++] = ' '; i += 2; }
        else str[len++] = text[i];
    }
    if (len == 0) { free(str); return; }
    // symbol i covers str[start[i] .. start[i]+size[i]); size 0 once merged into its left
    // neighbour; next[i] and prev[i] link the living symbols (-1 at the ends)
    int *start = xalloc(len * sizeof(int)), *size = xalloc(len * sizeof(int));
    int *id = xalloc(len * sizeof(int)), *next = xalloc(len * sizeof(int));
    int *prev = xalloc(len * sizeof(int)), n_sym = 0;
    for (size_t i = 0; i < len; n_sym++) {
        int l = utf8_length((const unsigned char *)str + i, len - i); // the text is valid UTF-8
        start[n_sym] = (int)i;
        size[n_sym] = l;
        id[n_sym] = lookup(tok, str + i, l);
        prev[n_sym] = n_sym - 1;
        next[n_sym] = n_sym + 1 < (int)len ? n_sym + 1 : -1;
        i += l;
    }
    next[n_sym - 1] = -1;
    // each merge adds at most 2 candidates to the n_sym - 1 it removes from the list
    Heap h = {xalloc(3 * (size_t)n_sym * sizeof(Merge)), 0};
    for (int i = 0; i + 1 < n_sym; i++) candidate(&h, tok, str, start, size, i, i + 1);
    while (h.n > 0) {
        Merge m = heap_pop(&h);
        int a = m.left, b = m.right;
        if (size[a] == 0 || next[a] != b || size[a] + size[b] != m.len) continue; // stale
        id[a] = m.id; // b joins a
        size[a] += size[b];
        size[b] = 0;
        next[a] = next[b];
        if (next[a] >= 0) prev[next[a]] = a;
        if (prev[a] >= 0) candidate(&h, tok, str, start, size, prev[a], a);
        if (next[a] >= 0) candidate(&h, tok, str, start, size, a, next[a]);
    }
    for (int i = 0; i >= 0; i = next[i]) {
        if (id[i] >= 0) { push(out, id[i]); continue; }
        for (int b = 0; b < size[i]; b++) { // byte fallback (<unk> without byte pieces)
            int byte = tok->byte_id[(unsigned char)str[start[i] + b]];
            push(out, byte >= 0 ? byte : 0);
        }
    }
    free(str); free(start); free(size); free(id); free(next); free(prev); free(h.m);
}

// the special piece that starts at text (the longest, if several), or -1
static int match_special(const Tokenizer *tok, const char *text, size_t n, int *match_len) {
    int best = -1;
    *match_len = 0;
    for (int i = 0; i < tok->n_special; i++) {
        int id = tok->special[i], l = tok->piece_len[id];
        if ((size_t)l <= n && l > *match_len && memcmp(text, tok->piece[id], l) == 0) {
            best = id;
            *match_len = l;
        }
    }
    return best;
}

// Encode UTF-8 text, appending to out. The text is cut at special pieces like <|im_end|>,
// each becoming its own id; the pieces between are encoded by BPE. dummy_prefix puts a
// space before the text, as SentencePiece's add_dummy_prefix does; the text after a special
// piece always gets one, as llama.cpp and Hugging Face encode it (tokenizer.py's encode).
static void encode(const Tokenizer *tok, const char *text, int dummy_prefix, Tokens *out) {
    size_t n = strlen(text), seg = 0;
    if (n == 0) return;
    for (size_t i = 0; i <= n;) {
        int len = 0, sp = i < n ? match_special(tok, text + i, n - i, &len) : -1;
        if (sp < 0 && i < n) { i++; continue; }
        if (i > seg) encode_segment(tok, text + seg, i - seg, seg > 0 || dummy_prefix, out);
        if (sp < 0) break;
        push(out, sp);
        i += len;
        seg = i;
    }
}

// Decoding prints pieces as they come. Byte pieces are held until they form a whole
// UTF-8 character; bytes that cannot become one print as U+FFFD, one per byte, which is
// what SentencePiece's decode does.
typedef struct { unsigned char bytes[4]; int n; } Utf8Buffer;

static void flush_bytes(Utf8Buffer *u, int final) {
    while (u->n > 0) {
        int len = utf8_length(u->bytes, u->n);
        if (len < 0 && !final) return; // wait for the rest of the character
        if (len > 0) fwrite(u->bytes, 1, len, stdout);
        else { fputs("\xEF\xBF\xBD", stdout); len = 1; }
        u->n -= len;
        memmove(u->bytes, u->bytes + len, u->n);
    }
}

static void decode(const Tokenizer *tok, Utf8Buffer *u, int prev, int token) {
    const char *p = tok->piece[token];
    if (tok->kind[token] == BYTE) {
        u->bytes[u->n++] = (unsigned char)(hex_digit(p[3]) * 16 + hex_digit(p[4]));
        flush_bytes(u, 0);
        return;
    }
    flush_bytes(u, 1);
    if (tok->kind[token] == CONTROL) return;
    if (tok->kind[token] == UNKNOWN) { // SentencePiece prints " ⁇ "
        fputs(" \xE2\x81\x87 ", stdout);
        return;
    }
    int len = tok->piece_len[token];
    if ((prev == BOS || tok->kind[prev] == SPECIAL) && p[0] == ' ') { // a dummy prefix,
        p++;                                                          // not text
        len--;
    }
    fwrite(p, 1, len, stdout);
}

// ----------------------------------------------------------------------------
// the sampler: logits -> next token, greedy, or random with temperature and top-p

typedef struct {
    float prob;
    int index;
} ProbIndex;

typedef struct {
    int vocab_size;
    float temperature;
    float topp;
    unsigned long long rng_state;
    ProbIndex *probindex; // (2 * vocab_size,) scratch for top-p
    float penalty;        // repetition penalty, 1 = off
    unsigned char *seen;  // (vocab_size,) 1 for each token in the context so far
    int unpenalized[4];   // never penalized: BOS, EOS, <|im_start|>, <|im_end|> (-1: none)
} Sampler;

// xorshift* (as llama2.c), so that a seed gives the same text in both programs
static unsigned int random_u32(unsigned long long *state) {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    return (unsigned int)((*state * 0x2545F4914F6CDD1Dull) >> 32);
}

static float random_f32(unsigned long long *state) { // in [0, 1)
    return (random_u32(state) >> 8) / 16777216.0f;
}

static int sample_argmax(const float *p, int n) {
    int best = 0;
    for (int i = 1; i < n; i++) if (p[i] > p[best]) best = i;
    return best;
}

// sample from the distribution p (n,); coin in [0,1)
static int sample_mult(const float *p, int n, float coin) {
    float cdf = 0.0f;
    for (int i = 0; i < n; i++) {
        cdf += p[i];
        if (coin < cdf) return i;
    }
    return n - 1; // rounding
}

// Sort (prob, index) pairs by descending prob. A float >= 0 orders like its bits read as an
// unsigned integer, so a radix sort on 3 digits of 11 bits does it in linear time (qsort of
// a 32000-token vocabulary used to take longer than the forward pass of a small model).
static ProbIndex *sort_descending(ProbIndex *a, ProbIndex *tmp, int n) {
    int count[3][2048] = {{0}};
    uint32_t key;
    for (int i = 0; i < n; i++) {
        memcpy(&key, &a[i].prob, 4);
        for (int d = 0; d < 3; d++) count[d][(~key >> 11 * d) & 2047]++; // ~: large probs first
    }
    for (int d = 0; d < 3; d++) {
        memcpy(&key, &a[0].prob, 4);
        if (count[d][(~key >> 11 * d) & 2047] == n) continue; // all share this digit
        int start = 0;
        for (int b = 0; b < 2048; b++) { int c = count[d][b]; count[d][b] = start; start += c; }
        for (int i = 0; i < n; i++) {
            memcpy(&key, &a[i].prob, 4);
            tmp[count[d][(~key >> 11 * d) & 2047]++] = a[i];
        }
        ProbIndex *swap = a; a = tmp; tmp = swap;
    }
    return a;
}

// Top-p (nucleus) sampling: sample from the most likely tokens whose probabilities
// add up to more than topp. A token below (1-topp)/(n-1) can never be among them.
static int sample_topp(const float *p, int n, float topp, ProbIndex *pi, ProbIndex *tmp,
                       float coin) {
    const float cutoff = (1.0f - topp) / (n - 1);
    int n0 = 0;
    for (int i = 0; i < n; i++) if (p[i] >= cutoff) pi[n0++] = (ProbIndex){p[i], i};
    if (n0 == 0) return sample_argmax(p, n); // topp so small that no token passes the cutoff
    pi = sort_descending(pi, tmp, n0);
    float cumulative = 0.0f;
    int last = n0 - 1;
    for (int i = 0; i < n0; i++) {
        cumulative += pi[i].prob;
        if (cumulative > topp) { last = i; break; }
    }
    float r = coin * cumulative, cdf = 0.0f;
    for (int i = 0; i <= last; i++) {
        cdf += pi[i].prob;
        if (r < cdf) return pi[i].index;
    }
    return pi[last].index; // rounding
}

// NaN or inf, tested on the bits: -Ofast lets the compiler assume isfinite() is always true
static int is_finite(float x) {
    uint32_t bits;
    memcpy(&bits, &x, 4);
    return (bits & 0x7f800000u) != 0x7f800000u;
}

// Remember a token of the context, for the repetition penalty.
static void remember(Sampler *sm, int token) {
    for (int i = 0; i < 4; i++) if (token == sm->unpenalized[i]) return;
    sm->seen[token] = 1;
}

// CTRL's repetition penalty (Keskar et al. 2019), as transformers and llama.cpp apply it:
// each token already in the context gets less likely, its logit divided by the penalty
// when positive and multiplied by it when negative.
static void penalize_repeats(const Sampler *sm, float *logits) {
    if (sm->penalty == 1.0f) return;
    for (int i = 0; i < sm->vocab_size; i++)
        if (sm->seen[i])
            logits[i] = logits[i] > 0 ? logits[i] / sm->penalty : logits[i] * sm->penalty;
}

static int sample(Sampler *sm, float *logits) {
    int n = sm->vocab_size;
    for (int i = 0; i < n; i++)
        if (!is_finite(logits[i]))
            die("the model computed NaN or inf — its weights are damaged or diverged; export "
                "a good checkpoint again");
    penalize_repeats(sm, logits);
    if (sm->temperature == 0.0f) return sample_argmax(logits, n);
    for (int i = 0; i < n; i++) logits[i] /= sm->temperature;
    softmax(logits, n);
    float coin = random_f32(&sm->rng_state);
    if (sm->topp <= 0.0f || sm->topp >= 1.0f) return sample_mult(logits, n, coin);
    return sample_topp(logits, n, sm->topp, sm->probindex, sm->probindex + n, coin);
}

// ----------------------------------------------------------------------------
// generation

// The activation buffers and kv cache forward() works in, for blocks of up to B tokens and
// n_ctx positions; all_logits keeps the logits of every token of a block, not just the last.
static void malloc_run_state(Transformer *tf, int B, int n_ctx, int all_logits) {
    RunState *s = &tf->state;
    const Config *c = &tf->config;
    size_t dim = c->dim, hidden = c->hidden_dim, kv_dim = dim * c->n_kv_heads / c->n_heads;
    n_ctx = (n_ctx + 15) / 16 * 16; // attention_scores computes 16 positions at a time
    size_t widest = hidden > dim ? hidden : dim, cache = (size_t)c->n_layers * n_ctx * kv_dim;
    *s = (RunState){.B = B, .n_ctx = n_ctx};
    s->x = xalloc(B * dim * sizeof(float));
    s->xb = xalloc(B * dim * sizeof(float));
    s->xb2 = xalloc(B * dim * sizeof(float));
    s->qkv = xalloc(B * (dim + 2 * kv_dim) * sizeof(float));
    s->hb = xalloc(B * 2 * hidden * sizeof(float));
    s->hb2 = xalloc(B * hidden * sizeof(float));
    s->att = xalloc((size_t)B * c->n_heads * n_ctx * sizeof(float));
    s->rope_cos = xalloc(B * dim / c->n_heads / 2 * sizeof(float));
    s->rope_sin = xalloc(B * dim / c->n_heads / 2 * sizeof(float));
    s->logits = xalloc((all_logits ? B : 1) * (size_t)c->vocab_size * sizeof(float));
    if (tf->group_size) {
        s->xq = xalloc(B * widest);
        s->xq_scale = xalloc(B * widest / tf->group_size * sizeof(float));
        s->xq_sum = xalloc(B * widest / tf->group_size * sizeof(int32_t));
    }
    s->key_cache = xalloc(cache * sizeof(float));
    s->value_cache = xalloc(cache * sizeof(float));
    if (c->n_experts) {
        size_t k = c->n_experts_per_tok;
        s->probs = xalloc(c->n_experts * sizeof(float));
        s->chosen = xalloc(B * k * sizeof(int));
        s->chosen_weight = xalloc(B * k * sizeof(float));
        s->rows = xalloc(B * sizeof(int));
        s->row_weight = xalloc(B * sizeof(float));
        s->xe = xalloc(B * dim * sizeof(float));
        s->ye = xalloc(B * dim * sizeof(float));
    }
}

static void free_run_state(RunState *s) {
    float *f[] = {s->x, s->xb, s->xb2, s->qkv, s->hb, s->hb2, s->att, s->rope_cos, s->rope_sin,
                  s->logits, s->xq_scale, s->key_cache, s->value_cache, s->probs, s->chosen_weight,
                  s->row_weight, s->xe, s->ye};
    for (size_t i = 0; i < sizeof(f) / sizeof(f[0]); i++) free(f[i]);
    free(s->xq);
    free(s->xq_sum);
    free(s->chosen);
    free(s->rows);
}

// Forward tokens (n,) at positions pos..pos+n-1 in blocks of up to B (-b); returns the logits
// of the last one. With -L, every position's logits are written to the state's logits_file.
static float *forward_tokens(Transformer *tf, const int *tokens, int n, int pos) {
    RunState *s = &tf->state;
    int vocab = tf->config.vocab_size;
    float *logits = s->logits;
    for (int i = 0; i < n; i += s->B) {
        int T = n - i < s->B ? n - i : s->B;
        logits = forward(tf, tokens + i, T, pos + i, s->logits_file != NULL);
        if (s->logits_file) {
            if (fwrite(logits, sizeof(float) * vocab, T, s->logits_file) != (size_t)T)
                die("writing the logits file failed");
            logits += (size_t)(T - 1) * vocab;
        }
    }
    return logits;
}

static double rate(int n, double seconds) { return seconds > 0 ? n / seconds : 0.0; }

// As llama2.c: the prompt (after BOS) is printed, then sampled tokens until BOS or EOS,
// for steps positions in all, prompt included.
static void generate(Transformer *tf, Tokenizer *tok, Sampler *sm, const char *prompt, int steps) {
    Tokens p = {0};
    push(&p, BOS);
    encode(tok, prompt, 1, &p);
    int n_prompt = (int)p.n, max_seq_len = tf->config.max_seq_len;
    if (n_prompt > max_seq_len)
        die("the prompt is %d tokens but the model's context is %d — shorten the prompt", n_prompt,
            max_seq_len);
    int n_pre = n_prompt < steps ? n_prompt : steps; // positions of the prompt that are run

    double t_start = now_seconds();
    float *logits = forward_tokens(tf, p.ids, n_pre, 0); // the prompt, batched
    double t_prefill = now_seconds();
    for (int i = 0; i < n_pre; i++) remember(sm, p.ids[i]);

    Utf8Buffer u = {0};
    for (int i = 1; i < n_prompt && i <= steps; i++) decode(tok, &u, p.ids[i - 1], p.ids[i]);
    fflush(stdout);
    int pos = n_pre, token = p.ids[n_pre - 1];
    while (n_prompt <= steps) { // (a prompt longer than steps is cut, as in llama2.c)
        int next = sample(sm, logits);
        if (next == BOS || next == EOS) break; // the end of a document
        remember(sm, next);
        decode(tok, &u, token, next);
        fflush(stdout);
        token = next;
        if (pos >= steps) break;
        logits = forward_tokens(tf, &token, 1, pos);
        pos++;
    }
    flush_bytes(&u, 1);
    printf("\n");
    fflush(stdout);

    double t_end = now_seconds();
    int n_new = pos - n_pre; // tokens generated after the prompt: llama2.c's line, then ours
    if (n_new > 0) fprintf(stderr, "achieved tok/s: %f\n", rate(n_new, t_end - t_prefill));
    fprintf(stderr, "prefill: %d tokens, %.1f tok/s; decode: %d tokens, %.1f tok/s\n", n_pre,
            rate(n_pre, t_prefill - t_start), n_new, rate(n_new, t_end - t_prefill));
    free(p.ids);
}

// the id of a special piece such as <|im_start|>, or -1
static int special_id(const Tokenizer *tok, const char *text) {
    int len;
    int id = match_special(tok, text, strlen(text), &len);
    return len == (int)strlen(text) ? id : -1;
}

// <|im_start|>role\ncontent<|im_end|>\n  (role+"\n" and content are encoded separately; text
// right after a chat token gets the dummy prefix, as llama.cpp and Hugging Face encode it)
static void append_message(const Tokenizer *tok, Tokens *v, const char *role, const char *content) {
    char header[16];
    snprintf(header, sizeof(header), "%s\n", role);
    push(v, special_id(tok, "<|im_start|>"));
    encode(tok, header, 1, v);
    encode(tok, content, 0, v);
    push(v, special_id(tok, "<|im_end|>"));
    encode(tok, "\n", 1, v);
}

// a message that does not fit the context after pos is a stop the user must act on
static void check_room(int pos, size_t n, int max_seq_len) {
    if (pos + (int)n >= max_seq_len)
        die("the conversation fills the model's context of %d tokens — start a new chat",
            max_seq_len);
}

// A model that was only pretrained continues stories; say so before it answers a chat.
static void warn_if_not_tuned(const Transformer *tf, const char *path) {
    if (tf->tuned == 1)
        fprintf(stderr, "note: %s was pretrained only, never fine-tuned to chat, so it answers "
                "with stories — fine-tune it first: python train.py --task=sft ...\n", path);
    else if (tf->version == 0)
        fprintf(stderr, "note: %s is a version 0 file, which cannot record whether the model "
                "was fine-tuned to chat (a pretrained-only one answers with stories) — export "
                "with --version=1 to know\n", path);
}

// Chat in the ChatML template of our tokenizer. All turns stay in the kv cache; each
// turn runs only its new tokens through the model.
static void chat(Transformer *tf, Tokenizer *tok, Sampler *sm, const char *user,
                 const char *system, int reply_tokens) {
    int im_start = special_id(tok, "<|im_start|>"), im_end = special_id(tok, "<|im_end|>");
    if (im_start < 0 || im_end < 0)
        die("chat mode needs <|im_start|> and <|im_end|> in the tokenizer — use -m generate");
    int max_seq_len = tf->config.max_seq_len, pos = 0;
    Tokens pending = {0}; // tokens not yet run through the model
    push(&pending, BOS);
    if (system) append_message(tok, &pending, "system", system);
    char *line = NULL;
    size_t line_cap = 0;
    for (;;) {
        if (!user) { // the first user message may come from -i, the others from stdin
            printf("User: ");
            fflush(stdout);
            ssize_t n = getline(&line, &line_cap, stdin);
            if (n < 0) { printf("\n"); break; }
            if (n > 0 && line[n - 1] == '\n') line[n - 1] = '\0';
            if (!valid_utf8(line)) die("the message is not valid UTF-8");
            user = line;
        }
        append_message(tok, &pending, "user", user);
        user = NULL;
        push(&pending, im_start);
        encode(tok, "assistant\n", 1, &pending);
        check_room(pos, pending.n, max_seq_len);
        for (size_t i = 0; i < pending.n; i++) remember(sm, pending.ids[i]);
        float *logits = forward_tokens(tf, pending.ids, (int)pending.n, pos);
        pos += (int)pending.n;
        int token = pending.ids[pending.n - 1];
        pending.n = 0;

        printf("Assistant: ");
        Utf8Buffer u = {0};
        int max_reply = max_seq_len - pos < reply_tokens ? max_seq_len - pos : reply_tokens;
        for (int n = 0; n < max_reply; n++) {
            int next = sample(sm, logits);
            if (next == im_end || next == BOS || next == EOS) break;
            remember(sm, next);
            decode(tok, &u, token, next);
            fflush(stdout);
            token = next;
            logits = forward_tokens(tf, &token, 1, pos++);
        }
        flush_bytes(&u, 1);
        printf("\n");
        fflush(stdout);
        push(&pending, im_end); // whether sampled or not: the turn is closed in the context
        encode(tok, "\n", 1, &pending);
    }
    free(line);
    free(pending.ids);
}

// ----------------------------------------------------------------------------
// command line

static void usage(const char *why) {
    fprintf(stderr, "error: %s — usage: run <model.bin> [-t temperature=1.0] [-p topp=0.9] "
                    "[-s seed] [-n steps=256] [-i prompt] [-z tokenizer.bin] "
                    "[-m generate|chat|tokenize] [-y system_prompt] [-b prefill_block=128] "
                    "[-r repetition_penalty=1] [-L logits_file]\n", why);
    exit(1);
}

static double parse_number(const char *flag, const char *text, double lo, double hi) {
    char *end;
    errno = 0;
    double v = strtod(text, &end);
    if (end == text || *end != '\0' || errno != 0 || !(v >= lo && v <= hi)) {
        static char why[128];
        snprintf(why, sizeof(why), "%s needs a number in [%g, %g], not '%s'", flag, lo, hi, text);
        usage(why);
    }
    return v;
}

static int file_exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

static int same_file(const char *a, const char *b) { // one inode, however it is spelled
    struct stat sa, sb;
    return stat(a, &sa) == 0 && stat(b, &sb) == 0 && sa.st_dev == sb.st_dev
           && sa.st_ino == sb.st_ino;
}

// tokenizer.bin next to the model, else in the current directory
static char *default_tokenizer(const char *model_path) {
    const char *slash = strrchr(model_path, '/');
    size_t dir = slash ? (size_t)(slash - model_path + 1) : 0;
    char *path = xalloc(dir + sizeof("tokenizer.bin"));
    memcpy(path, model_path, dir);
    strcpy(path + dir, "tokenizer.bin");
    if (file_exists(path)) return path;
    strcpy(path, "tokenizer.bin");
    if (file_exists(path)) return path;
    die("no tokenizer.bin next to %s or in the current directory — pass one with -z", model_path);
    return NULL;
}

#ifndef RUN_FUZZ
int main(int argc, char **argv) {
    const char *model_path = NULL, *tokenizer_path = NULL, *prompt = NULL, *mode = "generate";
    const char *system_prompt = NULL, *logits_path = NULL;
    float temperature = 1.0f; // 0 = greedy
    float topp = 0.9f;        // top-p in nucleus sampling; 1 = off
    float penalty = 1.0f;     // repetition penalty; 1 = off, 1.1-1.3 is usual
    long long seed = 0;       // <= 0: seed from the clock
    int steps = 256;          // positions to run, prompt included (chat: tokens per reply);
                              // 0 = the whole context
    int block = 128;          // prompt tokens per forward pass (-b): each weight is read
                              // once for the whole block

    if (argc < 2 || argv[1][0] == '-') usage("the first argument must be the model file");
    model_path = argv[1];
    for (int i = 2; i < argc; i += 2) {
        const char *flag = argv[i];
        if (flag[0] != '-' || strlen(flag) != 2) usage("options are one dash and one letter");
        if (i + 1 >= argc) usage("an option is missing its value");
        const char *val = argv[i + 1];
        switch (flag[1]) {
        case 't': temperature = (float)parse_number(flag, val, 0, 1e6); break;
        case 'p': topp = (float)parse_number(flag, val, 0, 1); break;
        case 'r': penalty = (float)parse_number(flag, val, 1e-3, 1e3); break;
        case 's': seed = (long long)parse_number(flag, val, -9e18, 9e18); break;
        case 'n': steps = (int)parse_number(flag, val, 0, 1e9); break;
        case 'b': block = (int)parse_number(flag, val, 1, 1e6); break;
        case 'i': prompt = val; break;
        case 'z': tokenizer_path = val; break;
        case 'm': mode = val; break;
        case 'y': system_prompt = val; break;
        case 'L': logits_path = val; break;
        default: usage("unknown option");
        }
    }
    int is_chat = strcmp(mode, "chat") == 0, is_tokenize = strcmp(mode, "tokenize") == 0;
    if (!is_chat && !is_tokenize && strcmp(mode, "generate") != 0)
        usage("-m must be generate, chat or tokenize");
    if (prompt && !valid_utf8(prompt)) die("the prompt is not valid UTF-8");
    if (system_prompt && !valid_utf8(system_prompt)) die("the system prompt is not valid UTF-8");

    Transformer tf;
    read_checkpoint(&tf, model_path);
    int max_seq_len = tf.config.max_seq_len, vocab_size = tf.config.vocab_size;
    if (steps == 0 || steps > max_seq_len) steps = max_seq_len;
    char *default_path = tokenizer_path ? NULL : default_tokenizer(model_path);
    Tokenizer tok = {0};
    build_tokenizer(&tok, tokenizer_path ? tokenizer_path : default_path, vocab_size);

    if (is_tokenize) {
        Tokens ids = {0};
        encode(&tok, prompt ? prompt : "", 1, &ids);
        for (size_t i = 0; i < ids.n; i++) printf(i ? " %d" : "%d", ids.ids[i]);
        printf("\n");
        free(ids.ids);
    } else {
        FILE *logits_file = NULL;
        const char *inputs[] = {model_path, tokenizer_path ? tokenizer_path : default_path};
        for (int i = 0; logits_path && i < 2; i++) // -L names an output, never what is read
            if (same_file(logits_path, inputs[i]))
                die("-L %s is %s, which this command reads — give the logits another file",
                    logits_path, inputs[i]);
        if (logits_path && !(logits_file = fopen(logits_path, "wb")))
            die("%s: cannot write: %s", logits_path, strerror(errno));
        int n_ctx = is_chat ? max_seq_len : steps; // the kv cache holds only the usable positions
        malloc_run_state(&tf, block < n_ctx ? block : n_ctx, n_ctx, logits_file != NULL);
        tf.state.logits_file = logits_file;
        Sampler sm = {vocab_size, temperature, topp, 0, xalloc(2 * vocab_size * sizeof(ProbIndex)),
                      penalty, xalloc(vocab_size),
                      {BOS, EOS, special_id(&tok, "<|im_start|>"), special_id(&tok, "<|im_end|>")}};
        sm.rng_state = seed > 0 ? (unsigned long long)seed : (unsigned long long)time(NULL);
        if (is_chat) {
            warn_if_not_tuned(&tf, model_path);
            chat(&tf, &tok, &sm, prompt, system_prompt, steps);
        }
        else generate(&tf, &tok, &sm, prompt ? prompt : "", steps);
        if (logits_file && fclose(logits_file) != 0) die("%s: write failed", logits_path);
        free(sm.probindex);
        free(sm.seen);
        free_run_state(&tf.state);
    }
    free_tokenizer(&tok);
    free_transformer(&tf);
    free(default_path);
    return 0;
}
#endif

// ----------------------------------------------------------------------------
// fast kernels and memory layouts
//
// What the code above calls (declared at its top): the weights in 2 MB pages, the int8 layout,
// quantize, matmul's tiles and their float32 and int8 kernels, and attention's kernels. GCC
// and Clang vector types keep the code portable; x86 intrinsics are used only where
// the compiler targets AVX-512 VNNI. test_all.py checks that a token gets the same bits alone
// or in a block of any size, with one thread or two, and the same text from the plain build.

#define ALWAYS_INLINE static inline __attribute__((always_inline))

// --- the weights in memory

// The weights are read into memory in 2 MB pages where the OS offers them (Linux's
// transparent huge pages), rather than mapped from the file in 4 KB pages: a token reads
// every weight once, and at each 4 KB page the TLB misses and the hardware prefetcher stops
// (BENCHMARKS.md has the gain). The price is at start: up to ~1 s when
// the kernel first compacts memory for 2 MB pages. Only the weights are read (not the header)
// so that they start on a page: behind version 0's 28-byte header every row would begin 28
// bytes into a cache line, and each 64-byte load would touch two lines.
static void *read_weights(int fd, const char *path, uint64_t offset, uint64_t size) {
    size_t huge = (size_t)2 << 20, cap = size < huge ? size : (size + huge - 1) / huge * huge;
    void *p = NULL;
    if (posix_memalign(&p, size < huge ? 64 : huge, cap) != 0)
        die("%s: out of memory reading %llu bytes of weights", path, (unsigned long long)size);
#ifdef MADV_HUGEPAGE
    if (size >= huge) madvise(p, cap, MADV_HUGEPAGE); // a hint: where it is refused, 4 KB pages
#endif
    for (uint64_t got = 0; got < size;) {
        uint64_t left = size - got;
        size_t chunk = left < (1u << 30) ? left : (1u << 30);
        ssize_t r = pread(fd, (char *)p + got, chunk, (off_t)(offset + got));
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0)
            die("%s: read failed after %llu of the %llu bytes of weights: %s", path,
                (unsigned long long)got, (unsigned long long)size,
                r < 0 ? strerror(errno) : "the file got shorter");
        got += (uint64_t)r;
    }
    return p;
}

// --- int8 rows in the order of a lane-wise dot product
//
// The int8 kernel multiplies 32 pairs of bytes and adds them in fours into 8 int32 lanes (one
// vpdpbusd with AVX-512 VNNI, a few shifts and multiplies elsewhere). In the file's order a
// group of 32 values fills all 8 lanes, which must then be summed (or scaled lane by lane)
// before the next group: more instructions than the products themselves. So a row's groups
// are taken 8 at a time, and 8 packed groups hold values 4k..4k+3 of each of its groups in
// turn: then 32 bytes are 4 values of 8 groups, and each lane sums one group. The last
// ng % 8 groups of a row stay in the file's order, and so do rows of group sizes that are no
// multiple of 32. The weights are rearranged once at load (pack_int8), the activations as
// they are quantized.
//
// Decoding reads several rows at a time too (x once for them), and for that the rows are also
// interleaved in fours, 32 bytes of each in turn (a slab of 4 rows), so that memory is still
// read in one stream: 4 rows read side by side from 4 places are slower from DRAM.
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#include <immintrin.h>
#define HAVE_VNNI 1
#else
#define HAVE_VNNI 0
#endif
#define Q8_PACKED(gs) ((gs) % 32 == 0)

// where value k of group g of row r lies, from the start of its slab of `slab` rows (1 or
// 4), for rows of ng groups of gs values
static inline size_t q8_at(int g, int k, int r, int ng, int gs, int slab) {
    size_t p = g >= ng / 8 * 8 ? (size_t)g * gs + k // the rest: the file's order
                               : (size_t)(g / 8 * 8) * gs + (size_t)(k / 4) * 32 + g % 8 * 4
                                 + k % 4;
    return (p / 32 * slab + r) * 32 + p % 32;
}

// rearrange the int8 matrix m into the packed order, in place, in slabs of `slab` rows
static void pack_matrix(Matrix *m, int slab) {
    int n = m->cols, gs = m->group_size;
    int8_t *rows = (int8_t *)m->q, *tmp = xalloc((size_t)slab * n); // our own copy (read_weights)
    for (int r0 = 0; r0 < m->rows; r0 += slab, rows += (size_t)slab * n) {
        memcpy(tmp, rows, (size_t)slab * n);
        for (int r = 0; r < slab; r++)
            for (int g = 0; g < n / gs; g++)
                for (int k = 0; k < gs; k += 4)
                    memcpy(rows + q8_at(g, k, r, n / gs, gs, slab),
                           tmp + (size_t)r * n + (size_t)g * gs + k, 4);
    }
    m->slab = slab;
    free(tmp);
}

static void pack_int8(Transformer *tf) {
    const Config *c = &tf->config;
    int gs = tf->group_size;
    if (!gs || !Q8_PACKED(gs)) return;
    int kv_dim = c->dim * c->n_kv_heads / c->n_heads;
    int slab = kv_dim % 4 || c->hidden_dim % 4 || c->vocab_size % 4 ? 1 : 4; // (dim % 4 == 0)
    int shared = tf->wcls.q == tf->token_embedding.q;
    pack_matrix(&tf->token_embedding, slab);
    for (int l = 0; l < c->n_layers; l++) {
        Layer *y = &tf->layers[l];
        Matrix *ms[] = {&y->wq, &y->wk, &y->wv, &y->wo};
        for (int i = 0; i < 4; i++) pack_matrix(ms[i], slab);
        FFN *ffns = y->experts ? y->experts : &y->ffn; // a mixture's experts, or the one
        for (int e = 0; e < (y->experts ? c->n_experts : 1); e++) {
            pack_matrix(&ffns[e].w1, slab);
            pack_matrix(&ffns[e].w2, slab);
            pack_matrix(&ffns[e].w3, slab);
        }
    }
    if (shared) tf->wcls = tf->token_embedding;
    else pack_matrix(&tf->wcls, slab);
}

static void dequantize_row(float *x, const Matrix *m, int row) {
    int n = m->cols, gs = m->group_size, slab = m->slab, r = row % slab;
    const int8_t *q = m->q + (size_t)(row - r) * n; // the row's slab
    const float *scale = m->scale + (size_t)row * n / gs;
    for (int g = 0; g < n / gs; g++)
        for (int k = 0; k < gs; k++)
            x[g * gs + k] = q[Q8_PACKED(gs) ? q8_at(g, k, r, n / gs, gs, slab) : (size_t)g * gs + k]
                          * scale[g];
}

// Q8_0 quantization of activations, as runq.c does: symmetric, per group, max |x| -> 127,
// written in the weights' order. Also the sum of each group's int8 values, which the VNNI
// dot product needs.
static void quantize(int8_t *xq, float *xq_scale, int32_t *xq_sum, const float *x, int n, int gs) {
    for (int g = 0; g < n / gs; g++) {
        const float *xg = x + (size_t)g * gs;
        float wmax = 0.0f;
        for (int i = 0; i < gs; i++) wmax = fmaxf(wmax, fabsf(xg[i]));
        float scale = wmax / 127.0f;
        xq_scale[g] = scale;
        int32_t sum = 0;
        for (int i0 = 0; i0 < gs; i0 += 32) { // 32 values at a time (fewer where gs is not 32k)
            int m = gs - i0 < 32 ? gs - i0 : 32;
            int8_t v[32];
            for (int i = 0; i < m; i++) { // NaN or inf (a broken model) becomes 0: casting it is UB
                float f = scale == 0.0f ? 0.0f : roundf(xg[i0 + i] / scale);
                v[i] = fabsf(f) <= 127.0f ? (int8_t)f : 0;
                sum += v[i];
            }
            if (Q8_PACKED(gs)) // (then m = 32) 4 values at a time to their places
                for (int i = 0; i < 32; i += 4)
                    memcpy(xq + q8_at(g, i0 + i, 0, n / gs, gs, 1), v + i, 4);
            else memcpy(xq + (size_t)g * gs + i0, v, m);
        }
        xq_sum[g] = sum;
    }
}

// --- the machine's vectors
//
// The kernels use GCC/Clang vector types, which the compiler maps onto the registers of the
// target it builds for. A vector wider than those registers is split through the stack: a
// 16-float vector on AVX2 is stored and reloaded at every step of a loop.
// So the width follows the target's own macros: VW = 16 floats with AVX-512, 8 with AVX, 4
// otherwise (SSE2 on x86-64, NEON on aarch64); and the number of vectors a kernel keeps live
// follows the register count, REGS: 32 with AVX-512 and on aarch64, 16 otherwise.
#if defined(__AVX512F__)
#define VW 16
#elif defined(__AVX__)
#define VW 8
#else
#define VW 4
#endif
#if defined(__AVX512F__) || defined(__aarch64__)
#define REGS 32
#else
#define REGS 16
#endif
typedef float fvec __attribute__((vector_size(4 * VW))); // VW floats (a GCC/Clang extension)
typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));
typedef float f32x2 __attribute__((vector_size(8)));

// float32: each (row, token) sum is kept in LANES = 16 partial sums, NV vectors of VW, added in
// a fixed order at the end (lane_sum, dot_tail): the compiler may then use vector registers
// without -ffast-math, and a token gets the same bits whether it comes alone or in a block, on
// every target (lane i adds the same products in the same order whatever VW is).
#define LANES 16
#define NV (LANES / VW)

// --- matmul's tiles
//
// A tile is NR rows of W (1 or TILE_R) times NT tokens of x (1 or TILE_T), constants at each
// call so that the compiler keeps the NR x NT sums in registers. A piece of a row is loaded
// once for the NT tokens, and a piece of x once for the NR rows: prefill reads x again for
// every row (from L2, 250 tokens x 768 floats), 4 rows x 4 tokens read it a quarter as often.
// The tile is as large as the registers hold its sums (one vector
// each with AVX-512, two with AVX, four otherwise) and the pieces loaded: 4 x 4 with AVX-512,
// 2 x 2 with AVX, 2 x 1 with SSE2 and NEON. Decoding keeps 1 row for float32: interleaved
// weight streams are slower there.
#if NV == 1
#define TILE_R 4
#define TILE_T 4
#elif NV == 2
#define TILE_R 2
#define TILE_T 2
#else
#define TILE_R 2
#define TILE_T 1
#endif

typedef struct {
    int n, ng;                  // values and int8 groups per row
    const float *w_f32[4];      // float32: row r
    const float *x;             // float32: (NT, n) the tokens
    const int8_t *w_int8[4];    // int8: row r's first 32-byte piece
    const float *w_scale[4];    // int8: row r's group scales
    size_t pitch;               // int8: bytes from one 32-byte piece of a row to the next
    const int8_t *xq;           // int8: (NT, n) the tokens, quantized
    const float *xq_scale;      // (NT, ng)
    const int32_t *xq_sum;      // (NT, ng)
} Tile;

// the 16 partial sums a[0 .. NV) added in one order: lanes i and i + 8, then i and i + 4, and
// so on. Across vectors these are vector adds, within one, adds of its shuffled halves (lane
// by lane: -Ofast has nothing to reorder, so that every inlined copy gives the same bits).
ALWAYS_INLINE float lane_sum(const fvec *a) {
#if VW == 16
    f32x8 h = __builtin_shufflevector(a[0], a[0], 0, 1, 2, 3, 4, 5, 6, 7) +
              __builtin_shufflevector(a[0], a[0], 8, 9, 10, 11, 12, 13, 14, 15);
    f32x4 q = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
#elif VW == 8
    f32x8 h = a[0] + a[1];
    f32x4 q = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
#else
    f32x8 h = __builtin_shufflevector(a[0], a[1], 0, 1, 2, 3, 4, 5, 6, 7) +
              __builtin_shufflevector(a[2], a[3], 0, 1, 2, 3, 4, 5, 6, 7);
    f32x4 q = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
#endif
    f32x2 p = __builtin_shufflevector(q, q, 0, 1) + __builtin_shufflevector(q, q, 2, 3);
    return p[0] + p[1];
}

// w . x over the last n % 16 values of a row (not inlined: one order for every caller)
static __attribute__((noinline)) float dot_tail(const float *w, const float *x, int left) {
    float sum = 0.0f;
    for (int k = 0; k < left; k++) sum += w[k] * x[k];
    return sum;
}

// w (NR, n) . x (NT, n) -> out (NR, NT), float32
ALWAYS_INLINE void dot_f32(float *out, const float *const *w, const float *x, int n, int NR,
                           int NT) {
    fvec a[TILE_R][TILE_T][NV] = {{{{0}}}}; // a[r][t]: the partial sums of row r, token t
    int j = 0;
    for (; j + LANES <= n; j += LANES)
        for (int v = 0; v < NV; v++) { // values j + v VW .. j + v VW + VW - 1
            fvec xv[TILE_T], wv;
            for (int t = 0; t < NT; t++)
                memcpy(&xv[t], x + (size_t)t * n + j + v * VW, sizeof xv[t]);
            for (int r = 0; r < NR; r++) {
                memcpy(&wv, w[r] + j + v * VW, sizeof wv);
                for (int t = 0; t < NT; t++) a[r][t][v] += wv * xv[t];
            }
        }
    for (int r = 0; r < NR; r++)
        for (int t = 0; t < NT; t++)
            out[r * NT + t] = lane_sum(a[r][t])
                            + (j < n ? dot_tail(w[r] + j, x + (size_t)t * n + j, n - j) : 0.0f);
}

// --- int8 kernels
//
// The int8 vectors are IB bytes (32 with AVX, else 16) seen as int16 or int32 lanes; a
// 32-byte piece of packed rows is QH of them.
#define IB (VW >= 8 ? 32 : 16)
#define QH (32 / IB)
typedef int16_t i16v __attribute__((vector_size(IB)));
typedef uint16_t u16v __attribute__((vector_size(IB)));
typedef int32_t i32v __attribute__((vector_size(IB)));
typedef uint32_t u32v __attribute__((vector_size(IB)));
typedef float f32q __attribute__((vector_size(IB))); // a float for each int32 lane

#if HAVE_VNNI
// acc + the products of w and x in fours, one int32 lane per four: vpdpbusd, whose first
// operand is unsigned. w + 128 is w with its top bit flipped, read as unsigned, and
// sum((w + 128) x) = sum(w x) + 128 sum(x), so Q8_BIAS sum(x) is taken off later. 256-bit
// vectors: Zen 4 splits a 512-bit one in two anyway.
#define Q8_BIAS 128
ALWAYS_INLINE i32v dot4(i32v acc, i16v w, i16v x) {
    return (i32v)_mm256_dpbusd_epi32((__m256i)acc, (__m256i)w ^ _mm256_set1_epi8((char)0x80),
                                     (__m256i)x);
}
#else
// The same in portable vector code: int16 lanes that hold two values each, the low byte
// (sign-extended) and the high byte. A product of two int8 values fits in int16
// (|w x| <= 128 * 127), and so does the sum of two; then the two int16 halves of each int32
// lane are added. Shifts, not conversions: some targets' compilers split a widening
// conversion into 128-bit pieces.
#define Q8_BIAS 0
// the low half of each lane, sign-extended (shifted left as unsigned: no overflow)
ALWAYS_INLINE i16v low8(i16v v) { return (i16v)((u16v)v << 8) >> 8; }
ALWAYS_INLINE i32v low16(i32v v) { return (i32v)((u32v)v << 16) >> 16; }
ALWAYS_INLINE i32v dot4(i32v acc, i16v w, i16v x) {
    i32v p = (i32v)(low8(w) * low8(x) + (w >> 8) * (x >> 8));
    return acc + low16(p) + (p >> 16);
}
#endif

// a b + c lane by lane. The int8 kernels' products have three factors (an integer sum, a
// weight scale, an activation scale), which -ffast-math would order and fuse differently in
// each inlined copy: a token would get other bits alone than in a block. So -ffast-math
// builds that have FMA take fmaf, which the compiler turns into the vector instruction and
// cannot reorder; others compute a b + c as written (unfused: the plain build's bits are the
// same on x86-64 and aarch64). (An -ffast-math build without FMA, make runfast on x86-64, may
// still differ in the last bits.)
ALWAYS_INLINE f32q fma_lanes(f32q a, f32q b, f32q c) {
#if HAVE_VNNI // (the compiler's own vectorizing of the lanes below would use 512-bit registers)
    return (f32q)_mm256_fmadd_ps(a, b, c);
#elif defined(__FAST_MATH__) && (defined(__FMA__) || defined(__aarch64__))
    for (int i = 0; i < IB / 4; i++) c[i] = __builtin_fmaf(a[i], b[i], c[i]);
    return c;
#else
    return a * b + c;
#endif
}

// isum[r][t] += piece p (32 bytes) of row r . the 32 bytes of token t at xp + t n, lane by lane
ALWAYS_INLINE void q8_piece(i32v (*isum)[4][QH], const Tile *b, size_t p, const int8_t *xp,
                            size_t n, int NR, int NT) {
    for (int h = 0; h < QH; h++) {
        i16v w[4];
        for (int r = 0; r < NR; r++) memcpy(&w[r], b->w_int8[r] + p * b->pitch + h * IB, IB);
        for (int t = 0; t < NT; t++) {
            i16v x;
            memcpy(&x, xp + t * n + h * IB, IB);
            for (int r = 0; r < NR; r++) isum[r][t][h] = dot4(isum[r][t][h], w[r], x);
        }
    }
}

// The 8 packed groups g .. g + 7 of the tile: acc[r][t] lane i +=
// (w_r . x_t over group g + i) * w_scale[r][g + i] * xq_scale[t][g + i].
ALWAYS_INLINE void q8_packed8(f32q (*acc)[4][QH], const Tile *b, int g, int gs, int NR, int NT) {
    int ng = b->ng;
    size_t n = (size_t)ng * gs, at = (size_t)g * gs;
    i32v isum[4][4][QH] = {{{{0}}}};
#pragma GCC unroll 4 // (all gs / 4 of them at once, the compiler runs out of registers)
    for (int k = 0; k < gs / 4; k++) // values 4k..4k+3 of each group
        q8_piece(isum, b, at / 32 + k, b->xq + at + 32 * k, n, NR, NT);
    for (int t = 0; t < NT; t++)
        for (int h = 0; h < QH; h++) {
            int at_g = g + h * IB / 4; // the first group of these lanes
            i32v sum;
            f32q xs, ws;
            memcpy(&sum, b->xq_sum + t * ng + at_g, IB);
            memcpy(&xs, b->xq_scale + t * ng + at_g, IB);
            for (int r = 0; r < NR; r++) {
                memcpy(&ws, b->w_scale[r] + at_g, IB);
                i32v dot = isum[r][t][h] - Q8_BIAS * sum;
                acc[r][t][h] = fma_lanes(__builtin_convertvector(dot, f32q), ws * xs, acc[r][t][h]);
            }
        }
}

// One group g in the file's order (the last ng % 8 of a row): its sum is spread over the 8
// lanes, each lane scaled by w_scale[r][g] * xq_scale[t][g].
ALWAYS_INLINE void q8_group(f32q (*acc)[4][QH], const Tile *b, int g, int gs, int NR, int NT) {
    int ng = b->ng;
    size_t n = (size_t)ng * gs, at = (size_t)g * gs;
    i32v isum[4][4][QH] = {{{{0}}}};
    for (int k = 0; k < gs; k += 32) q8_piece(isum, b, (at + k) / 32, b->xq + at + k, n, NR, NT);
    for (int r = 0; r < NR; r++)
        for (int t = 0; t < NT; t++) {
            isum[r][t][0][0] -= Q8_BIAS * b->xq_sum[t * ng + g];
            f32q scale = (f32q){0} + b->w_scale[r][g] * b->xq_scale[t * ng + g];
            for (int h = 0; h < QH; h++)
                acc[r][t][h] = fma_lanes(__builtin_convertvector(isum[r][t][h], f32q), scale,
                                         acc[r][t][h]);
        }
}

// the 8 lanes of a packed row's sums added in one order: i and i + 4, then i and i + 2, then
// the two left
ALWAYS_INLINE float lane8_sum(const f32q *a) {
#if QH == 1
    f32x4 h = __builtin_shufflevector(a[0], a[0], 0, 1, 2, 3) +
              __builtin_shufflevector(a[0], a[0], 4, 5, 6, 7);
#else
    f32x4 h = a[0] + a[1];
#endif
    f32x2 p = __builtin_shufflevector(h, h, 0, 1) + __builtin_shufflevector(h, h, 2, 3);
    return p[0] + p[1];
}

// w . x for one row and one token in the file's order (group sizes that are no multiple of 32):
// per group an exact integer dot product, scaled by the weight's and the activation's scale,
// added in group order. Not inlined: one copy of its code, so that a token gets the same float
// operations (in the same order, even with -ffast-math) alone or in a block.
static __attribute__((noinline)) float q8_row(const int8_t *w, const float *w_scale,
                                              const int8_t *x, const float *x_scale, int ng,
                                              int gs) {
    float val = 0.0f;
    for (int g = 0; g < ng; g++) {
        int32_t isum = 0;
        for (int k = 0; k < gs; k++) isum += w[(size_t)g * gs + k] * x[(size_t)g * gs + k];
        val += (float)isum * w_scale[g] * x_scale[g];
    }
    return val;
}

// w (NR, n) . x (NT, n) -> out (NR, NT) for int8 weights and activations: an exact integer
// dot product per group, scaled by the weight's and the activation's scale
ALWAYS_INLINE void dot_q8(float *out, const Tile *b, int gs, int NR, int NT) {
    int ng = b->ng, n = ng * gs;
    if (Q8_PACKED(gs)) { // packed rows: 8 groups at a time, each in its own lane (q8_packed8)
        f32q acc[4][4][QH] = {{{{0}}}};
        int g = 0;
        for (; g + 8 <= ng; g += 8) q8_packed8(acc, b, g, gs, NR, NT);
        for (; g < ng; g++) q8_group(acc, b, g, gs, NR, NT);
        for (int r = 0; r < NR; r++)
            for (int t = 0; t < NT; t++) out[r * NT + t] = lane8_sum(acc[r][t]);
        return;
    }
    for (int r = 0; r < NR; r++) // the file's order
        for (int t = 0; t < NT; t++)
            out[r * NT + t] = q8_row(b->w_int8[r], b->w_scale[r], b->xq + (size_t)t * n,
                                     b->xq_scale + t * ng, ng, gs);
}

// One tile -> o (NR, NT). For int8 the group sizes 32 and 64 (the exporters' choices) as
// constants too, so that the compiler unrolls each group.
ALWAYS_INLINE void dot_q8_sized(float *o, const Tile *b, int gs, int NR, int NT) {
    if (gs == 32) dot_q8(o, b, 32, NR, NT);
    else if (gs == 64) dot_q8(o, b, 64, NR, NT);
    else dot_q8(o, b, gs, NR, NT);
}

ALWAYS_INLINE void dot_tile(float *o, const Tile *b, int gs, int NR, int NT) {
    if (!gs) dot_f32(o, b->w_f32, b->x, b->n, NR, NT);
    else dot_q8_sized(o, b, gs, NR, NT);
}

// Prefill's shapes are faster inlined into matmul's loop, but their int8 code in functions of
// its own: beside it, the compiler gives the float32 loop too few registers (it reloads its
// operands from memory instead).
static __attribute__((noinline)) void q8_tile_RxT(float *o, const Tile *b, int gs) {
    dot_q8_sized(o, b, gs, TILE_R, TILE_T);
}
static __attribute__((noinline)) void q8_tile_1xT(float *o, const Tile *b, int gs) {
    dot_q8_sized(o, b, gs, 1, TILE_T);
}
ALWAYS_INLINE void tile_RxT(float *o, const Tile *b, int gs) {
    if (gs) q8_tile_RxT(o, b, gs);
    else dot_f32(o, b->w_f32, b->x, b->n, TILE_R, TILE_T);
}
ALWAYS_INLINE void tile_1xT(float *o, const Tile *b, int gs) {
    if (gs) q8_tile_1xT(o, b, gs);
    else dot_f32(o, b->w_f32, b->x, b->n, 1, TILE_T);
}

// Decoding's tile shapes in functions of their own: inlined into matmul's loop beside the
// prefill shapes, the compiler runs out of registers for some of their sums and keeps those on
// the stack (test_all.py disassembles these two).
static __attribute__((noinline)) void tile_Rx1(float *o, const Tile *b, int gs) {
    dot_tile(o, b, gs, TILE_R, 1);
}
static __attribute__((noinline)) void tile_1x1(float *o, const Tile *b, int gs) {
    dot_tile(o, b, gs, 1, 1);
}

// row i of matrix m as row r of the tile
ALWAYS_INLINE void tile_row(Tile *b, int r, const Matrix *m, int i) {
    if (m->group_size) {
        int k = i & (m->slab - 1); // its place in its slab (1 or 4 rows: no division)
        b->w_int8[r] = m->q + (size_t)(i - k) * b->n + k * 32;
        b->w_scale[r] = m->scale + (size_t)i * b->ng;
    } else {
        b->w_f32[r] = m->w + (size_t)i * b->n;
    }
}

// tokens t, t + 1, ... of x (float32) or of its quantized copy in s (int8) as the tile's
ALWAYS_INLINE void tile_tokens(Tile *b, const float *x, const RunState *s, int t, int gs) {
    if (gs) {
        b->xq = s->xq + (size_t)t * b->n;
        b->xq_scale = s->xq_scale + t * b->ng;
        b->xq_sum = s->xq_sum + t * b->ng;
    } else {
        b->x = x + (size_t)t * b->n;
    }
}

// matmul (see there): the rows of each matrix in bands of R, each band read from memory once
// and then kept in the L1 cache for all T tokens, TILE_T tokens at a time while there are as
// many. The bands are shared among the threads.
static void matmul_tiles(float *out, const float *x, int T, const Matrix *mats, int n_mats,
                         const RunState *s) {
    int n = mats[0].cols, gs = mats[0].group_size, d = 0, ng = gs ? n / gs : 0;
    for (int m = 0; m < n_mats; m++) d += mats[m].rows;
    // rows per band: TILE_R for prefill, and for int8 rows in slabs of 4 (pack_int8) also when
    // decoding (the slab's 4 rows come from memory as one stream)
    int slab = mats[0].slab; // the same for every matrix
    int R = (T > 1 && T >= TILE_T) || slab == 4 ? TILE_R : 1;
    OMP(omp parallel)
    {
    Tile b = {.n = n, .ng = ng, .pitch = (size_t)32 * slab}; // once per thread, not per band
    tile_tokens(&b, x, s, 0, gs);
    for (int m = 0, i0 = 0; m < n_mats; i0 += mats[m++].rows) { // i0: matrix m's first row in out
        int rows = mats[m].rows;
        OMP(omp for schedule(static) nowait)
        for (int band = 0; band < (rows + R - 1) / R; band++) {
            int nr = rows - band * R < R ? rows - band * R : R; // the last band: fewer rows
            for (int r = 0; r < R; r++) // a short band repeats its first row
                tile_row(&b, r, &mats[m], band * R + (r < nr ? r : 0));
            if (T == 1 && R == 1) { // decoding, a row at a time: its sum straight into out
                tile_1x1(out + i0 + band, &b, gs);
                continue;
            }
            for (int t = 0; t < T;) {
                float o[TILE_R * TILE_T];
                int nt = T - t >= TILE_T ? TILE_T : 1;
                tile_tokens(&b, x, s, t, gs);
                if (R > 1 && nt > 1) tile_RxT(o, &b, gs);
                else if (R > 1) tile_Rx1(o, &b, gs);
                else if (nt > 1) tile_1xT(o, &b, gs);
                else tile_1x1(o, &b, gs);
                float *ot = out + i0 + band * R; // this band's rows of out (T, d)
                for (int k = 0; k < nt; k++, t++)
                    for (int r = 0; r < nr; r++) ot[(size_t)t * d + r] = o[r * nt + k];
            }
        }
    }
    }
}

// --- attention's kernels
//
// att[0 .. 16 NC) = q . the keys of 16 NC positions, and out[0 .. 16 NC) = sum over
// positions t <= pos of att[t] v_t: NC (1 or WIDE, a constant at each call) pieces of 16 at
// once, NC NV vectors of VW, as that many independent sums. One alone waits on each FMA's
// latency (4 cycles) before the next; four keep the FMA units busy. Each lane's sum still runs
// over i (or t) in order, whatever the vectors. The sums and the pieces loaded stay in
// registers: WIDE is 4 with AVX-512, else 2; a vector type because gcc 12 turns the plain
// loops into scalar code.
#define WIDE (NV == 1 ? 4 : 2)
ALWAYS_INLINE void scores(float *att, const float *q, const float *keys, int head_size, int n_ctx,
                          int NC) {
    fvec a[WIDE * NV] = {0};
    for (int i = 0; i < head_size; i++)
        for (int j = 0; j < NC * NV; j++) {
            fvec k;
            memcpy(&k, keys + (size_t)i * n_ctx + VW * j, sizeof k);
            a[j] += q[i] * k;
        }
    memcpy(att, a, NC * NV * sizeof a[0]);
}

ALWAYS_INLINE void weigh_values(float *out, const float *att, const float *values, int pos,
                                int kv_dim, int NC) {
    fvec o[WIDE * NV] = {0};
    for (int t = 0; t <= pos; t++)
        for (int j = 0; j < NC * NV; j++) {
            fvec v;
            memcpy(&v, values + (size_t)t * kv_dim + VW * j, sizeof v);
            o[j] += att[t] * v;
        }
    memcpy(out, o, NC * NV * sizeof o[0]);
}

// the scores of 16 positions side by side (the keys are transposed), past pos too, up to the
// next 16: those are never used
static void attention_scores(float *att, const float *q, const HeadCache *kv, int pos) {
    int t0 = 0; // WIDE pieces while the last of them starts at or before pos (in n_ctx)
    int head_size = kv->head_size, n_ctx = kv->n_ctx;
    for (; t0 + 16 * (WIDE - 1) <= pos; t0 += 16 * WIDE)
        scores(att + t0, q, kv->keys + t0, head_size, n_ctx, WIDE);
    for (; t0 <= pos; t0 += 16) scores(att + t0, q, kv->keys + t0, head_size, n_ctx, 1);
}

static void attention_values(float *out, const float *att, const HeadCache *kv, int pos) {
    int i = 0;
    for (; i + 16 * WIDE <= kv->head_size; i += 16 * WIDE)
        weigh_values(out + i, att, kv->values + i, pos, kv->kv_dim, WIDE);
    for (; i + 16 <= kv->head_size; i += 16)
        weigh_values(out + i, att, kv->values + i, pos, kv->kv_dim, 1);
    for (; i < kv->head_size; i++) { // head sizes that are no multiple of 16
        float o = 0.0f;
        for (int t = 0; t <= pos; t++) o += att[t] * kv->values[(size_t)t * kv->kv_dim + i];
        out[i] = o;
    }
}
