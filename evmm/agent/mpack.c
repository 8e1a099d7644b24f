/* msgpack decode and encode for evmm-agent; formats from the msgpack specification ("spec.md", Formats). */
#include "mpack.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- decoding -------------------------------------------------------------------------------------- */

struct dec {
	const uint8_t *p, *end;
	struct mp_value *pool; /* NULL on the first pass, which only validates and counts */
	size_t used;
	char *err;
	size_t errlen;
};

static int fail(struct dec *d, const char *what)
{
	snprintf(d->err, d->errlen, "%s", what);
	return -1;
}

static int need(struct dec *d, size_t n)
{
	if ((size_t)(d->end - d->p) < n)
		return fail(d, "truncated msgpack value");
	return 0;
}

static uint64_t be(const uint8_t *p, int n)
{
	uint64_t v = 0;
	for (int i = 0; i < n; i++)
		v = v << 8 | p[i];
	return v;
}

/* Reads an n-byte big-endian number after the type byte. */
static int number(struct dec *d, int n, uint64_t *out)
{
	if (need(d, n) < 0)
		return -1;
	*out = be(d->p, n);
	d->p += n;
	return 0;
}

static struct mp_value *take(struct dec *d, size_t n)
{
	struct mp_value *r = d->pool ? d->pool + d->used : NULL;
	d->used += n;
	return r;
}

static int value(struct dec *d, struct mp_value *out, int depth);

static int bytes(struct dec *d, struct mp_value *out, enum mp_type t, uint64_t n)
{
	if (need(d, n) < 0)
		return -1;
	out->type = t;
	out->len = (uint32_t)n;
	out->v.bytes = d->p;
	d->p += n;
	return 0;
}

static int container(struct dec *d, struct mp_value *out, enum mp_type t, uint64_t n, int depth)
{
	uint64_t values = t == MP_MAP ? 2 * n : n;
	if (depth >= MP_MAX_DEPTH)
		return fail(d, "msgpack value nested too deeply");
	/* Every value takes at least one byte: a count beyond the bytes left is a lie, refused before any
	 * allocation. */
	if (values > (uint64_t)(d->end - d->p))
		return fail(d, "msgpack array or map longer than its frame");
	out->type = t;
	out->len = (uint32_t)n;
	out->v.items = take(d, values);
	for (uint64_t i = 0; i < values; i++) {
		struct mp_value scratch;
		if (value(d, out->v.items ? &out->v.items[i] : &scratch, depth + 1) < 0)
			return -1;
	}
	return 0;
}

static int value(struct dec *d, struct mp_value *out, int depth)
{
	uint64_t n;
	if (need(d, 1) < 0)
		return -1;
	uint8_t t = *d->p++;
	memset(out, 0, sizeof *out);
	if (t <= 0x7f || t >= 0xe0) { /* positive and negative fixint */
		out->type = MP_INT;
		out->v.i = (int8_t)t;
		if (t <= 0x7f)
			out->v.i = t;
		return 0;
	}
	if (t >= 0x80 && t <= 0x8f)
		return container(d, out, MP_MAP, t & 0x0f, depth);
	if (t >= 0x90 && t <= 0x9f)
		return container(d, out, MP_ARRAY, t & 0x0f, depth);
	if (t >= 0xa0 && t <= 0xbf)
		return bytes(d, out, MP_STR, t & 0x1f);
	switch (t) {
	case 0xc0:
		out->type = MP_NIL;
		return 0;
	case 0xc2:
	case 0xc3:
		out->type = MP_BOOL;
		out->v.b = t == 0xc3;
		return 0;
	case 0xc4:
	case 0xc5:
	case 0xc6:
		if (number(d, 1 << (t - 0xc4), &n) < 0)
			return -1;
		return bytes(d, out, MP_BIN, n);
	case 0xd9:
	case 0xda:
	case 0xdb:
		if (number(d, 1 << (t - 0xd9), &n) < 0)
			return -1;
		return bytes(d, out, MP_STR, n);
	case 0xca: {
		uint32_t bits;
		float f;
		if (number(d, 4, &n) < 0)
			return -1;
		bits = (uint32_t)n;
		memcpy(&f, &bits, 4);
		out->type = MP_FLOAT;
		out->v.f = f;
		return 0;
	}
	case 0xcb:
		if (number(d, 8, &n) < 0)
			return -1;
		out->type = MP_FLOAT;
		memcpy(&out->v.f, &n, 8);
		return 0;
	case 0xcc:
	case 0xcd:
	case 0xce:
	case 0xcf:
		if (number(d, 1 << (t - 0xcc), &n) < 0)
			return -1;
		out->type = MP_INT;
		out->is_unsigned = n > INT64_MAX;
		if (out->is_unsigned)
			out->v.u = n;
		else
			out->v.i = (int64_t)n;
		return 0;
	case 0xd0:
	case 0xd1:
	case 0xd2:
	case 0xd3: {
		int width = 1 << (t - 0xd0);
		if (number(d, width, &n) < 0)
			return -1;
		out->type = MP_INT;
		out->v.i = width == 1 ? (int8_t)n : width == 2 ? (int16_t)n : width == 4 ? (int32_t)n : (int64_t)n;
		return 0;
	}
	case 0xdc:
	case 0xdd:
		if (number(d, t == 0xdc ? 2 : 4, &n) < 0)
			return -1;
		return container(d, out, MP_ARRAY, n, depth);
	case 0xde:
	case 0xdf:
		if (number(d, t == 0xde ? 2 : 4, &n) < 0)
			return -1;
		return container(d, out, MP_MAP, n, depth);
	case 0xc7:
	case 0xc8:
	case 0xc9:
	case 0xd4:
	case 0xd5:
	case 0xd6:
	case 0xd7:
	case 0xd8:
		return fail(d, "msgpack extension types are not accepted");
	default: /* 0xc1: never used */
		return fail(d, "invalid msgpack type byte 0xc1");
	}
}

