// SPDX-License-Identifier: GPL-2.0
/*
 * qvm-guard-loader: loads and attaches the runtime guard's BPF programs (guard.bpf.o), takes the node-agent's
 * commands on stdin and writes one JSON object a line on stdout.
 *
 *   usage: qvm-guard-loader [--mode auto|enforce|observe|verify] <guard.bpf.o>
 *
 * Modes (the object holds the programs of both; the others are not loaded: bpf_program__set_autoload):
 *   enforce   the BPF LSM hooks (rules marked enforced deny with -EPERM) + the process tree tracking.
 *   observe   syscall and sched tracepoints that report the same rules, denying nothing + the tracking.
 *   auto      (the default) enforce where the kernel runs BPF LSM programs, else observe: the BPF LSM not
 *             in the active list, or its programs refused at load or attach (EPERM: lockdown, no BPF
 *             trampolines), falls back to observe, and the ready line says why.
 *   verify    load every program of the object (the check-only build: the LSM bodies as raw_tp) and attach
 *             none: the verifier's verdict on all of them. Prints the ready line and exits.
 * A tracepoint the running kernel does not have (init_module on a kernel without modules) is not loaded and
 * is listed in the ready line's "absent".
 *
 * stdout (line-buffered, one JSON object a line):
 *   {"ready": true, "mode": "enforce"|"observe"|"verify", "attached": N, "loaded_only": M, "absent": [...],
 *    "fallback": "..."}                                  once, after every program is loaded and attached
 *                                                        ("fallback": why auto did not enforce, if it did not)
 *   {"reply": "ok", "cmd": "<verb>", ...}                 one per command, in command order
 *   {"reply": "error", "cmd": "<verb>", "error": "..."}   a command that changed nothing
 *   {"rule": "<name>", "slot": S, "pid": P, "tgid": T, "comm": "...", "target": X, "detail": "...",
 *    "enforced": true|false, "ktime_ns": K}              one per event from the BPF ring buffer
 *   {"notice": "lost", "count": N}                        the ring buffer overflowed N events so far
 *   {"notice": "members_full", "slot": S, "tgid": T}      a forked process (or thread) could not be tracked
 *   {"notice": "unknown_rule" | "line_too_long", ...}     cannot happen with a matching build; ignored
 * stdin commands (one a line, at most 511 bytes; numbers in decimal):
 *   watch <slot> <vmm_tgid>      the VMM and (from /proc) the processes it already forked, and all their
 *                                threads, join <slot>
 *   unwatch <slot>               forget the slot's processes, threads, files and paths
 *   agent <tgid>                 the node-agent: may ptrace / read its VMMs and open their files
 *   protect <slot> <dev> <ino>   a protected file of <slot> (dev as stat()'s st_dev): enforce mode
 *   protectpath <slot> <hex>     a protected file's absolute path (hex of its bytes, at most 127): observe
 *   unprotect <slot> [<dev> <ino>]   all the slot's files and paths, or one file
 *   status                       the maps' contents (for tests and `qvm node doctor`)
 *   quit
 * A fatal error is one line {"error": "...", "reason": "..."} on stderr and exit status 1 (2: usage).
 * EOF on stdin (the agent went away) detaches everything and exits 0; so does SIGTERM.
 *
 * Strings from the kernel (comm, file names) are bounded copies, NUL-terminated here again, and JSON-escaped
 * byte by byte (bytes outside printable ASCII as \u00XX), so no kernel string can break the line protocol.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/sysmacros.h>
#include <sys/un.h>
#include <unistd.h>

#include <bpf/bpf.h>
#include <bpf/libbpf.h>

/* The shared definitions (map sizes, struct qvm_event, ...) and the rule names, from the BPF source itself. */
#define QVM_RULE_NAMES
#define QVM_GUARD_ABI_ONLY
#include "guard.bpf.c"

_Static_assert(sizeof(struct qvm_event) == 48 + 16 + QVM_DETAIL_BYTES, "qvm_event layout");
_Static_assert(QVM_SOCKADDR_BYTES <= QVM_DETAIL_BYTES, "sockaddr fits the detail buffer");

#define MAX_LINE 512
#define MAX_LINKS 96
#define MAX_ABSENT 32
#define MAX_PROC_ENTRIES (1 << 20)
#define STATUS_MEMBERS 64 /* at most this many tgids listed per slot by `status` */
#define STATUS_FILES 1024 /* and this many protected files in all */

/* ---- a bounded JSON line builder ---- */

struct jbuf {
	char *buf;
	size_t len, cap;
	bool overflow; /* set when something did not fit: the line is dropped rather than cut mid-token */
};

static void jb_init(struct jbuf *j, char *storage, size_t cap)
{
	j->buf = storage;
	j->len = 0;
	j->cap = cap;
	j->overflow = false;
}

static void jb_raw(struct jbuf *j, const char *s, size_t n)
{
	if (j->overflow || n > j->cap - j->len - 1) {
		j->overflow = true;
		return;
	}
	memcpy(j->buf + j->len, s, n);
	j->len += n;
}

