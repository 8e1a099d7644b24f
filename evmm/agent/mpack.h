/* A minimal msgpack codec for evmm-agent: only what the agent protocol carries (docs/agent-protocol.md).
 *
 * Decoding builds a tree of values that point into the frame's bytes (strings and binaries are not copied
 * and not NUL-terminated).  It takes nil, booleans, integers, floats, strings, binaries, arrays and maps;
 * extension types are refused, as the host's decoder refuses them (evmm/rpc/protocol.py).  Every length is
 * checked against the bytes left before anything is allocated, so a hostile frame costs at most one
 * allocation proportional to its own size, and nesting is limited to MP_MAX_DEPTH.
 *
 * Encoding appends to a growable buffer, always in the shortest form the msgpack spec allows.
 */
#ifndef EVMM_AGENT_MPACK_H
#define EVMM_AGENT_MPACK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define MP_MAX_DEPTH 16

enum mp_type { MP_NIL, MP_BOOL, MP_INT, MP_FLOAT, MP_STR, MP_BIN, MP_ARRAY, MP_MAP };

struct mp_value {
	enum mp_type type;
	uint32_t len; /* bytes of a string or binary; items of an array; pairs of a map */
	bool is_unsigned; /* MP_INT above INT64_MAX: the value is in u */
	union {
		bool b;
		int64_t i;
		uint64_t u;
		double f;
		const uint8_t *bytes; /* MP_STR, MP_BIN */
		struct mp_value *items; /* MP_ARRAY: len values; MP_MAP: 2 * len, key then value */
	} v;
};

struct mp_tree {
	struct mp_value *nodes; /* nodes[0] is the root */
	size_t count;
};

/* Decode exactly one value filling data[0..len).  Returns 0, or -1 with a one-line reason in err. */
int mp_decode(const uint8_t *data, size_t len, struct mp_tree *tree, char *err, size_t errlen);
void mp_tree_free(struct mp_tree *tree);

/* The value of key in a map (NULL when absent or when m is not a map). */
const struct mp_value *mp_map_get(const struct mp_value *m, const char *key);
bool mp_str_is(const struct mp_value *v, const char *s);

struct buf {
	uint8_t *data;
	size_t len;
	size_t cap;
};

void buf_reserve(struct buf *b, size_t more);
void buf_append(struct buf *b, const void *data, size_t len);
void buf_free(struct buf *b);

void mp_put_nil(struct buf *b);
void mp_put_bool(struct buf *b, bool v);
void mp_put_int(struct buf *b, int64_t v);
void mp_put_uint(struct buf *b, uint64_t v);
void mp_put_double(struct buf *b, double v);
void mp_put_str(struct buf *b, const void *s, size_t len);
void mp_put_cstr(struct buf *b, const char *s);
void mp_put_bin(struct buf *b, const void *data, size_t len);
void mp_put_array(struct buf *b, uint32_t n);
void mp_put_map(struct buf *b, uint32_t n);
/* Text for a person (messages): a str, with any byte that is not UTF-8 made '?'. */
void mp_put_text(struct buf *b, const char *s);
/* A file name: a str when it is UTF-8, else a bin (Linux names are bytes; the host decodes str as UTF-8). */
void mp_put_name(struct buf *b, const char *s, size_t n);
bool utf8_valid(const uint8_t *s, size_t n);
/* A decoded value again, in canonical form (the fuzz tests compare it with the host's msgpack). */
void mp_put_value(struct buf *b, const struct mp_value *v);

#endif
