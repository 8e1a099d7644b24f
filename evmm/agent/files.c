/* Files: put and get streamed in chunks through handles, stat, list, mkdir, remove
 * (docs/agent-protocol.md, "Files").
 *
 * A put writes a temporary file next to its target and renames it over the target only when the host's
 * length and CRC-32 match what arrived, with the mode and owner set first: a reader of the path sees the
 * old file or the whole new one.  A get reports the CRC-32 of what it read when closed.  A failed system
 * call on a path is answered with code E_OS - errno, so the host can raise the matching OSError.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "agent.h"

#define MAX_HANDLES 64
#define LIST_BUDGET (512u << 10) /* bytes of entries in one list answer, well inside MAX_FRAME */

struct fhandle {
	uint32_t id;
	int fd;
	bool put;
	char *path, *tmp;
	mode_t mode;
	int64_t uid, gid; /* -1: leave as created */
	uint64_t size;
	uint32_t crc;
	struct fhandle *next;
};

/* CRC-32 as zlib computes it (reflected polynomial 0xEDB88320, ISO-HDLC), so Python's zlib.crc32 agrees. */
uint32_t crc32_update(uint32_t crc, const uint8_t *p, size_t n)
{
	static uint32_t table[256];
	if (table[1] == 0)
		for (uint32_t i = 0; i < 256; i++) {
			uint32_t c = i;
			for (int k = 0; k < 8; k++)
				c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
			table[i] = c;
		}
	crc = ~crc;
	while (n--)
		crc = table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
	return ~crc;
}

static void os_error(struct request *r, const char *what, const char *path)
{
	int e = errno;
	reply_error(r, E_OS - e, "%s %s: %s", what, path, strerror(e));
}

static void close_handle(struct client *c, struct fhandle *h, bool abandon)
{
	for (struct fhandle **pp = &c->files; *pp; pp = &(*pp)->next)
		if (*pp == h) {
			*pp = h->next;
			break;
		}
	close(h->fd);
	if (abandon && h->tmp)
		unlink(h->tmp);
	free(h->path);
	free(h->tmp);
	free(h);
}

void files_client_gone(struct client *c)
{
	while (c->files)
		close_handle(c, c->files, true);
}

static struct fhandle *handle_of(struct request *r, bool put)
{
	int64_t id;
	if (!p_int(r, "handle", &id, 1, 0xffffffff, true))
		return NULL;
	for (struct fhandle *h = r->client->files; h; h = h->next)
		if (h->id == id) {
			if (put != h->put) {
				reply_error(r, E_INVALID_PARAMS, "%s: handle %lld is a %s handle", r->method, (long long)id, h->put ? "file-put" : "file-get");
				return NULL;
			}
			return h;
		}
	reply_error(r, E_INVALID_PARAMS, "%s: no open handle %lld", r->method, (long long)id);
	return NULL;
}

static struct fhandle *new_handle(struct request *r)
{
	size_t n = 0;
	for (struct fhandle *h = r->client->files; h; h = h->next)
		n++;
	if (n >= MAX_HANDLES) {
		reply_error(r, E_FAILED, "%s: this client already has %d files open", r->method, MAX_HANDLES);
		return NULL;
	}
	struct fhandle *h = calloc(1, sizeof *h);
	if (h == NULL)
		abort();
	h->id = r->client->next_handle++;
	h->uid = h->gid = -1;
	return h;
}

static void put_handle_reply(struct request *r, struct fhandle *h, const struct stat *st)
{
	struct buf *b = reply_begin(r);
	mp_put_map(b, st ? 6 : 1);
	mp_put_cstr(b, "handle");
	mp_put_uint(b, h->id);
	if (st) {
		mp_put_cstr(b, "size");
		mp_put_int(b, st->st_size);
		mp_put_cstr(b, "mode");
		mp_put_uint(b, st->st_mode & 07777);
		mp_put_cstr(b, "uid");
		mp_put_uint(b, st->st_uid);
		mp_put_cstr(b, "gid");
		mp_put_uint(b, st->st_gid);
		mp_put_cstr(b, "mtime");
		mp_put_double(b, (double)st->st_mtim.tv_sec + st->st_mtim.tv_nsec / 1e9);
	}
	reply_end(r);
}

