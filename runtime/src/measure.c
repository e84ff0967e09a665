/*
 * MRENCLAVE of the enclave sconify lays out for (runtime ELF, executable ELF or none, settings).
 *
 * This is the C twin of sconify/enclave/{elf,layout,sgxs}.py; docs/enclave.md is the specification both
 * follow. SHA-256 runs over the ECREATE, EADD and EEXTEND records of every page in ascending offset order.
 */
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fail.h"
#include "measure.h"
#include "util.h"

#define PAGE 4096ULL
#define CHUNK 256
#define RECORD 64
#define REGION_ALIGN (2ULL << 20)
#define SSA_FRAME_SIZE 1
#define SSA_FRAMES 2
#define GUARD_PAGES 16
#define THREAD_FIXED_PAGES (1 + SSA_FRAMES * SSA_FRAME_SIZE + 1)
#define LAYOUT_VERSION 1
#define MIN_ENCLAVE_SIZE (2 * PAGE)
#define MAX_ENCLAVE_SIZE (1ULL << 47)
#define MAX_VADDR (1ULL << 47)

#define SECINFO_R 0x1
#define SECINFO_W 0x2
#define SECINFO_X 0x4
#define FLAGS_TCS (1u << 8)
#define FLAGS_REG (2u << 8)
#define FLAGS_SETTINGS (FLAGS_REG | SECINFO_R)
#define FLAGS_DATA (FLAGS_REG | SECINFO_R | SECINFO_W)

#define PT_LOAD 1
#define PT_PHDR 6
#define PF_X 1
#define PF_W 2
#define PF_R 4
#define EHDR_SIZE 64
#define PHDR_SIZE 56

struct segment {
    uint64_t vaddr;
    uint64_t memsz;
    uint32_t flags;
    const unsigned char *data;
    uint64_t filesz;
};

struct elf_image {
    uint64_t entry;
    struct segment *segments;
    size_t count;
    int has_phdr;
    uint64_t phdr_vaddr;
    uint32_t phnum;
    uint32_t phentsize;
    uint64_t first_page;
    uint64_t span;
};

static uint64_t align_up(uint64_t n, uint64_t alignment)
{
    return (n + alignment - 1) / alignment * alignment;
}

