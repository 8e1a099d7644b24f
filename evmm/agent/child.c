/* The forked child of exec: stdio, namespaces and mounts (a container's first process, or one joining a
 * container as `runc exec` does), credentials and limits, then execve.
 *
 * A failure before execve is written to the sync pipe as one line ("chdir /x: No such file or directory")
 * and the child exits: the agent then fails the exec request with that line.  A program that cannot be
 * found or run is not a set-up failure: as a shell does, the child says so on its stderr and exits 127
 * (not found) or 126 (not executable), and the host sees an ordinary process with that exit code.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "agent.h"

static int sync_fd = -1;

__attribute__((noreturn, format(printf, 1, 2))) static void fail(const char *fmt, ...)
{
	char msg[512];
	int e = errno;
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	if (n < 0 || (size_t)n >= sizeof msg)
		n = sizeof msg - 1;
	n += snprintf(msg + n, sizeof msg - n, ": %s", strerror(e));
	if ((size_t)n >= sizeof msg)
		n = sizeof msg - 1;
	if (write(sync_fd, msg, (size_t)n) < 0) {
		/* the agent is gone: nobody to tell */
	}
	_exit(126);
}

static void mkdir_p(char *path, mode_t mode)
{
	for (char *p = path + 1; *p; p++) {
		if (*p != '/')
			continue;
		*p = 0;
		mkdir(path, mode);
		*p = '/';
	}
	mkdir(path, mode);
}

/* The mount point for m inside rootfs: a directory, or an empty file when binding a file. */
static char *mount_point(const char *rootfs, const struct mountspec *m)
{
	char *target;
	struct stat st;
	if (asprintf(&target, "%s%s", rootfs, m->target) < 0)
		abort();
	if ((m->flags & MS_BIND) && stat(m->source, &st) == 0 && !S_ISDIR(st.st_mode)) {
		char *slash = strrchr(target, '/');
		*slash = 0;
		mkdir_p(target, 0755);
		*slash = '/';
		int fd = open(target, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
		if (fd >= 0)
			close(fd);
	} else {
		mkdir_p(target, 0755);
	}
	return target;
}

static void do_mount(const char *rootfs, const struct mountspec *m)
{
	char *target = mount_point(rootfs, m);
	unsigned long flags = m->flags & ~MS_REC;
	if (m->flags & MS_BIND) {
		if (mount(m->source, target, NULL, m->flags & (MS_BIND | MS_REC), NULL) < 0)
			fail("mount --bind %s %s", m->source, m->target);
		/* A bind mount takes its flags only from a remount (mount(2), "Creating a bind mount"). */
		flags &= ~MS_BIND;
		if (flags && mount(NULL, target, NULL, MS_REMOUNT | MS_BIND | flags, NULL) < 0)
			fail("mount -o remount,bind %s", m->target);
	} else if (mount(m->source ? m->source : m->type, target, m->type, flags, m->data) < 0) {
		fail("mount -t %s %s", m->type, m->target);
	}
	if (m->propagation && mount(NULL, target, NULL, m->propagation, NULL) < 0)
		fail("mount --make-private/shared/slave %s", m->target);
	free(target);
}

/* The root of a new container (OCI runtime spec, "Runtime and Lifecycle" / config "root", "mounts"):
 * in a mount namespace of its own, rootfs becomes '/' with the mounts done inside it first. */
static void enter_rootfs(const struct exec_spec *s)
{
	if (unshare(s->nsflags & ~CLONE_NEWPID) < 0)
		fail("unshare");
	/* Nothing mounted from here on may reach the agent's namespace. */
	if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0)
		fail("mount --make-rprivate /");
	/* pivot_root needs rootfs to be a mount point; a bind mount of itself makes it one. */
	if (mount(s->rootfs, s->rootfs, NULL, MS_BIND | MS_REC, NULL) < 0)
		fail("mount --bind %s", s->rootfs);
	for (size_t i = 0; i < s->nmounts; i++)
		do_mount(s->rootfs, &s->mounts[i]);
	if (s->hostname && sethostname(s->hostname, strlen(s->hostname)) < 0)
		fail("sethostname %s", s->hostname);
	if (chdir(s->rootfs) < 0)
		fail("chdir %s", s->rootfs);
	/* pivot_root(".", ".") stacks the old root under the new one, which is then detached (pivot_root(2),
	 * NOTES).  An initramfs root cannot be pivoted away from (EINVAL): there, as switch_root(8) and runc's
	 * no-pivot mode do, move rootfs over '/' and chroot into it. */
	if (syscall(SYS_pivot_root, ".", ".") == 0) {
		if (umount2(".", MNT_DETACH) < 0)
			fail("umount the old root");
	} else if (errno == EINVAL) {
		if (mount(".", "/", NULL, MS_MOVE, NULL) < 0)
			fail("mount --move %s /", s->rootfs);
		if (chroot(".") < 0)
			fail("chroot %s", s->rootfs);
	} else {
		fail("pivot_root %s", s->rootfs);
	}
	if (chdir("/") < 0)
		fail("chdir /");
	if (s->readonly_root && mount(NULL, "/", NULL, MS_REMOUNT | MS_BIND | MS_RDONLY, NULL) < 0)
		fail("mount -o remount,bind,ro /");
}