int mp_decode(const uint8_t *data, size_t len, struct mp_tree *tree, char *err, size_t errlen)
{
	struct dec d = {.p = data, .end = data + len, .err = err, .errlen = errlen};
	struct mp_value root;
	tree->nodes = NULL;
	tree->count = 0;
	if (value(&d, &root, 0) < 0)
		return -1;
	if (d.p != d.end)
		return fail(&d, "frame holds more than one msgpack value");
	/* Second pass: the first proved the input well formed and counted its values. */
	tree->count = d.used + 1;
	tree->nodes = calloc(tree->count, sizeof *tree->nodes);
	if (tree->nodes == NULL)
		return fail(&d, "out of memory");
	d.p = data;
	d.pool = tree->nodes;
	d.used = 1;
	return value(&d, &tree->nodes[0], 0);
}

void mp_tree_free(struct mp_tree *tree)
{
	free(tree->nodes);
	tree->nodes = NULL;
	tree->count = 0;
}

bool mp_str_is(const struct mp_value *v, const char *s)
{
	size_t n = strlen(s);
	return v != NULL && v->type == MP_STR && v->len == n && memcmp(v->v.bytes, s, n) == 0;
}

const struct mp_value *mp_map_get(const struct mp_value *m, const char *key)
{
	if (m == NULL || m->type != MP_MAP)
		return NULL;
	for (uint32_t i = 0; i < m->len; i++)
		if (mp_str_is(&m->v.items[2 * i], key))
			return &m->v.items[2 * i + 1];
	return NULL;
}

/* ---- encoding -------------------------------------------------------------------------------------- */

void buf_reserve(struct buf *b, size_t more)
{
	if (b->cap - b->len >= more)
		return;
	size_t cap = b->cap ? b->cap : 256;
	while (cap - b->len < more)
		cap *= 2;
	uint8_t *p = realloc(b->data, cap);
	if (p == NULL) {
		/* The agent cannot answer without memory; init respawns it. */
		fputs("evmm-agent: out of memory\n", stderr);
		abort();
	}
	b->data = p;
	b->cap = cap;
}

void buf_append(struct buf *b, const void *data, size_t len)
{
	buf_reserve(b, len);
	if (len)
		memcpy(b->data + b->len, data, len);
	b->len += len;
}

void buf_free(struct buf *b)
{
	free(b->data);
	b->data = NULL;
	b->len = b->cap = 0;
}

static void put_be(struct buf *b, uint8_t type, uint64_t v, int n)
{
	uint8_t out[9];
	out[0] = type;
	for (int i = 0; i < n; i++)
		out[1 + i] = (uint8_t)(v >> (8 * (n - 1 - i)));
	buf_append(b, out, 1 + n);
}

void mp_put_nil(struct buf *b)
{
	buf_append(b, "\xc0", 1);
}

void mp_put_bool(struct buf *b, bool v)
{
	buf_append(b, v ? "\xc3" : "\xc2", 1);
}

void mp_put_uint(struct buf *b, uint64_t v)
{
	if (v <= 0x7f)
		put_be(b, (uint8_t)v, 0, 0);
	else if (v <= 0xff)
		put_be(b, 0xcc, v, 1);
	else if (v <= 0xffff)
		put_be(b, 0xcd, v, 2);
	else if (v <= 0xffffffff)
		put_be(b, 0xce, v, 4);
	else
		put_be(b, 0xcf, v, 8);
}