/* The checks and results of sconify.enclave.elf.read_elf. */
static int read_elf(const unsigned char *data, size_t len, const char *name, struct elf_image *img, char *err,
                    size_t errlen)
{
#define BAD(...)                                                                                     \
    do {                                                                                            \
        char why_[512];                                                                             \
        message(why_, sizeof why_, __VA_ARGS__);                                                    \
        message(err, errlen, "%s cannot be measured: %s; give an x86-64 ELF executable or shared object", \
                name, why_);                                                                        \
        free(img->segments);                                                                        \
        img->segments = NULL;                                                                       \
        return -1;                                                                                  \
    } while (0)

    memset(img, 0, sizeof *img);
    if (len < EHDR_SIZE || memcmp(data, "\177ELF", 4) != 0) BAD("it is not an ELF file");
    if (data[4] != 2) BAD("it is a 32-bit ELF file");
    if (data[5] != 1) BAD("it is a big-endian ELF file");
    uint16_t e_type = get_u16(data + 16), e_machine = get_u16(data + 18);
    uint64_t e_entry = get_u64(data + 24), e_phoff = get_u64(data + 32);
    uint16_t e_phentsize = get_u16(data + 54), e_phnum = get_u16(data + 56);
    if (e_machine != 62) BAD("it is built for machine type %u, not x86-64", e_machine);
    if (e_type != 2 && e_type != 3) BAD("it is neither an executable nor a shared object");
    if (e_phnum == 0xFFFF) BAD("it has more program headers than this reader supports");
    if (e_phnum == 0) BAD("it has no program headers");
    if (e_phentsize != PHDR_SIZE) BAD("its program headers are %u bytes, not %d", e_phentsize, PHDR_SIZE);
    uint64_t table = (uint64_t)e_phnum * e_phentsize;
    if (e_phoff > len || table > len - e_phoff) BAD("its program header table runs past the end of the file");

    img->segments = xcalloc(e_phnum, sizeof *img->segments);
    uint64_t *ranges = xcalloc(e_phnum, 3 * sizeof *ranges); /* (offset, filesz, vaddr) in file order */
    size_t nranges = 0;
    int explicit_phdr = 0;
    uint64_t explicit_vaddr = 0;
    for (unsigned i = 0; i < e_phnum; i++) {
        const unsigned char *ph = data + e_phoff + (uint64_t)i * e_phentsize;
        uint32_t p_type = get_u32(ph), p_flags = get_u32(ph + 4);
        uint64_t p_offset = get_u64(ph + 8), p_vaddr = get_u64(ph + 16);
        uint64_t p_filesz = get_u64(ph + 32), p_memsz = get_u64(ph + 40);
        if (p_type == PT_PHDR) {
            explicit_phdr = 1;
            explicit_vaddr = p_vaddr;
        }
        if (p_type != PT_LOAD || p_memsz == 0) continue;
        if (p_filesz > p_memsz) {
            free(ranges);
            BAD("loadable segment %u has more file bytes than memory bytes", i);
        }
        if (p_offset > len || p_filesz > len - p_offset) {
            free(ranges);
            BAD("loadable segment %u runs past the end of the file", i);
        }
        if (p_vaddr > MAX_VADDR || p_memsz > MAX_VADDR - p_vaddr) {
            free(ranges);
            BAD("loadable segment %u lies outside the x86-64 user address space", i);
        }
        struct segment *s = &img->segments[img->count++];
        s->vaddr = p_vaddr;
        s->memsz = p_memsz;
        s->flags = p_flags & (PF_R | PF_W | PF_X);
        s->data = data + p_offset;
        s->filesz = p_filesz;
        ranges[3 * nranges] = p_offset;
        ranges[3 * nranges + 1] = p_filesz;
        ranges[3 * nranges + 2] = p_vaddr;
        nranges++;
    }
    if (img->count == 0) {
        free(ranges);
        BAD("it has no loadable segments");
    }
    /* An insertion sort is stable, like Python's: equal addresses keep their file order. */
    struct segment *sorted = img->segments;
    for (size_t i = 1; i < img->count; i++) {
        struct segment key = sorted[i];
        size_t j = i;
        while (j > 0 && sorted[j - 1].vaddr > key.vaddr) {
            sorted[j] = sorted[j - 1];
            j--;
        }
        sorted[j] = key;
    }
    for (size_t i = 0; i + 1 < img->count; i++) {
        if (sorted[i + 1].vaddr < sorted[i].vaddr + sorted[i].memsz) {
            uint64_t lower = sorted[i].vaddr, upper = sorted[i + 1].vaddr;
            free(ranges);
            BAD("loadable segments at %#llx and %#llx overlap", (unsigned long long)lower,
                (unsigned long long)upper);
        }
    }
    int inside = 0;
    for (size_t i = 0; i < img->count; i++) {
        if (sorted[i].vaddr <= e_entry && e_entry < sorted[i].vaddr + sorted[i].memsz) inside = 1;
    }
    if (!inside) {
        free(ranges);
        BAD("its entry point %#llx is outside its loadable segments", (unsigned long long)e_entry);
    }
    img->entry = e_entry;
    img->phnum = e_phnum;
    img->phentsize = e_phentsize;
    if (explicit_phdr) {
        img->has_phdr = 1;
        img->phdr_vaddr = explicit_vaddr;
    } else {
        for (size_t i = 0; i < nranges; i++) {
            uint64_t offset = ranges[3 * i], filesz = ranges[3 * i + 1], vaddr = ranges[3 * i + 2];
            if (offset <= e_phoff && e_phoff + table <= offset + filesz) {
                img->has_phdr = 1;
                img->phdr_vaddr = vaddr + (e_phoff - offset);
                break;
            }
        }
    }
    free(ranges);
    img->first_page = sorted[0].vaddr & ~(PAGE - 1);
    uint64_t end = 0;
    for (size_t i = 0; i < img->count; i++) {
        if (sorted[i].vaddr + sorted[i].memsz > end) end = sorted[i].vaddr + sorted[i].memsz;
    }
    img->span = align_up(end - img->first_page, PAGE);
    return 0;
#undef BAD
}

/* -- the record stream ------------------------------------------------------------------------------ */

#define HASH_BUFFER (256 * 1024)
#define RUN_RECORDS 4096

struct stream {
    EVP_MD_CTX *ctx;
    unsigned char *buf;
    size_t len;
    unsigned char *run; /* RUN_RECORDS EADD records whose offsets are rewritten for each batch */
    uint32_t run_flags;
};

static void flush(struct stream *s)
{
    if (s->len && EVP_DigestUpdate(s->ctx, s->buf, s->len) != 1) fail(EXIT_INTERNAL, "SHA-256 failed");
    s->len = 0;
}

static void put(struct stream *s, const void *data, size_t n)
{
    if (s->len + n > HASH_BUFFER) flush(s);
    memcpy(s->buf + s->len, data, n);
    s->len += n;
}

static void ecreate(struct stream *s, uint32_t ssa_frame_size, uint64_t size)
{
    unsigned char r[RECORD] = "ECREATE";
    put_u32(r + 8, ssa_frame_size);
    put_u64(r + 12, size);
    put(s, r, RECORD);
}

