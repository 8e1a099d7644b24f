/* The agent's msgpack codec alone, for the host's fuzz tests (tests/unit/test_agent_codec.py): reads
 * frames (4-byte big-endian length, payload) on stdin until EOF, and for each writes one frame holding
 * {"ok": <the payload's value, decoded and encoded again>} or {"error": "<why it was refused>"}. */
#include <stdio.h>
#include <stdlib.h>

#include "mpack.h"

static int read_all(void *p, size_t n)
{
	return fread(p, 1, n, stdin) == n ? 0 : -1;
}

int main(void)
{
	uint8_t hdr[4];
	while (read_all(hdr, 4) == 0) {
		size_t len = (size_t)hdr[0] << 24 | (size_t)hdr[1] << 16 | (size_t)hdr[2] << 8 | hdr[3];
		uint8_t *payload = malloc(len ? len : 1);
		if (payload == NULL || read_all(payload, len) < 0)
			return 1;
		struct mp_tree tree;
		char err[128];
		struct buf out = {0};
		buf_append(&out, "\0\0\0\0", 4);
		mp_put_map(&out, 1);
		if (mp_decode(payload, len, &tree, err, sizeof err) == 0) {
			mp_put_cstr(&out, "ok");
			mp_put_value(&out, &tree.nodes[0]);
		} else {
			mp_put_cstr(&out, "error");
			mp_put_cstr(&out, err);
		}
		mp_tree_free(&tree);
		size_t n = out.len - 4;
		out.data[0] = (uint8_t)(n >> 24), out.data[1] = (uint8_t)(n >> 16), out.data[2] = (uint8_t)(n >> 8), out.data[3] = (uint8_t)n;
		fwrite(out.data, 1, out.len, stdout);
		fflush(stdout);
		buf_free(&out);
		free(payload);
	}
	return 0;
}