void mp_put_int(struct buf *b, int64_t v)
{
	if (v >= 0)
		mp_put_uint(b, (uint64_t)v);
	else if (v >= -32)
		put_be(b, (uint8_t)v, 0, 0);
	else if (v >= INT8_MIN)
		put_be(b, 0xd0, (uint64_t)v, 1);
	else if (v >= INT16_MIN)
		put_be(b, 0xd1, (uint64_t)v, 2);
	else if (v >= INT32_MIN)
		put_be(b, 0xd2, (uint64_t)v, 4);
	else
		put_be(b, 0xd3, (uint64_t)v, 8);
}

void mp_put_double(struct buf *b, double v)
{
	uint64_t bits;
	memcpy(&bits, &v, 8);
	put_be(b, 0xcb, bits, 8);
}

static void put_header(struct buf *b, uint8_t fix, uint8_t fixmax, uint8_t t8, uint8_t t16, uint8_t t32, size_t n)
{
	if (n <= fixmax)
		put_be(b, (uint8_t)(fix | n), 0, 0);
	else if (t8 && n <= 0xff)
		put_be(b, t8, n, 1);
	else if (n <= 0xffff)
		put_be(b, t16, n, 2);
	else
		put_be(b, t32, n, 4);
}

void mp_put_str(struct buf *b, const void *s, size_t len)
{
	put_header(b, 0xa0, 31, 0xd9, 0xda, 0xdb, len);
	buf_append(b, s, len);
}

void mp_put_cstr(struct buf *b, const char *s)
{
	mp_put_str(b, s, strlen(s));
}

void mp_put_bin(struct buf *b, const void *data, size_t len)
{
	if (len <= 0xff)
		put_be(b, 0xc4, len, 1);
	else if (len <= 0xffff)
		put_be(b, 0xc5, len, 2);
	else
		put_be(b, 0xc6, len, 4);
	buf_append(b, data, len);
}

void mp_put_array(struct buf *b, uint32_t n)
{
	put_header(b, 0x90, 15, 0, 0xdc, 0xdd, n);
}

void mp_put_map(struct buf *b, uint32_t n)
{
	put_header(b, 0x80, 15, 0, 0xde, 0xdf, n);
}

void mp_put_value(struct buf *b, const struct mp_value *v)
{
	switch (v->type) {
	case MP_NIL:
		mp_put_nil(b);
		break;
	case MP_BOOL:
		mp_put_bool(b, v->v.b);
		break;
	case MP_INT:
		if (v->is_unsigned)
			mp_put_uint(b, v->v.u);
		else
			mp_put_int(b, v->v.i);
		break;
	case MP_FLOAT:
		mp_put_double(b, v->v.f);
		break;
	case MP_STR:
		mp_put_str(b, v->v.bytes, v->len);
		break;
	case MP_BIN:
		mp_put_bin(b, v->v.bytes, v->len);
		break;
	case MP_ARRAY:
	case MP_MAP:
		if (v->type == MP_ARRAY)
			mp_put_array(b, v->len);
		else
			mp_put_map(b, v->len);
		for (uint32_t i = 0; i < (v->type == MP_MAP ? 2 * v->len : v->len); i++)
			mp_put_value(b, &v->v.items[i]);
		break;
	}
}

/* UTF-8 as RFC 3629 defines it: no overlong forms, no surrogates, nothing above U+10FFFF. */
bool utf8_valid(const uint8_t *s, size_t n)
{
	size_t i = 0;
	while (i < n) {
		uint8_t c = s[i];
		size_t more;
		uint32_t cp, min;
		if (c < 0x80) {
			i++;
			continue;
		} else if ((c & 0xe0) == 0xc0) {
			more = 1, cp = c & 0x1f, min = 0x80;
		} else if ((c & 0xf0) == 0xe0) {
			more = 2, cp = c & 0x0f, min = 0x800;
		} else if ((c & 0xf8) == 0xf0) {
			more = 3, cp = c & 0x07, min = 0x10000;
		} else {
			return false;
		}
		if (n - i <= more)
			return false;
		for (size_t k = 1; k <= more; k++) {
			if ((s[i + k] & 0xc0) != 0x80)
				return false;
			cp = cp << 6 | (s[i + k] & 0x3f);
		}
		if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
			return false;
		i += more + 1;
	}
	return true;
}

void mp_put_text(struct buf *b, const char *s)
{
	size_t n = strlen(s);
	if (utf8_valid((const uint8_t *)s, n)) {
		mp_put_str(b, s, n);
		return;
	}
	/* A message quoting a path that is not UTF-8: the host decodes str as UTF-8, so such bytes become '?'. */
	char *copy = strdup(s);
	if (copy == NULL)
		abort();
	for (size_t i = 0; i < n; i++)
		if ((uint8_t)copy[i] >= 0x80)
			copy[i] = '?';
	mp_put_str(b, copy, n);
	free(copy);
}

void mp_put_name(struct buf *b, const char *s, size_t n)
{
	if (utf8_valid((const uint8_t *)s, n))
		mp_put_str(b, s, n);
	else
		mp_put_bin(b, s, n);
}