static void eadd(struct stream *s, uint64_t offset, uint32_t flags)
{
    unsigned char r[RECORD] = "EADD";
    put_u64(r + 8, offset);
    put_u64(r + 16, flags);
    put(s, r, RECORD);
}

/* A measured page: its EADD, then the 16 EEXTEND records each followed by its 256 bytes. */
static void measured_page(struct stream *s, uint64_t offset, uint32_t flags, const unsigned char *page)
{
    eadd(s, offset, flags);
    for (int c = 0; c < (int)(PAGE / CHUNK); c++) {
        unsigned char r[RECORD] = "EEXTEND";
        put_u64(r + 8, offset + (uint64_t)c * CHUNK);
        put(s, r, RECORD);
        put(s, page + c * CHUNK, CHUNK);
    }
}

/* PAGES unmeasured pages from OFFSET: EADD records only (a heap or a stack). */
static void eadd_run(struct stream *s, uint64_t offset, uint64_t pages, uint32_t flags)
{
    if (pages < 64) {
        for (uint64_t i = 0; i < pages; i++) eadd(s, offset + i * PAGE, flags);
        return;
    }
    flush(s);
    if (s->run_flags != flags) {
        memset(s->run, 0, (size_t)RUN_RECORDS * RECORD);
        for (size_t i = 0; i < RUN_RECORDS; i++) {
            memcpy(s->run + i * RECORD, "EADD", 4);
            put_u64(s->run + i * RECORD + 16, flags);
        }
        s->run_flags = flags;
    }
    while (pages) {
        size_t n = pages < RUN_RECORDS ? (size_t)pages : RUN_RECORDS;
        for (size_t i = 0; i < n; i++) put_u64(s->run + i * RECORD + 8, offset + i * PAGE);
        if (EVP_DigestUpdate(s->ctx, s->run, n * RECORD) != 1) fail(EXIT_INTERNAL, "SHA-256 failed");
        offset += n * PAGE;
        pages -= n;
    }
}

static uint32_t secinfo_flags(uint32_t p_flags)
{
    uint32_t flags = FLAGS_REG;
    if (p_flags & (PF_R | PF_W)) flags |= SECINFO_R;
    if (p_flags & PF_W) flags |= SECINFO_W;
    if (p_flags & PF_X) flags |= SECINFO_X;
    return flags;
}

/*
 * The pages of an ELF image at enclave offset BASE: each segment's file bytes at their place, zeros
 * elsewhere; a page that several segments share holds all of them with the union of their flags.
 * Pages no segment touches are not added.
 */
static void image_pages(struct stream *s, const struct elf_image *img, uint64_t base)
{
    uint64_t pages = img->span / PAGE;
    unsigned char *content = xcalloc(1, (size_t)img->span);
    uint16_t *flags = xcalloc((size_t)pages, sizeof *flags); /* 0: not added; else 0x8000 | SECINFO flags */
    for (size_t i = 0; i < img->count; i++) {
        const struct segment *seg = &img->segments[i];
        uint64_t start = seg->vaddr - img->first_page;
        memcpy(content + start, seg->data, (size_t)seg->filesz);
        uint64_t first = start / PAGE, last = align_up(start + seg->memsz, PAGE) / PAGE;
        for (uint64_t p = first; p < last; p++) flags[p] |= (uint16_t)(0x8000 | secinfo_flags(seg->flags));
    }
    for (uint64_t p = 0; p < pages; p++) {
        if (flags[p]) measured_page(s, base + p * PAGE, flags[p] & 0x7fff, content + p * PAGE);
    }
    free(flags);
    free(content);
}

static uint64_t next_power_of_two(uint64_t n)
{
    uint64_t p = 2;
    while (p < n) p <<= 1;
    return p;
}