void m_file_put(struct request *r)
{
	char *path;
	int64_t mode = 0644, uid = -1, gid = -1;
	if (!p_string(r, "path", &path, true))
		return;
	if (!p_int(r, "mode", &mode, 0, 07777, false) || !p_int(r, "uid", &uid, 0, 0xfffffffe, false) ||
	    !p_int(r, "gid", &gid, 0, 0xfffffffe, false)) {
		free(path);
		return;
	}
	struct fhandle *h = new_handle(r);
	if (h == NULL) {
		free(path);
		return;
	}
	char *copy = strdup(path), *base = basename(path);
	if (asprintf(&h->tmp, "%s/.%s.evmm-XXXXXX", dirname(copy), base) < 0)
		abort();
	free(copy);
	h->fd = mkostemp(h->tmp, O_CLOEXEC);
	if (h->fd < 0) {
		os_error(r, "file-put", path);
		free(h->tmp);
		free(h);
		free(path);
		return;
	}
	h->put = true;
	h->path = path;
	h->mode = (mode_t)mode;
	h->uid = uid, h->gid = gid;
	h->next = r->client->files;
	r->client->files = h;
	put_handle_reply(r, h, NULL);
}

void m_file_write(struct request *r)
{
	struct fhandle *h = handle_of(r, true);
	const uint8_t *data;
	size_t len;
	if (h == NULL || !p_bin(r, "data", &data, &len, true))
		return;
	for (size_t off = 0; off < len;) {
		ssize_t n = write(h->fd, data + off, len - off);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			os_error(r, "file-write", h->path);
			close_handle(r->client, h, true);
			return;
		}
		off += (size_t)n;
	}
	h->size += len;
	h->crc = crc32_update(h->crc, data, len);
	reply_empty(r);
}

void m_file_commit(struct request *r)
{
	struct fhandle *h = handle_of(r, true);
	int64_t size, crc;
	if (h == NULL || !p_int(r, "size", &size, 0, INT64_MAX, true) || !p_int(r, "crc32", &crc, 0, 0xffffffff, true))
		return;
	if ((uint64_t)size != h->size || (uint32_t)crc != h->crc) {
		reply_error(r, E_FAILED, "file-commit %s: the host sent %lld bytes with CRC-32 %08llx, the agent received %llu with %08x; not written",
			    h->path, (long long)size, (long long)crc, (unsigned long long)h->size, h->crc);
		close_handle(r->client, h, true);
		return;
	}
	/* Owner first: chown(2) clears the set-user-ID and set-group-ID bits the mode may ask for. */
	if (((h->uid >= 0 || h->gid >= 0) && fchown(h->fd, (uid_t)h->uid, (gid_t)h->gid) < 0) || fchmod(h->fd, h->mode) < 0) {
		os_error(r, "file-commit", h->path);
		close_handle(r->client, h, true);
		return;
	}
	if (rename(h->tmp, h->path) < 0) {
		os_error(r, "file-commit", h->path);
		close_handle(r->client, h, true);
		return;
	}
	struct buf *b = reply_begin(r);
	mp_put_map(b, 2);
	mp_put_cstr(b, "size");
	mp_put_uint(b, h->size);
	mp_put_cstr(b, "crc32");
	mp_put_uint(b, h->crc);
	reply_end(r);
	free(h->tmp);
	h->tmp = NULL;
	close_handle(r->client, h, false);
}

