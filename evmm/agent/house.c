/* Housekeeping for the host: ping, version, the guest clock, entropy, sync, power off
 * (docs/agent-protocol.md, "Housekeeping"). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/random.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/reboot.h>
#include <time.h>
#include <unistd.h>

#include "agent.h"

#define POWEROFF_DELAY_MS 100

static int64_t poweroff_at = -1;
static int poweroff_cmd;

void m_ping(struct request *r)
{
	reply_empty(r);
}

void m_version(struct request *r)
{
	size_t n = 0;
	while (method_name(n))
		n++;
	struct buf *b = reply_begin(r);
	mp_put_map(b, 4);
	mp_put_cstr(b, "agent");
	mp_put_cstr(b, AGENT_VERSION);
	mp_put_cstr(b, "protocol");
	mp_put_int(b, PROTOCOL_VERSION);
	mp_put_cstr(b, "pid");
	mp_put_int(b, A.pid);
	mp_put_cstr(b, "methods");
	mp_put_array(b, (uint32_t)n);
	for (size_t i = 0; i < n; i++)
		mp_put_cstr(b, method_name(i));
	reply_end(r);
}

static bool refuse_on_host(struct request *r)
{
	if (A.host_mode)
		reply_error(r, E_FAILED, "%s: refused: this agent serves a Unix socket (a test on a host, not a guest)", r->method);
	return A.host_mode;
}

void m_set_time(struct request *r)
{
	int64_t sec, nsec = 0;
	if (!p_int(r, "seconds", &sec, 0, INT64_MAX / 2, true) || !p_int(r, "nanoseconds", &nsec, 0, 999999999, false))
		return;
	if (refuse_on_host(r))
		return;
	struct timespec ts = {.tv_sec = (time_t)sec, .tv_nsec = (long)nsec};
	if (clock_settime(CLOCK_REALTIME, &ts) < 0) {
		reply_error(r, E_FAILED, "set-time: %s", strerror(errno));
		return;
	}
	reply_empty(r);
}

/* RNDADDENTROPY (random(4)): the bytes are mixed into the input pool and credited with `bits` of entropy,
 * which only root may do; writing to /dev/random would mix them in without credit. */
void m_add_entropy(struct request *r)
{
	const uint8_t *data;
	size_t len;
	int64_t bits = -1;
	if (!p_bin(r, "data", &data, &len, true) || !p_int(r, "bits", &bits, 0, INT32_MAX, false))
		return;
	if (len == 0 || len > 4096) {
		reply_error(r, E_INVALID_PARAMS, "add-entropy: data must be 1 to 4096 bytes");
		return;
	}
	if (bits < 0 || bits > (int64_t)len * 8)
		bits = (int64_t)len * 8;
	struct rand_pool_info *info = calloc(1, sizeof *info + len + 4);
	if (info == NULL)
		abort();
	info->entropy_count = (int)bits;
	info->buf_size = (int)len;
	memcpy(info->buf, data, len);
	int fd = open("/dev/random", O_WRONLY | O_CLOEXEC);
	if (fd < 0 || ioctl(fd, RNDADDENTROPY, info) < 0)
		reply_error(r, E_FAILED, "add-entropy: %s", strerror(errno));
	else
		reply_empty(r);
	if (fd >= 0)
		close(fd);
	free(info);
}

void m_sync(struct request *r)
{
	sync();
	reply_empty(r);
}

void m_poweroff(struct request *r)
{
	bool reboot_instead = false;
	if (!p_bool(r, "reboot", &reboot_instead) || refuse_on_host(r))
		return;
	reply_empty(r);
	/* The answer needs a moment to leave through the vsock device before the machine stops. */
	poweroff_cmd = reboot_instead ? RB_AUTOBOOT : RB_POWER_OFF;
	poweroff_at = now_ms() + POWEROFF_DELAY_MS;
}

int64_t house_timers(int64_t now)
{
	if (poweroff_at < 0)
		return -1;
	if (now < poweroff_at)
		return poweroff_at - now;
	sync();
	reboot(poweroff_cmd);
	poweroff_at = -1; /* only reached if reboot(2) failed */
	return -1;
}