/* Join the namespaces and root of a running container (runc exec, nsenter --all --root): the fds were
 * opened before the first setns, while /proc still showed the agent's view. */
static void join(const struct exec_spec *s, const struct child_fds *f)
{
	static const char *names[] = {"ipc", "uts", "net", "mnt"};
	for (int i = 0; i < 4; i++)
		if (f->join_ns[i] >= 0 && setns(f->join_ns[i], 0) < 0)
			fail("setns %s of process %d", names[i], (int)s->join);
	if (fchdir(f->join_root) < 0 || chroot(".") < 0)
		fail("chroot to the root of process %d", (int)s->join);
	if (chdir("/") < 0)
		fail("chdir /");
}

static const char *env_get(char **env, const char *name)
{
	size_t n = strlen(name);
	for (char **e = env; e && *e; e++)
		if (strncmp(*e, name, n) == 0 && (*e)[n] == '=')
			return *e + n + 1;
	return NULL;
}

static void say(const char *what, const char *why)
{
	dprintf(2, "%s: %s\n", what, why);
}

/* execve with a PATH search in the process's own environment (execvpe would search the agent's). */
__attribute__((noreturn)) static void run(char **argv, char **env)
{
	const char *prog = argv[0];
	if (strchr(prog, '/')) {
		execve(prog, argv, env);
		int e = errno;
		say(prog, strerror(e));
		_exit(e == ENOENT || e == ENOTDIR ? 127 : 126);
	}
	const char *path = env_get(env, "PATH");
	if (path == NULL)
		path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
	int denied = 0;
	for (const char *p = path;; p++) {
		const char *end = strchrnul(p, ':');
		char *full;
		int len = (int)(end - p);
		if (asprintf(&full, "%.*s%s%s", len, p, len ? "/" : "", prog) < 0)
			abort();
		execve(full, argv, env);
		int e = errno;
		free(full);
		if (e == EACCES)
			denied = 1;
		else if (e != ENOENT && e != ENOTDIR && e != ENAMETOOLONG) {
			say(prog, strerror(e));
			_exit(126);
		}
		if (*end == 0)
			break;
		p = end;
	}
	if (denied) {
		say(prog, "Permission denied");
		_exit(126);
	}
	say(prog, "command not found");
	_exit(127);
}

void child_main(const struct exec_spec *s, const struct child_fds *f)
{
	sigset_t none;
	sync_fd = f->sync;
	for (int sig = 1; sig < NSIG; sig++)
		signal(sig, SIG_DFL);
	sigemptyset(&none);
	sigprocmask(SIG_SETMASK, &none, NULL);

	/* Its own session and process group: the agent signals the whole group, and a tty needs a session
	 * leader to be its controlling process. */
	if (setsid() < 0)
		fail("setsid");
	if (dup2(f->in, 0) < 0 || dup2(f->out, 1) < 0 || dup2(f->err, 2) < 0)
		fail("dup2");
	if (s->tty && ioctl(0, TIOCSCTTY, 0) < 0)
		fail("TIOCSCTTY");

	if (s->rootfs)
		enter_rootfs(s);
	else if (s->join)
		join(s, f);

	for (size_t i = 0; i < s->nrlimits; i++)
		if (setrlimit(s->rlimits[i].resource, &s->rlimits[i].lim) < 0)
			fail("setrlimit %d", s->rlimits[i].resource);
	/* Only root may change them; an agent run by another user (the host tests) keeps its own. */
	if (geteuid() == 0 && setgroups(s->ngroups, s->groups) < 0)
		fail("setgroups");
	if (s->gid != getegid() && setgid(s->gid) < 0)
		fail("setgid %u", (unsigned)s->gid);
	if (s->uid != geteuid() && setuid(s->uid) < 0)
		fail("setuid %u", (unsigned)s->uid);
	umask(s->umask);
	if (s->cwd && chdir(s->cwd) < 0)
		fail("chdir %s", s->cwd);
	else if (!s->cwd && !s->rootfs && !s->join && chdir("/") < 0)
		fail("chdir /");

	/* Die with the agent (set last: a change of credentials clears it, prctl(2)).  A parent already gone
	 * shows as another parent; in a new pid namespace the parent is outside it and shows as 0. */
	if (prctl(PR_SET_PDEATHSIG, SIGKILL) < 0)
		fail("PR_SET_PDEATHSIG");
	pid_t parent = getppid();
	if (parent != A.pid && parent != 0)
		_exit(126);
	run(s->argv, s->env);
}