static void jb_fmt(struct jbuf *j, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void jb_fmt(struct jbuf *j, const char *fmt, ...)
{
	char tmp[128];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(tmp, sizeof(tmp), fmt, ap);
	va_end(ap);
	if (n < 0 || (size_t)n >= sizeof(tmp)) {
		j->overflow = true;
		return;
	}
	jb_raw(j, tmp, (size_t)n);
}

/* A JSON string from at most `n` bytes of `s` (stops at NUL). */
static void jb_str(struct jbuf *j, const char *s, size_t n)
{
	jb_raw(j, "\"", 1);
	for (size_t i = 0; i < n && s[i]; i++) {
		unsigned char c = (unsigned char)s[i];
		if (c == '"' || c == '\\') {
			char esc[2] = {'\\', (char)c};
			jb_raw(j, esc, 2);
		} else if (c < 0x20 || c >= 0x7f) {
			jb_fmt(j, "\\u%04x", c);
		} else {
			jb_raw(j, (const char *)&c, 1);
		}
	}
	jb_raw(j, "\"", 1);
}

static void jb_key(struct jbuf *j, const char *key)
{
	if (j->len > 1)
		jb_raw(j, ", ", 2);
	jb_str(j, key, strlen(key));
	jb_raw(j, ": ", 2);
}

static void jb_kstr(struct jbuf *j, const char *key, const char *s, size_t n)
{
	jb_key(j, key);
	jb_str(j, s, n);
}

static void jb_knum(struct jbuf *j, const char *key, unsigned long long v)
{
	jb_key(j, key);
	jb_fmt(j, "%llu", v);
}

static void jb_kbool(struct jbuf *j, const char *key, bool v)
{
	jb_key(j, key);
	jb_raw(j, v ? "true" : "false", v ? 4 : 5);
}

/* Write the finished line; a write to a closed stdout means the agent is gone: stop. */
static volatile sig_atomic_t stop_requested;

static void jb_emit(struct jbuf *j, FILE *out)
{
	if (j->overflow) {
		static const char dropped[] = "{\"notice\": \"line_too_long\"}\n";
		fputs(dropped, out);
	} else {
		j->buf[j->len++] = '\n'; /* jb_raw always keeps one byte free */
		fwrite(j->buf, 1, j->len, out);
	}
	if (fflush(out) != 0)
		stop_requested = 1;
}

/* ---- fatal errors and libbpf's messages ---- */

static char libbpf_log[2048]; /* the end of the last verifier log libbpf printed (it ends with the reason) */
static char libbpf_msg[512]; /* libbpf's last warning that names a program */
static char failed_prog[64]; /* from "libbpf: prog 'NAME': ..." */

/* Keep the last `cap - 1` bytes of `line` in `dst`. */
static void keep_tail(char *dst, size_t cap, const char *line, size_t len)
{
	size_t from = len >= cap ? len - (cap - 1) : 0;
	memcpy(dst, line + from, len - from);
	dst[len - from] = 0;
}

static int on_libbpf_print(enum libbpf_print_level level, const char *fmt, va_list ap)
{
	static char line[65536];
	if (level == LIBBPF_DEBUG)
		return 0;
	int n = vsnprintf(line, sizeof(line), fmt, ap);
	if (n < 0)
		return 0;
	size_t len = strnlen(line, sizeof(line));
	while (len && (line[len - 1] == '\n' || line[len - 1] == ' '))
		line[--len] = 0;
	if (len == 0)
		return 0;
	if (strstr(line, "END PROG LOAD LOG")) {
		keep_tail(libbpf_log, sizeof(libbpf_log), line, len);
		return 0;
	}
	const char *p = strstr(line, "prog '");
	if (p) {
		keep_tail(libbpf_msg, sizeof(libbpf_msg), line, len);
		p += 6;
		const char *q = strchr(p, '\'');
		if (q && (size_t)(q - p) < sizeof(failed_prog)) {
			memcpy(failed_prog, p, (size_t)(q - p));
			failed_prog[q - p] = 0;
		}
	}
	return 0;
}

static void fatal(const char *reason, int err, const char *fmt, ...) __attribute__((format(printf, 3, 4), noreturn));
static void fatal(const char *reason, int err, const char *fmt, ...)
{
	char msg[512];
	static char storage[32768];
	struct jbuf j;
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	jb_init(&j, storage, sizeof(storage));
	jb_raw(&j, "{", 1);
	jb_kstr(&j, "error", msg, sizeof(msg));
	jb_kstr(&j, "reason", reason, strlen(reason));
	if (err)
		jb_knum(&j, "errno", (unsigned long long)(err < 0 ? -err : err));
	if (failed_prog[0])
		jb_kstr(&j, "prog", failed_prog, sizeof(failed_prog));
	if (libbpf_msg[0])
		jb_kstr(&j, "libbpf", libbpf_msg, sizeof(libbpf_msg));
	if (libbpf_log[0])
		jb_kstr(&j, "verifier_log", libbpf_log, sizeof(libbpf_log));
	jb_raw(&j, "}", 1);
	jb_emit(&j, stderr);
	exit(1);
}

/* ---- the BPF object ---- */

enum mode { MODE_AUTO, MODE_ENFORCE, MODE_OBSERVE, MODE_VERIFY };
static const char *const mode_names[] = {"auto", "enforce", "observe", "verify"};

/* What a program is for, from its section: the tracking runs in both modes. */
enum group { GROUP_TRACK, GROUP_ENFORCE, GROUP_OBSERVE, GROUP_CHECK, GROUP_OTHER };

static struct bpf_object *obj;
static struct bpf_link *links[MAX_LINKS];
static int nlinks;
static struct ring_buffer *rb;
static int members_fd, threads_fd, slots_fd, agents_fd, files_fd, paths_fd, config_fd, lost_fd;
static unsigned long long lost_reported;
static char absent[MAX_ABSENT][64]; /* observe-mode tracepoints this kernel does not have */
static int nabsent;
static char fallback[512]; /* why auto mode does not enforce */
static enum mode active_mode; /* what runs: enforce, observe or verify */

static enum group group_of(const struct bpf_program *prog)
{
	const char *sec = bpf_program__section_name(prog);
	if (strncmp(sec, "tp_btf/", 7) == 0)
		return GROUP_TRACK;
	if (strncmp(sec, "lsm/", 4) == 0)
		return GROUP_ENFORCE;
	if (strncmp(sec, "tracepoint/", 11) == 0)
		return GROUP_OBSERVE;
	if (strcmp(sec, "raw_tp") == 0)
		return GROUP_CHECK; /* the check-only build's copy of an LSM hook */
	return GROUP_OTHER;
}

/* Whether tracefs has the tracepoint "cat/name" (1), has not (0), or cannot tell (-1: no tracefs: then the
 * attach says why). */
static int tracepoint_exists(const char *catname)
{
	static const char *const roots[] = {"/sys/kernel/tracing/events", "/sys/kernel/debug/tracing/events"};
	char path[256];
	for (size_t i = 0; i < sizeof(roots) / sizeof(roots[0]); i++) {
		if (access(roots[i], F_OK) != 0)
			continue;
		snprintf(path, sizeof(path), "%s/%s", roots[i], catname);
		return access(path, F_OK) == 0;
	}
	return -1;
}

/* Whether the BPF LSM is in the active list; `why` says why not. */
static bool bpf_lsm_active(char *why, size_t cap)
{
	char buf[512];
	FILE *f = fopen("/sys/kernel/security/lsm", "re");
	if (!f) {
		snprintf(why, cap, "lsm_inactive: cannot read /sys/kernel/security/lsm (securityfs not mounted?)");
		return false;
	}
	size_t n = fread(buf, 1, sizeof(buf) - 1, f);
	fclose(f);
	buf[n] = 0;
	for (char *save = NULL, *tok = strtok_r(buf, ",\n", &save); tok; tok = strtok_r(NULL, ",\n", &save))
		if (strcmp(tok, "bpf") == 0)
			return true;
	snprintf(why, cap, "lsm_inactive: the BPF LSM is not in the active list (%.400s)", buf);
	return false;
}

static int map_fd(const char *name)
{
	int fd = bpf_object__find_map_fd_by_name(obj, name);
	if (fd < 0)
		fatal("maps_missing", fd, "the BPF object has no map '%s'", name);
	return fd;
}

static void forget_libbpf_messages(void)
{
	libbpf_log[0] = libbpf_msg[0] = failed_prog[0] = 0;
}

/* Open the object and load the programs of `mode`. 0, or the (negative) error with `*lsm_refused` set when
 * it is the kernel refusing a BPF LSM program as root: the one failure auto mode falls back from. */
static int open_and_load(const char *path, enum mode mode, bool *lsm_refused)
{
	struct bpf_program *prog;
	bool check_only = false;
	*lsm_refused = false;
	nabsent = 0;
	obj = bpf_object__open_file(path, NULL);
	if (!obj)
		fatal("open_failed", errno, "cannot open BPF object %s: %s", path, strerror(errno));
	bpf_object__for_each_program(prog, obj)
	{
		enum group g = group_of(prog);
		bool load = g == GROUP_TRACK || (g == GROUP_ENFORCE && mode == MODE_ENFORCE) ||
			    (g == GROUP_OBSERVE && mode == MODE_OBSERVE) || mode == MODE_VERIFY;
		check_only |= g == GROUP_CHECK;
		if (g == GROUP_OBSERVE && load && mode != MODE_VERIFY) {
			const char *catname = bpf_program__section_name(prog) + 11;
			if (tracepoint_exists(catname) == 0) {
				load = false;
				if (nabsent < MAX_ABSENT)
					snprintf(absent[nabsent++], sizeof(absent[0]), "%s", catname);
			}
		}
		bpf_program__set_autoload(prog, load);
	}
	if (check_only && mode != MODE_VERIFY)
		fatal("bad_request", 0, "%s is the check-only build: it runs in verify mode only", path);
	int err = bpf_object__load(obj);
	if (err) {
		struct bpf_program *bad = failed_prog[0] ? bpf_object__find_program_by_name(obj, failed_prog) : NULL;
		/* Root, yet EPERM for an LSM (trampoline) program: this kernel refuses BPF LSM programs (lockdown,
		 * no BPF trampolines). A verifier rejection is EACCES/EINVAL with a log, and is our bug. */
		*lsm_refused = err == -EPERM && bad && group_of(bad) == GROUP_ENFORCE;
	}
	return err;
}

/* Attach every loaded program (verify: none). 0, or the error with `*lsm_refused` as above. */
static int attach_loaded(int *attached, int *loaded_only, bool *lsm_refused)
{
	struct bpf_program *prog;
	*lsm_refused = false;
	bpf_object__for_each_program(prog, obj)
	{
		if (!bpf_program__autoload(prog))
			continue;
		if (group_of(prog) == GROUP_CHECK || group_of(prog) == GROUP_OTHER) {
			(*loaded_only)++;
			continue;
		}
		if (nlinks >= MAX_LINKS)
			fatal("attach_failed", 0, "more than %d programs", MAX_LINKS);
		struct bpf_link *link = bpf_program__attach(prog);
		if (!link) {
			int e = errno;
			snprintf(failed_prog, sizeof(failed_prog), "%s", bpf_program__name(prog));
			*lsm_refused = e == EPERM && group_of(prog) == GROUP_ENFORCE;
			return -e;
		}
		links[nlinks++] = link;
		(*attached)++;
	}
	return 0;
}

static void unload(void)
{
	for (int i = 0; i < nlinks; i++)
		bpf_link__destroy(links[i]);
	nlinks = 0;
	bpf_object__close(obj);
	obj = NULL;
}

/* Load and attach the programs of `*mode`; auto resolves to enforce or observe (the fallback says why). */
static void load_and_attach(const char *path, enum mode *mode, int *attached, int *loaded_only)
{
	bool automatic = *mode == MODE_AUTO, refused;
	char why[512];
	int err;
	if (*mode == MODE_AUTO || *mode == MODE_ENFORCE) {
		if (bpf_lsm_active(why, sizeof(why))) {
			*mode = MODE_ENFORCE;
		} else if (automatic) {
			snprintf(fallback, sizeof(fallback), "%s", why);
			*mode = MODE_OBSERVE;
		} else {
			fatal("lsm_inactive", 0, "%s", why + strlen("lsm_inactive: "));
		}
	}
	for (;;) {
		err = open_and_load(path, *mode, &refused);
		if (err) {
			if (automatic && refused && *mode == MODE_ENFORCE)
				goto fall_back;
			fatal(refused ? "lsm_refused" : "load_failed", err, "loading %s (%s mode) failed: %s", path,
			      mode_names[*mode], strerror(-err));
		}
		*attached = *loaded_only = 0;
		if (*mode == MODE_VERIFY) { /* loaded is all it takes */
			struct bpf_program *prog;
			bpf_object__for_each_program(prog, obj)
			{
				(*loaded_only)++;
			}
			break;
		}
		err = attach_loaded(attached, loaded_only, &refused);
		if (!err)
			break;
		if (automatic && refused && *mode == MODE_ENFORCE)
			goto fall_back;
		fatal(refused ? "lsm_refused" : "attach_failed", -err, "attaching %s (%s mode) failed: %s", failed_prog,
		      mode_names[*mode], strerror(-err));
	fall_back:
		snprintf(fallback, sizeof(fallback), "lsm_refused: %.60s: %s (the kernel lists the BPF LSM but "
			 "refuses its programs)", failed_prog[0] ? failed_prog : "?", strerror(-err));
		unload();
		forget_libbpf_messages();
		*mode = MODE_OBSERVE;
	}
	members_fd = map_fd("members");
	threads_fd = map_fd("threads");
	slots_fd = map_fd("slots");
	agents_fd = map_fd("agents");
	files_fd = map_fd("files");
	paths_fd = map_fd("paths");
	config_fd = map_fd("guard_config");
	lost_fd = map_fd("lost");
}

/* ---- events ---- */

/* The sockaddr connect() was given (the first `len` bytes, copied by the BPF program) as text. */
static void format_sockaddr(char *out, size_t cap, const unsigned char *raw, size_t len, unsigned family)
{
	char addr[INET6_ADDRSTRLEN];
	if (family == AF_INET && len >= sizeof(struct sockaddr_in)) {
		struct sockaddr_in in;
		memcpy(&in, raw, sizeof(in));
		inet_ntop(AF_INET, &in.sin_addr, addr, sizeof(addr));
		snprintf(out, cap, "inet %s:%u", addr, ntohs(in.sin_port));
	} else if (family == AF_INET6 && len >= sizeof(struct sockaddr_in6)) {
		struct sockaddr_in6 in6;
		memcpy(&in6, raw, sizeof(in6));
		inet_ntop(AF_INET6, &in6.sin6_addr, addr, sizeof(addr));
		snprintf(out, cap, "inet6 [%s]:%u", addr, ntohs(in6.sin6_port));
	} else if (family == AF_UNIX && len > offsetof(struct sockaddr_un, sun_path)) {
		size_t off = offsetof(struct sockaddr_un, sun_path), n = len - off, k = 0;
		char path[QVM_SOCKADDR_BYTES + 1];
		bool abstract = raw[off] == 0;
		for (size_t i = abstract ? 1 : 0; i < n && k < sizeof(path) - 1; i++) {
			if (!abstract && raw[off + i] == 0)
				break;
			path[k++] = raw[off + i] ? (char)raw[off + i] : '@';
		}
		path[k] = 0;
		snprintf(out, cap, "unix %s%s", abstract ? "@" : "", path);
	} else {
		snprintf(out, cap, "family %u", family);
	}
}

static int on_event(void *ctx, void *data, size_t size)
{
	(void)ctx;
	struct qvm_event e;
	char detail[QVM_DETAIL_BYTES + 64];
	static char storage[2048];
	struct jbuf j;

	if (size < sizeof(e))
		return 0;
	memcpy(&e, data, sizeof(e));
	e.comm[sizeof(e.comm) - 1] = 0;
	e.detail[sizeof(e.detail) - 1] = 0;
	jb_init(&j, storage, sizeof(storage));
	jb_raw(&j, "{", 1);

	if (e.flags & QVM_EVENT_MEMBERS_FULL) {
		jb_kstr(&j, "notice", "members_full", 12);
		jb_knum(&j, "slot", e.slot);
		jb_knum(&j, "tgid", e.target);
		jb_raw(&j, "}", 1);
		jb_emit(&j, stdout);
		return 0;
	}
	if (e.rule == 0 || e.rule > QVM_RULE_MAX || !qvm_rule_names[e.rule]) {
		jb_kstr(&j, "notice", "unknown_rule", 12);
		jb_knum(&j, "id", e.rule);
		jb_raw(&j, "}", 1);
		jb_emit(&j, stdout);
		return 0;
	}

	snprintf(detail, sizeof(detail), "%s", e.detail);
	bool observed = (e.flags & QVM_EVENT_OBSERVED) != 0;
	switch (e.rule) {
	case QVM_RULE_HOST_PTRACE_VMM:
	case QVM_RULE_VMM_PTRACE: {
		/* enforce: the ptrace mode; observe: the mode and what was used (the syscall, the /proc path) */
		const char *kind = e.arg == QVM_ARG_TRACEME ? "traceme" : (e.arg & 0x02) ? "attach" : "read";
		if (!observed)
			snprintf(detail, sizeof(detail), "%s", kind);
		else if (e.flags & QVM_EVENT_REQUEST)
			snprintf(detail, sizeof(detail), "%s %s request=%llu", kind, e.detail,
				 (unsigned long long)(e.arg >> 32));
		else
			snprintf(detail, sizeof(detail), "%s %s", kind, e.detail);
		break;
	}
	case QVM_RULE_VMM_MOUNT:
		snprintf(detail, sizeof(detail), "%s flags=0x%llx", e.detail[0] ? e.detail : "-",
			 (unsigned long long)e.arg);
		break;
	case QVM_RULE_VMM_BPF:
		snprintf(detail, sizeof(detail), "cmd %llu", (unsigned long long)e.arg);
		break;
	case QVM_RULE_VMM_SETUID:
		if (observed) /* the syscall and the id it asks for (-1: unchanged; setgroups: how many groups) */
			snprintf(detail, sizeof(detail), "%s %s=%d", e.detail,
				 strcmp(e.detail, "setgroups") == 0 ? "count" : "id", (int)(__u32)e.arg);
		else
			snprintf(detail, sizeof(detail), "euid %llu -> %llu", (unsigned long long)(e.arg >> 32),
				 (unsigned long long)(e.arg & 0xffffffffu));
		break;
	case QVM_RULE_VMM_CONNECT:
		if (e.flags & QVM_EVENT_RAW_SOCKADDR) {
			size_t len = (size_t)((e.arg >> 16) & 0xffff);
			if (len > QVM_SOCKADDR_BYTES)
				len = QVM_SOCKADDR_BYTES;
			format_sockaddr(detail, sizeof(detail), (const unsigned char *)e.detail, len,
					(unsigned)(e.arg & 0xffff));
		}
		break;
	default:
		break;
	}

	const char *name = qvm_rule_names[e.rule];
	jb_kstr(&j, "rule", name, strlen(name));
	jb_knum(&j, "slot", e.slot);
	jb_knum(&j, "pid", e.pid);
	jb_knum(&j, "tgid", e.tgid);
	jb_kstr(&j, "comm", e.comm, sizeof(e.comm));
	jb_knum(&j, "target", e.target);
	jb_kstr(&j, "detail", detail, sizeof(detail));
	jb_kbool(&j, "enforced", e.enforced != 0);
	jb_knum(&j, "ktime_ns", e.ktime_ns);
	jb_raw(&j, "}", 1);
	jb_emit(&j, stdout);
	return 0;
}

static void report_lost(void)
{
	int ncpu = libbpf_num_possible_cpus();
	if (ncpu <= 0 || ncpu > 4096)
		return;
	unsigned long long *per_cpu = calloc((size_t)ncpu, sizeof(*per_cpu)), total = 0;
	__u32 zero = 0;
	if (!per_cpu)
		return;
	if (bpf_map_lookup_elem(lost_fd, &zero, per_cpu) == 0)
		for (int i = 0; i < ncpu; i++)
			total += per_cpu[i];
	free(per_cpu);
	if (total > lost_reported) {
		static char storage[128];
		struct jbuf j;
		lost_reported = total;
		jb_init(&j, storage, sizeof(storage));
		jb_raw(&j, "{", 1);
		jb_kstr(&j, "notice", "lost", 4);
		jb_knum(&j, "count", total);
		jb_raw(&j, "}", 1);
		jb_emit(&j, stdout);
	}
}

/* ---- map maintenance ---- */

/* Delete every key of a hash map whose u32 value is `slot`. Keys are collected first, then deleted, so the
 * iteration never restarts under our own deletions. Returns how many were deleted. */
static int sweep(int fd, size_t key_size, size_t max_entries, __u32 slot)
{
	unsigned char *keys = calloc(max_entries, key_size);
	unsigned char prev[QVM_PATH_BYTES], key[QVM_PATH_BYTES];
	size_t n = 0;
	__u32 value;
	int deleted = 0;
	void *prevp = NULL;

	if (!keys || key_size > sizeof(key))
		fatal("out_of_memory", ENOMEM, "sweeping a map");
	while (n < max_entries && bpf_map_get_next_key(fd, prevp, key) == 0) {
		if (bpf_map_lookup_elem(fd, key, &value) == 0 && value == slot)
			memcpy(keys + n++ * key_size, key, key_size);
		memcpy(prev, key, key_size);
		prevp = prev;
	}
	for (size_t i = 0; i < n; i++)
		if (bpf_map_delete_elem(fd, keys + i * key_size) == 0)
			deleted++;
	free(keys);
	return deleted;
}

/* Delete the `threads` entries whose process is no longer a member (after a sweep of `members`). */
static int sweep_threads(void)
{
	__u32 *keys = calloc(QVM_MAX_THREADS, sizeof(*keys)), key, prev, tgid, slot, *prevp = NULL;
	size_t n = 0;
	int deleted = 0;
	if (!keys)
		fatal("out_of_memory", ENOMEM, "sweeping the threads map");
	while (n < QVM_MAX_THREADS && bpf_map_get_next_key(threads_fd, prevp, &key) == 0) {
		if (bpf_map_lookup_elem(threads_fd, &key, &tgid) == 0 && bpf_map_lookup_elem(members_fd, &tgid, &slot) != 0)
			keys[n++] = key;
		prev = key;
		prevp = &prev;
	}
	for (size_t i = 0; i < n; i++)
		if (bpf_map_delete_elem(threads_fd, &keys[i]) == 0)
			deleted++;
	free(keys);
	return deleted;
}

/* How many entries a hash map has (bounded by `max_entries`). */
static __u32 count_entries(int fd, size_t key_size, size_t max_entries)
{
	unsigned char prev[QVM_PATH_BYTES], key[QVM_PATH_BYTES];
	void *prevp = NULL;
	__u32 n = 0;
	if (key_size > sizeof(key))
		return 0;
	while (n < max_entries && bpf_map_get_next_key(fd, prevp, key) == 0) {
		n++;
		memcpy(prev, key, key_size);
		prevp = prev;
	}
	return n;
}

/* The tracepoints' early exit: how many slots are live, how many paths protected. Called after every change
 * (a slot goes live before its VMM joins, so nothing it does is skipped). */
static void update_config(void)
{
	struct qvm_config cfg = {0, 0};
	struct qvm_slot st;
	__u32 zero = 0;
	for (__u32 s = 0; s < QVM_MAX_SLOTS; s++)
		if (bpf_map_lookup_elem(slots_fd, &s, &st) == 0 && st.live)
			cfg.live_slots++;
	cfg.paths = count_entries(paths_fd, sizeof(struct qvm_path_key), QVM_MAX_PATHS);
	if (bpf_map_update_elem(config_fd, &zero, &cfg, BPF_ANY) != 0)
		fatal("map_failed", errno, "config map: %s", strerror(errno));
}

struct proc_entry {
	__u32 pid, ppid;
};

/* The parent of `pid` from /proc/<pid>/stat ("pid (comm) state ppid ..."; comm may hold ') ' itself, so the
 * last ')' ends it). 0 when the process is gone. */
static __u32 parent_of(unsigned long pid)
{
	char path[64], buf[512];
	snprintf(path, sizeof(path), "/proc/%lu/stat", pid);
	FILE *f = fopen(path, "re");
	if (!f)
		return 0;
	size_t n = fread(buf, 1, sizeof(buf) - 1, f);
	fclose(f);
	buf[n] = 0;
	char *close = strrchr(buf, ')');
	unsigned long ppid;
	char state;
	if (!close || sscanf(close + 1, " %c %lu", &state, &ppid) != 2 || ppid > UINT32_MAX)
		return 0;
	return (__u32)ppid;
}

/* Processes the VMM forked before it was watched join too (the fork tracepoint covers the ones after).
 * A fixpoint over /proc's (pid, ppid) pairs: bounded by the number of processes. */
static int adopt_descendants(__u32 slot)
{
	size_t n = 0, cap = 1024;
	struct proc_entry *procs = malloc(cap * sizeof(*procs));
	DIR *d = opendir("/proc");
	struct dirent *de;
	int added = 0;

	if (!procs || !d) {
		free(procs);
		if (d)
			closedir(d);
		return 0;
	}
	while ((de = readdir(d)) != NULL && n < MAX_PROC_ENTRIES) {
		if (!isdigit((unsigned char)de->d_name[0]))
			continue;
		unsigned long pid = strtoul(de->d_name, NULL, 10);
		if (pid == (unsigned long)getpid())
			continue; /* never the guard itself */
		__u32 ppid = parent_of(pid);
		if (!ppid || pid > UINT32_MAX)
			continue;
		if (n == cap) {
			struct proc_entry *more = realloc(procs, cap * 2 * sizeof(*procs));
			if (!more)
				break;
			procs = more;
			cap *= 2;
		}
		procs[n].pid = (__u32)pid;
		procs[n].ppid = ppid;
		n++;
	}
	closedir(d);
	for (bool changed = true; changed;) {
		changed = false;
		for (size_t i = 0; i < n; i++) {
			__u32 value;
			if (bpf_map_lookup_elem(members_fd, &procs[i].pid, &value) == 0)
				continue;
			if (bpf_map_lookup_elem(members_fd, &procs[i].ppid, &value) == 0 && value == slot &&
			    bpf_map_update_elem(members_fd, &procs[i].pid, &slot, BPF_NOEXIST) == 0) {
				added++;
				changed = true; /* each pass adds at least one: at most n passes */
			}
		}
	}
	free(procs);
	return added;
}

/* ---- commands ---- */

static char reply_storage[1 << 20]; /* a full `status`: 1024 slots x 64 members */

static void reply_error(const char *cmd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void reply_error(const char *cmd, const char *fmt, ...)
{
	char msg[256];
	struct jbuf j;
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	jb_init(&j, reply_storage, sizeof(reply_storage));
	jb_raw(&j, "{", 1);
	jb_kstr(&j, "reply", "error", 5);
	jb_kstr(&j, "cmd", cmd, 16);
	jb_kstr(&j, "error", msg, sizeof(msg));
	jb_raw(&j, "}", 1);
	jb_emit(&j, stdout);
}

static void reply_ok(const char *cmd, const char *key, long long value)
{
	struct jbuf j;
	jb_init(&j, reply_storage, sizeof(reply_storage));
	jb_raw(&j, "{", 1);
	jb_kstr(&j, "reply", "ok", 2);
	jb_kstr(&j, "cmd", cmd, 16);
	if (key)
		jb_knum(&j, key, (unsigned long long)value);
	jb_raw(&j, "}", 1);
	jb_emit(&j, stdout);
}

/* A decimal number without sign or junk, at most `max`. */
static bool parse_num(const char *s, unsigned long long max, unsigned long long *out)
{
	char *end;
	if (!s || !isdigit((unsigned char)s[0]))
		return false;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 10);
	if (errno || *end || v > max)
		return false;
	*out = v;
	return true;
}

/* The threads (other than the main one) of the slot's member processes join `threads` (the fork tracepoint
 * covers the ones created from now on). A thread that exits while it is added may leave a stale entry: it is
 * checked once more after the insert. */
static int adopt_threads(__u32 slot)
{
	__u32 *tgids = calloc(QVM_MAX_MEMBERS, sizeof(*tgids)), key, prev, value, *prevp = NULL;
	size_t n = 0;
	int added = 0;
	if (!tgids)
		return 0;
	while (n < QVM_MAX_MEMBERS && bpf_map_get_next_key(members_fd, prevp, &key) == 0) {
		if (bpf_map_lookup_elem(members_fd, &key, &value) == 0 && value == slot)
			tgids[n++] = key;
		prev = key;
		prevp = &prev;
	}
	for (size_t i = 0; i < n; i++) {
		char dir[64], entry[96];
		snprintf(dir, sizeof(dir), "/proc/%u/task", tgids[i]);
		DIR *d = opendir(dir);
		struct dirent *de;
		if (!d)
			continue;
		for (int k = 0; k < QVM_MAX_THREADS && (de = readdir(d)) != NULL; k++) {
			unsigned long long tid;
			if (!parse_num(de->d_name, UINT32_MAX, &tid) || tid == tgids[i])
				continue;
			__u32 t = (__u32)tid;
			if (bpf_map_update_elem(threads_fd, &t, &tgids[i], BPF_NOEXIST) != 0)
				continue;
			snprintf(entry, sizeof(entry), "%s/%u", dir, t);
			if (access(entry, F_OK) != 0)
				bpf_map_delete_elem(threads_fd, &t);
			else
				added++;
		}
		closedir(d);
	}
	free(tgids);
	return added;
}

static bool slot_live(__u32 slot, struct qvm_slot *st)
{
	return bpf_map_lookup_elem(slots_fd, &slot, st) == 0 && st->live;
}

/* stat()'s st_dev (glibc's encoding) to the kernel's s_dev (MAJOR << 20 | MINOR). */
static __u64 kernel_dev(unsigned long long st_dev)
{
	return ((__u64)major(st_dev) << 20) | (minor(st_dev) & 0xfffff);
}

/* Whether `tgid` is this loader or one of its ancestors: watching it would put the guard itself (its bpf()
 * calls, its /proc reads) under the rules it enforces. */
static bool is_self_or_ancestor(__u32 tgid)
{
	unsigned long pid = (unsigned long)getpid();
	for (int depth = 0; depth < 256 && pid > 1; depth++) {
		if (pid == tgid)
			return true;
		pid = parent_of(pid);
	}
	return false;
}

static void cmd_watch(unsigned long long slot64, unsigned long long tgid64)
{
	__u32 slot = (__u32)slot64, tgid = (__u32)tgid64, other;
	struct qvm_slot st;
	if (tgid == 0 || (kill((pid_t)tgid, 0) < 0 && errno == ESRCH)) {
		reply_error("watch", "no process %u", tgid);
		return;
	}
	if (bpf_map_lookup_elem(agents_fd, &tgid, &other) == 0 || is_self_or_ancestor(tgid)) {
		reply_error("watch", "process %u is the agent or the guard itself", tgid);
		return;
	}
	if (slot_live(slot, &st)) {
		reply_error("watch", "slot %u already watches %u", slot, st.vmm_tgid);
		return;
	}
	if (bpf_map_lookup_elem(members_fd, &tgid, &other) == 0 && slot_live(other, &st)) {
		reply_error("watch", "process %u already belongs to slot %u", tgid, other);
		return;
	}
	/* Leftovers of an earlier use of this slot (a fork racing the last unwatch) must not join. */
	sweep(members_fd, sizeof(__u32), QVM_MAX_MEMBERS, slot);
	sweep_threads();
	sweep(files_fd, sizeof(struct qvm_file_key), QVM_MAX_FILES, slot);
	sweep(paths_fd, sizeof(struct qvm_path_key), QVM_MAX_PATHS, slot);
	st.vmm_tgid = tgid;
	st.live = 1;
	/* Live first (and counted, so the tracepoints look), then the VMM: from the moment it is a member, every
	 * fork and thread it makes is tracked, and the /proc walks after it find every one it made before. */
	if (bpf_map_update_elem(slots_fd, &slot, &st, BPF_ANY) != 0) {
		reply_error("watch", "slots map: %s", strerror(errno));
		return;
	}
	update_config();
	if (bpf_map_update_elem(members_fd, &tgid, &slot, BPF_ANY) != 0) {
		int e = errno;
		st.live = 0;
		bpf_map_update_elem(slots_fd, &slot, &st, BPF_ANY);
		update_config();
		reply_error("watch", "members map: %s", strerror(e));
		return;
	}
	int members = 1 + adopt_descendants(slot);
	int threads = adopt_threads(slot);
	struct jbuf j;
	jb_init(&j, reply_storage, sizeof(reply_storage));
	jb_raw(&j, "{", 1);
	jb_kstr(&j, "reply", "ok", 2);
	jb_kstr(&j, "cmd", "watch", 5);
	jb_knum(&j, "members", (unsigned long long)members);
	jb_knum(&j, "threads", (unsigned long long)threads);
	jb_raw(&j, "}", 1);
	jb_emit(&j, stdout);
}

static void cmd_unwatch(unsigned long long slot64)
{
	__u32 slot = (__u32)slot64;
	struct qvm_slot st = {0, 0};
	/* Dead first: from here on nothing of this slot counts, then the maps are swept. */
	if (bpf_map_update_elem(slots_fd, &slot, &st, BPF_ANY) != 0) {
		reply_error("unwatch", "slots map: %s", strerror(errno));
		return;
	}
	int members = sweep(members_fd, sizeof(__u32), QVM_MAX_MEMBERS, slot);
	sweep_threads();
	sweep(files_fd, sizeof(struct qvm_file_key), QVM_MAX_FILES, slot);
	sweep(paths_fd, sizeof(struct qvm_path_key), QVM_MAX_PATHS, slot);
	update_config();
	reply_ok("unwatch", "members", members);
}

static void cmd_protect(unsigned long long slot64, unsigned long long dev, unsigned long long ino)
{
	__u32 slot = (__u32)slot64, owner;
	struct qvm_slot st;
	struct qvm_file_key key = {kernel_dev(dev), ino};
	if (!slot_live(slot, &st)) {
		reply_error("protect", "slot %u is not watched", slot);
		return;
	}
	if (bpf_map_lookup_elem(files_fd, &key, &owner) == 0 && owner != slot && slot_live(owner, &st)) {
		reply_error("protect", "file already protected by slot %u", owner);
		return;
	}
	if (bpf_map_update_elem(files_fd, &key, &slot, BPF_ANY) != 0) {
		reply_error("protect", "files map: %s", strerror(errno));
		return;
	}
	reply_ok("protect", NULL, 0);
}

static int hex_digit(char c)
{
	return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
}

/* protectpath <slot> <hex>: an absolute path, at most QVM_PATH_BYTES - 1 bytes and no NUL, NUL-padded into
 * the `paths` key (observe mode matches the path an open names exactly against it). */
static void cmd_protectpath(unsigned long long slot64, const char *hex)
{
	__u32 slot = (__u32)slot64, owner;
	struct qvm_slot st;
	struct qvm_path_key key;
	size_t n = strlen(hex);
	memset(&key, 0, sizeof(key));
	if (n == 0 || n % 2 || n / 2 > sizeof(key.path) - 1) {
		reply_error("protectpath", "the path must be 1..%zu bytes, hex-encoded", sizeof(key.path) - 1);
		return;
	}
	for (size_t i = 0; i < n / 2; i++) {
		int hi = hex_digit(hex[2 * i]), lo = hex_digit(hex[2 * i + 1]);
		if (hi < 0 || lo < 0 || (hi == 0 && lo == 0)) {
			reply_error("protectpath", "not hex, or a NUL byte in the path");
			return;
		}
		key.path[i] = (char)(hi << 4 | lo);
	}
	if (key.path[0] != '/') {
		reply_error("protectpath", "not an absolute path");
		return;
	}
	if (!slot_live(slot, &st)) {
		reply_error("protectpath", "slot %u is not watched", slot);
		return;
	}
	if (bpf_map_lookup_elem(paths_fd, &key, &owner) == 0 && owner != slot && slot_live(owner, &st)) {
		reply_error("protectpath", "path already protected by slot %u", owner);
		return;
	}
	if (bpf_map_update_elem(paths_fd, &key, &slot, BPF_ANY) != 0) {
		reply_error("protectpath", "paths map: %s", strerror(errno));
		return;
	}
	update_config();
	reply_ok("protectpath", NULL, 0);
}

static void cmd_unprotect(unsigned long long slot64, const char *dev_s, const char *ino_s)
{
	__u32 slot = (__u32)slot64, owner;
	unsigned long long dev, ino;
	if (!dev_s) {
		int n = sweep(files_fd, sizeof(struct qvm_file_key), QVM_MAX_FILES, slot);
		sweep(paths_fd, sizeof(struct qvm_path_key), QVM_MAX_PATHS, slot);
		update_config();
		reply_ok("unprotect", "files", n);
		return;
	}
	if (!parse_num(dev_s, UINT64_MAX, &dev) || !parse_num(ino_s, UINT64_MAX, &ino)) {
		reply_error("unprotect", "usage: unprotect <slot> [<dev> <ino>]");
		return;
	}
	struct qvm_file_key key = {kernel_dev(dev), ino};
	int n = bpf_map_lookup_elem(files_fd, &key, &owner) == 0 && owner == slot &&
		bpf_map_delete_elem(files_fd, &key) == 0;
	reply_ok("unprotect", "files", n);
}

static int by_slot(const void *a, const void *b)
{
	const struct proc_entry *x = a, *y = b;
	return x->ppid < y->ppid ? -1 : x->ppid > y->ppid ? 1 : (x->pid > y->pid) - (x->pid < y->pid);
}

/* {"reply": "ok", "cmd": "status", "agents": [...], "slots": [{"slot": S, "vmm": T, "members": [...]}],
 *  "files": [[slot, dev, ino], ...]}: members cut at STATUS_MEMBERS a slot, files at STATUS_FILES. One pass
 * over each map (the members sorted by slot), so it stays cheap with every slot in use. */
static void cmd_status(void)
{
	struct jbuf j;
	__u32 key, value, *prevp = NULL, prev;
	size_t n = 0;
	struct proc_entry *all = calloc(QVM_MAX_MEMBERS, sizeof(*all)); /* .pid = tgid, .ppid = slot */
	if (!all) {
		reply_error("status", "out of memory");
		return;
	}
	while (n < QVM_MAX_MEMBERS && bpf_map_get_next_key(members_fd, prevp, &key) == 0) {
		if (bpf_map_lookup_elem(members_fd, &key, &value) == 0) {
			all[n].pid = key;
			all[n].ppid = value;
			n++;
		}
		prev = key;
		prevp = &prev;
	}
	qsort(all, n, sizeof(*all), by_slot);

	jb_init(&j, reply_storage, sizeof(reply_storage));
	jb_raw(&j, "{", 1);
	jb_kstr(&j, "reply", "ok", 2);
	jb_kstr(&j, "cmd", "status", 6);
	jb_kstr(&j, "mode", mode_names[active_mode], strlen(mode_names[active_mode]));
	jb_knum(&j, "threads", count_entries(threads_fd, sizeof(__u32), QVM_MAX_THREADS));
	jb_key(&j, "agents");
	jb_raw(&j, "[", 1);
	prevp = NULL;
	for (int i = 0; i < QVM_MAX_AGENTS && bpf_map_get_next_key(agents_fd, prevp, &key) == 0; i++) {
		jb_fmt(&j, i ? ", %u" : "%u", key);
		prev = key;
		prevp = &prev;
	}
	jb_raw(&j, "]", 1);
	jb_key(&j, "slots");
	jb_raw(&j, "[", 1);
	bool first_slot = true;
	size_t at = 0;
	for (__u32 s = 0; s < QVM_MAX_SLOTS; s++) {
		struct qvm_slot st;
		while (at < n && all[at].ppid < s)
			at++;
		if (!slot_live(s, &st))
			continue;
		jb_fmt(&j, "%s{\"slot\": %u, \"vmm\": %u, \"members\": [", first_slot ? "" : ", ", s, st.vmm_tgid);
		first_slot = false;
		for (int listed = 0; at < n && all[at].ppid == s; at++)
			if (listed < STATUS_MEMBERS)
				jb_fmt(&j, listed++ ? ", %u" : "%u", all[at].pid);
		jb_raw(&j, "]}", 2);
	}
	free(all);
	jb_raw(&j, "]", 1);
	jb_key(&j, "files");
	jb_raw(&j, "[", 1);
	struct qvm_file_key fkey, fprev, *fprevp = NULL;
	for (int listed = 0; listed < STATUS_FILES && bpf_map_get_next_key(files_fd, fprevp, &fkey) == 0;) {
		if (bpf_map_lookup_elem(files_fd, &fkey, &value) == 0)
			jb_fmt(&j, "%s[%u, %llu, %llu]", listed++ ? ", " : "", value, (unsigned long long)fkey.dev,
			       (unsigned long long)fkey.ino);
		fprev = fkey;
		fprevp = &fprev;
	}
	jb_raw(&j, "]", 1);
	jb_key(&j, "paths");
	jb_raw(&j, "[", 1);
	static struct qvm_path_key pkey, pprev;
	struct qvm_path_key *pprevp = NULL;
	for (int listed = 0; listed < STATUS_FILES && bpf_map_get_next_key(paths_fd, pprevp, &pkey) == 0;) {
		if (bpf_map_lookup_elem(paths_fd, &pkey, &value) == 0) {
			jb_fmt(&j, "%s[%u, ", listed++ ? ", " : "", value);
			jb_str(&j, pkey.path, sizeof(pkey.path));
			jb_raw(&j, "]", 1);
		}
		pprev = pkey;
		pprevp = &pprev;
	}
	jb_raw(&j, "]}", 2);
	if (j.overflow) {
		reply_error("status", "too much to list");
		return;
	}
	jb_emit(&j, stdout);
}

static void run_command(char *line)
{
	char *save = NULL, *argv[5] = {0};
	int argc = 0;
	unsigned long long a, b, c;
	for (char *tok = strtok_r(line, " \t\r", &save); tok && argc < 5; tok = strtok_r(NULL, " \t\r", &save))
		argv[argc++] = tok;
	if (argc == 0)
		return;
	const char *cmd = argv[0];
	if (strcmp(cmd, "watch") == 0 && argc == 3 && parse_num(argv[1], QVM_MAX_SLOTS - 1, &a) &&
	    parse_num(argv[2], UINT32_MAX, &b))
		cmd_watch(a, b);
	else if (strcmp(cmd, "unwatch") == 0 && argc == 2 && parse_num(argv[1], QVM_MAX_SLOTS - 1, &a))
		cmd_unwatch(a);
	else if (strcmp(cmd, "agent") == 0 && argc == 2 && parse_num(argv[1], UINT32_MAX, &a) && a > 0) {
		__u32 tgid = (__u32)a, one = 1;
		if (bpf_map_update_elem(agents_fd, &tgid, &one, BPF_ANY) != 0)
			reply_error("agent", "agents map: %s", strerror(errno));
		else
			reply_ok("agent", NULL, 0);
	} else if (strcmp(cmd, "protectpath") == 0 && argc == 3 && parse_num(argv[1], QVM_MAX_SLOTS - 1, &a))
		cmd_protectpath(a, argv[2]);
	else if (strcmp(cmd, "protect") == 0 && argc == 4 && parse_num(argv[1], QVM_MAX_SLOTS - 1, &a) &&
		   parse_num(argv[2], UINT64_MAX, &b) && parse_num(argv[3], UINT64_MAX, &c))
		cmd_protect(a, b, c);
	else if (strcmp(cmd, "unprotect") == 0 && (argc == 2 || argc == 4) &&
		 parse_num(argv[1], QVM_MAX_SLOTS - 1, &a))
		cmd_unprotect(a, argc == 4 ? argv[2] : NULL, argc == 4 ? argv[3] : NULL);
	else if (strcmp(cmd, "status") == 0 && argc == 1)
		cmd_status();
	else if (strcmp(cmd, "quit") == 0 && argc == 1)
		stop_requested = 1;
	else
		reply_error(cmd, "bad command (usage: watch S T | unwatch S | agent T | protect S DEV INO | "
				 "protectpath S HEX | unprotect S [DEV INO] | status | quit)");
}

/* ---- main loop ---- */

static void on_signal(int sig)
{
	(void)sig;
	stop_requested = 1;
}

int main(int argc, char **argv)
{
	static char line[MAX_LINE];
	size_t line_len = 0;
	bool discarding = false; /* inside an over-long line: drop it up to its newline */
	int attached = 0, loaded_only = 0;
	enum mode mode = MODE_AUTO;
	const char *path = NULL;

	int first = 1;
	if (argc == 4 && strcmp(argv[1], "--mode") == 0) {
		first = 3;
		mode = (enum mode)-1;
		for (int k = 0; k < (int)(sizeof(mode_names) / sizeof(mode_names[0])); k++)
			if (strcmp(argv[2], mode_names[k]) == 0)
				mode = (enum mode)k;
	}
	if (argc == first + 1 && (int)mode >= 0 && argv[first][0] != '-')
		path = argv[first];
	if (!path) {
		fputs("{\"error\": \"usage: qvm-guard-loader [--mode auto|enforce|observe|verify] <guard.bpf.o>\", "
		      "\"reason\": \"usage\"}\n", stderr);
		return 2;
	}
	/* Die with the agent even if stdin is somehow kept open elsewhere. */
	prctl(PR_SET_PDEATHSIG, SIGTERM);
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal; /* no SA_RESTART: poll() returns EINTR and the loop sees the flag */
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);
	setvbuf(stdout, NULL, _IOFBF, 1 << 16); /* jb_emit flushes after each whole line */
	libbpf_set_print(on_libbpf_print);

	load_and_attach(path, &mode, &attached, &loaded_only);
	active_mode = mode;
	rb = ring_buffer__new(bpf_map__fd(bpf_object__find_map_by_name(obj, "events")), on_event, NULL, NULL);
	if (!rb)
		fatal("ringbuf_failed", errno, "ring buffer: %s", strerror(errno));
	update_config();

	{
		struct jbuf j;
		static char storage[4096];
		jb_init(&j, storage, sizeof(storage));
		jb_raw(&j, "{", 1);
		jb_kbool(&j, "ready", true);
		jb_kstr(&j, "mode", mode_names[mode], strlen(mode_names[mode]));
		jb_knum(&j, "attached", (unsigned long long)attached);
		jb_knum(&j, "loaded_only", (unsigned long long)loaded_only);
		jb_key(&j, "absent");
		jb_raw(&j, "[", 1);
		for (int i = 0; i < nabsent; i++) {
			if (i)
				jb_raw(&j, ", ", 2);
			jb_str(&j, absent[i], sizeof(absent[i]));
		}
		jb_raw(&j, "]", 1);
		if (fallback[0])
			jb_kstr(&j, "fallback", fallback, sizeof(fallback));
		jb_raw(&j, "}", 1);
		jb_emit(&j, stdout);
	}
	if (mode == MODE_VERIFY)
		stop_requested = 1; /* the verifier's verdict is all verify mode is for */

	struct pollfd pfd[2] = {{.fd = STDIN_FILENO, .events = POLLIN}, {.fd = ring_buffer__epoll_fd(rb), .events = POLLIN}};
	while (!stop_requested) {
		int n = poll(pfd, 2, 1000);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			fatal("poll_failed", errno, "poll: %s", strerror(errno));
		}
		/* Events first: what happened before a command was read is reported before its reply. */
		if (pfd[1].revents)
			ring_buffer__consume(rb);
		report_lost();
		if (!pfd[0].revents)
			continue;
		char buf[4096];
		ssize_t got = read(STDIN_FILENO, buf, sizeof(buf));
		if (got < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			break;
		}
		if (got == 0)
			break; /* EOF: the agent closed our stdin */
		for (ssize_t i = 0; i < got && !stop_requested; i++) {
			char ch = buf[i];
			if (ch == '\n') {
				if (discarding)
					reply_error("?", "command longer than %d bytes", MAX_LINE - 1);
				else {
					line[line_len] = 0;
					ring_buffer__consume(rb);
					run_command(line);
				}
				line_len = 0;
				discarding = false;
			} else if (!discarding) {
				if (line_len < sizeof(line) - 1)
					line[line_len++] = ch;
				else
					discarding = true;
			}
		}
	}
	ring_buffer__consume(rb);
	ring_buffer__free(rb);
	for (int i = 0; i < nlinks; i++)
		bpf_link__destroy(links[i]);
	bpf_object__close(obj);
	return 0;
}