void m_file_get(struct request *r)
{
	char *path;
	struct stat st;
	if (!p_string(r, "path", &path, true))
		return;
	int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
	if (fd < 0 || fstat(fd, &st) < 0) {
		os_error(r, "file-get", path);
		if (fd >= 0)
			close(fd);
		free(path);
		return;
	}
	if (S_ISDIR(st.st_mode)) {
		errno = EISDIR;
		os_error(r, "file-get", path);
		close(fd);
		free(path);
		return;
	}
	struct fhandle *h = new_handle(r);
	if (h == NULL) {
		close(fd);
		free(path);
		return;
	}
	h->fd = fd;
	h->path = path;
	h->next = r->client->files;
	r->client->files = h;
	put_handle_reply(r, h, &st);
}

void m_file_read(struct request *r)
{
	static uint8_t tmp[MAX_CHUNK];
	struct fhandle *h = handle_of(r, false);
	int64_t length;
	if (h == NULL || !p_int(r, "length", &length, 1, MAX_CHUNK, true))
		return;
	ssize_t n;
	do
		n = read(h->fd, tmp, (size_t)length);
	while (n < 0 && errno == EINTR);
	if (n < 0) {
		os_error(r, "file-read", h->path);
		return;
	}
	h->size += (uint64_t)n;
	h->crc = crc32_update(h->crc, tmp, (size_t)n);
	struct buf *b = reply_begin(r);
	mp_put_map(b, 1);
	mp_put_cstr(b, "data");
	mp_put_bin(b, tmp, (size_t)n);
	reply_end(r);
}

void m_file_close(struct request *r)
{
	int64_t id;
	if (!p_int(r, "handle", &id, 1, 0xffffffff, true))
		return;
	for (struct fhandle *h = r->client->files; h; h = h->next) {
		if (h->id != id)
			continue;
		struct buf *b = reply_begin(r);
		if (h->put) {
			mp_put_map(b, 0); /* an abandoned put: the temporary file goes */
		} else {
			mp_put_map(b, 2);
			mp_put_cstr(b, "size");
			mp_put_uint(b, h->size);
			mp_put_cstr(b, "crc32");
			mp_put_uint(b, h->crc);
		}
		reply_end(r);
		close_handle(r->client, h, true);
		return;
	}
	reply_error(r, E_INVALID_PARAMS, "file-close: no open handle %lld", (long long)id);
}

/* ---- metadata ----------------------------------------------------------------------------------------- */

static const char *type_name(mode_t m)
{
	return S_ISREG(m) ? "file" : S_ISDIR(m) ? "dir" : S_ISLNK(m) ? "symlink" : S_ISCHR(m) ? "char" : S_ISBLK(m) ? "block" : S_ISFIFO(m) ? "fifo" : "socket";
}

/* The fields of stat and of each list entry; `name` adds the entry's name. */
static void put_stat(struct buf *b, const struct stat *st, const char *name, const char *target)
{
	mp_put_map(b, 6 + (name != NULL) + (target != NULL));
	if (name) {
		mp_put_cstr(b, "name");
		mp_put_name(b, name, strlen(name));
	}
	mp_put_cstr(b, "type");
	mp_put_cstr(b, type_name(st->st_mode));
	mp_put_cstr(b, "mode");
	mp_put_uint(b, st->st_mode & 07777);
	mp_put_cstr(b, "size");
	mp_put_int(b, st->st_size);
	mp_put_cstr(b, "uid");
	mp_put_uint(b, st->st_uid);
	mp_put_cstr(b, "gid");
	mp_put_uint(b, st->st_gid);
	mp_put_cstr(b, "mtime");
	mp_put_double(b, (double)st->st_mtim.tv_sec + st->st_mtim.tv_nsec / 1e9);
	if (target) {
		mp_put_cstr(b, "target");
		mp_put_name(b, target, strlen(target));
	}
}

void m_stat(struct request *r)
{
	char *path, target[4096];
	bool follow = false;
	struct stat st;
	if (!p_string(r, "path", &path, true))
		return;
	if (!p_bool(r, "follow", &follow)) {
		free(path);
		return;
	}
	if ((follow ? stat(path, &st) : lstat(path, &st)) < 0) {
		os_error(r, "stat", path);
		free(path);
		return;
	}
	ssize_t n = S_ISLNK(st.st_mode) ? readlink(path, target, sizeof target - 1) : -1;
	if (n >= 0)
		target[n] = 0;
	put_stat(reply_begin(r), &st, NULL, n >= 0 ? target : NULL);
	reply_end(r);
	free(path);
}