int measure_enclave(const unsigned char *runtime, size_t runtime_length, const char *runtime_name,
                    const unsigned char *executable, size_t executable_length, const char *executable_name,
                    const struct enclave_settings *settings, unsigned char mrenclave[MRENCLAVE_SIZE], char *err,
                    size_t errlen)
{
    struct elf_image rt, exe;
    memset(&exe, 0, sizeof exe);
    if (read_elf(runtime, runtime_length, runtime_name, &rt, err, errlen) < 0) return -1;
    if (executable && read_elf(executable, executable_length, executable_name, &exe, err, errlen) < 0) {
        free(rt.segments);
        return -1;
    }

    uint64_t runtime_base = align_up(PAGE, REGION_ALIGN);
    uint64_t cursor = align_up(runtime_base + rt.span, REGION_ALIGN);
    uint64_t runtime_entry = runtime_base + rt.entry - rt.first_page;
    uint64_t executable_base = 0, executable_entry = 0, executable_phdr = 0;
    if (executable) {
        executable_base = cursor;
        executable_entry = executable_base + exe.entry - exe.first_page;
        if (exe.has_phdr) executable_phdr = executable_base + exe.phdr_vaddr - exe.first_page;
        cursor = align_up(executable_base + exe.span, REGION_ALIGN);
    }
    uint64_t thread_base = cursor;
    uint64_t thread_block = (THREAD_FIXED_PAGES + GUARD_PAGES) * PAGE + settings->stack;
    uint64_t heap_base = align_up(thread_base + settings->threads * thread_block, REGION_ALIGN);
    uint64_t end = heap_base + settings->heap;
    uint64_t size = next_power_of_two(end);
    if (size < MIN_ENCLAVE_SIZE) size = MIN_ENCLAVE_SIZE;
    if (size > MAX_ENCLAVE_SIZE) {
        message(err, errlen,
                "the enclave would need %#llx bytes of address space, more than SGX supports; give a smaller "
                "heap, stack or thread count", (unsigned long long)size);
        free(rt.segments);
        free(exe.segments);
        return -1;
    }

    struct stream s = {0};
    s.ctx = EVP_MD_CTX_new();
    s.buf = xmalloc(HASH_BUFFER);
    s.run = xmalloc((size_t)RUN_RECORDS * RECORD);
    s.run_flags = 0;
    if (!s.ctx || EVP_DigestInit_ex(s.ctx, EVP_sha256(), NULL) != 1) fail(EXIT_INTERNAL, "SHA-256 is unavailable");

    ecreate(&s, SSA_FRAME_SIZE, size);

    unsigned char page[PAGE];
    memset(page, 0, sizeof page);
    memcpy(page, "SCNFYENC", 8);
    put_u32(page + 8, LAYOUT_VERSION);
    put_u32(page + 12, settings->debug ? 1 : 0);
    put_u64(page + 16, settings->heap);
    put_u64(page + 24, settings->stack);
    put_u32(page + 32, settings->threads);
    put_u32(page + 36, settings->dlopen);
    put_u64(page + 40, size);
    put_u64(page + 48, runtime_base);
    put_u64(page + 56, runtime_entry);
    put_u64(page + 64, executable_base);
    put_u64(page + 72, executable_entry);
    put_u64(page + 80, executable_phdr);
    put_u32(page + 88, executable ? exe.phnum : 0);
    put_u32(page + 92, executable ? exe.phentsize : 0);
    put_u64(page + 96, thread_base);
    put_u64(page + 104, thread_block);
    put_u64(page + 112, heap_base);
    measured_page(&s, 0, FLAGS_SETTINGS, page);

    image_pages(&s, &rt, runtime_base);
    if (executable) image_pages(&s, &exe, executable_base);

    static const unsigned char zeros[PAGE];
    for (uint32_t i = 0; i < settings->threads; i++) {
        uint64_t tcs = thread_base + i * thread_block;
        uint64_t ssa = tcs + PAGE;
        uint64_t tls = ssa + SSA_FRAMES * SSA_FRAME_SIZE * PAGE;
        uint64_t stack_low = tls + PAGE + GUARD_PAGES * PAGE;
        uint64_t stack_top = tcs + thread_block;
        memset(page, 0, sizeof page);
        put_u64(page + 8, settings->debug ? 1 : 0); /* FLAGS.DBGOPTIN */
        put_u64(page + 16, ssa);
        put_u32(page + 28, SSA_FRAMES);
        put_u64(page + 32, runtime_entry);
        put_u64(page + 48, tls);
        put_u64(page + 56, tls);
        put_u32(page + 64, 0xFFF);
        put_u32(page + 68, 0xFFF);
        measured_page(&s, tcs, FLAGS_TCS, page);
        for (int f = 0; f < SSA_FRAMES * SSA_FRAME_SIZE; f++) measured_page(&s, ssa + f * PAGE, FLAGS_DATA, zeros);
        memset(page, 0, sizeof page);
        put_u64(page, tls);
        put_u64(page + 8, i);
        put_u64(page + 16, stack_low);
        put_u64(page + 24, stack_top);
        put_u64(page + 32, tcs);
        put_u64(page + 40, ssa);
        measured_page(&s, tls, FLAGS_DATA, page);
        eadd_run(&s, stack_low, settings->stack / PAGE, FLAGS_DATA);
    }
    eadd_run(&s, heap_base, settings->heap / PAGE, FLAGS_DATA);
    flush(&s);

    unsigned int n = 0;
    if (EVP_DigestFinal_ex(s.ctx, mrenclave, &n) != 1 || n != MRENCLAVE_SIZE) fail(EXIT_INTERNAL, "SHA-256 failed");
    EVP_MD_CTX_free(s.ctx);
    free(s.buf);
    free(s.run);
    free(rt.segments);
    free(exe.segments);
    return 0;
}