void m_list(struct request *r)
{
	char *path;
	int64_t start = 0;
	if (!p_string(r, "path", &path, true))
		return;
	if (!p_int(r, "start", &start, 0, INT32_MAX, false)) {
		free(path);
		return;
	}
	DIR *d = opendir(path);
	if (d == NULL) {
		os_error(r, "list", path);
		free(path);
		return;
	}
	/* Entries are encoded into a scratch buffer first: their count heads the array. */
	struct buf entries = {0};
	uint32_t count = 0;
	int64_t index = 0, next = -1;
	struct dirent *e;
	while ((e = readdir(d)) != NULL) {
		struct stat st;
		if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
			continue;
		if (index++ < start)
			continue;
		if (entries.len > LIST_BUDGET) {
			next = index - 1;
			break;
		}
		if (fstatat(dirfd(d), e->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0)
			continue; /* gone since readdir */
		put_stat(&entries, &st, e->d_name, NULL);
		count++;
	}
	closedir(d);
	struct buf *b = reply_begin(r);
	mp_put_map(b, 2);
	mp_put_cstr(b, "entries");
	mp_put_array(b, count);
	buf_append(b, entries.data, entries.len);
	mp_put_cstr(b, "next");
	if (next >= 0)
		mp_put_int(b, next);
	else
		mp_put_nil(b);
	reply_end(r);
	buf_free(&entries);
	free(path);
}

void m_mkdir(struct request *r)
{
	char *path;
	int64_t mode = 0755;
	bool parents = false;
	if (!p_string(r, "path", &path, true))
		return;
	if (!p_int(r, "mode", &mode, 0, 07777, false) || !p_bool(r, "parents", &parents)) {
		free(path);
		return;
	}
	if (parents) {
		for (char *p = path + 1; *p; p++) {
			if (*p != '/')
				continue;
			*p = 0;
			if (mkdir(path, 0755) < 0 && errno != EEXIST) {
				os_error(r, "mkdir", path);
				free(path);
				return;
			}
			*p = '/';
		}
	}
	struct stat st;
	if (mkdir(path, (mode_t)mode) < 0 && !(parents && errno == EEXIST && stat(path, &st) == 0 && S_ISDIR(st.st_mode))) {
		os_error(r, "mkdir", path);
		free(path);
		return;
	}
	/* mkdir(2) applies the agent's umask; the host asked for this mode */
	chmod(path, (mode_t)mode);
	reply_empty(r);
	free(path);
}

static int remove_one(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
	(void)st, (void)ftw;
	return (flag == FTW_DP ? rmdir(path) : unlink(path)) < 0 ? errno : 0;
}

void m_remove(struct request *r)
{
	char *path;
	bool recursive = false;
	struct stat st;
	if (!p_string(r, "path", &path, true))
		return;
	if (!p_bool(r, "recursive", &recursive)) {
		free(path);
		return;
	}
	if (lstat(path, &st) < 0) {
		os_error(r, "remove", path);
	} else if (S_ISDIR(st.st_mode) && recursive) {
		/* Depth first, never following symlinks nor leaving the path's filesystem (rm -r --one-file-system). */
		int e = nftw(path, remove_one, 16, FTW_DEPTH | FTW_PHYS | FTW_MOUNT);
		if (e != 0) {
			errno = e > 0 ? e : errno;
			os_error(r, "remove", path);
		} else {
			reply_empty(r);
		}
	} else if ((S_ISDIR(st.st_mode) ? rmdir(path) : unlink(path)) < 0) {
		os_error(r, "remove", path);
	} else {
		reply_empty(r);
	}
	free(path);
}
