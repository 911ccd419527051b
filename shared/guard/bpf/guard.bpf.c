// SPDX-License-Identifier: GPL-2.0
/*
 * qvm runtime guard: BPF programs that keep the host and a marketplace job's VMM apart while the job runs.
 *
 * One object, three groups of programs; the loader (loader.c) picks the mode and loads only what it needs
 * (bpf_program__set_autoload), so one build, and one digest, covers both modes:
 *
 *   tp_btf/...      process tree tracking (sched_process_fork/exit): both modes.
 *   lsm/...         enforce mode: BPF LSM hooks. A rule marked enforced returns -EPERM (the syscall fails).
 *   tracepoint/...  observe mode, for kernels that refuse BPF LSM (and fentry) programs: syscall and sched
 *                   tracepoints that see the same things a little less precisely (by syscall arguments rather
 *                   than the kernel's resolved objects) and deny nothing; every finding says enforced = false.
 *
 * What is watched lives in this object's own maps, filled by its loader from the node-agent's commands. Two
 * loaders on one host (two agents, two pytest workers) each load their own copy of these maps, so each one
 * only ever judges and reports the VMMs it was told about.
 *
 *   members   tgid -> slot     every process of a watched instance: the VMM itself (`watch`) and every
 *                              process forked from one (sched_process_fork); removed when the last thread of
 *                              the process exits (sched_process_exit). Process trees, not cgroup ids: the
 *                              hosts run the cgroup v1 hierarchy too.
 *   threads   tid -> tgid      every other thread of a member process (observe mode resolves the pid a
 *                              syscall names, which may be any thread's, to its process).
 *   slots     slot -> state    array: the VMM's tgid and whether the slot is live (a slot being unwatched
 *                              stops counting at once, before its members are swept out).
 *   agents    tgid -> 1        the node-agent (and nothing else): may read its VMMs and their files.
 *   files     (dev, ino) -> slot   the instance's protected files (enforce mode: file_open by inode).
 *   paths     path -> slot     the same files by absolute path (observe mode: openat by name).
 *   guard_config [0]           how many slots are live and paths protected: the tracepoints' early exit.
 *   events    ring buffer of struct qvm_event for the loader.
 *   lost      per-CPU count of events the ring buffer had no room for (the verdict still holds).
 *
 * Every program is O(1) in what is watched: a few hash lookups, no loops over maps. The only loops are the
 * short, unrolled ones over a /proc path's digits. Rule numbers and whether a rule denies come from rules.h,
 * generated from rules.py.
 */
#ifdef QVM_GUARD_ABI_ONLY
/* loader.c includes this file for the shared definitions below only (one definition, two compilers). */
#include <linux/types.h>
#else
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#endif

#include "rules.h"

/* ---- ABI shared with loader.c: map sizes, map values, the event record ---- */

#define QVM_MAX_MEMBERS 65536 /* processes in all watched instances together */
#define QVM_MAX_THREADS 131072 /* their other threads */
#define QVM_MAX_SLOTS 1024 /* instances at once; slot numbers are 0..QVM_MAX_SLOTS-1 */
#define QVM_MAX_AGENTS 16
#define QVM_MAX_FILES 16384
#define QVM_MAX_PATHS 4096
#define QVM_PATH_BYTES 128 /* a protected path: at most 127 bytes, NUL-padded (the `paths` key) */
#define QVM_DETAIL_BYTES 128
#define QVM_SOCKADDR_BYTES 110 /* sizeof(struct sockaddr_un), the largest address connect() reports */

/* qvm_event.flags */
#define QVM_EVENT_RAW_SOCKADDR 0x1 /* detail holds the first (arg >> 16) bytes of a sockaddr, not a string */
#define QVM_EVENT_MEMBERS_FULL 0x2 /* rule 0: a forked process (or thread) could not join its instance */
#define QVM_EVENT_OBSERVED 0x4 /* from an observe-mode tracepoint: detail names the syscall or the path */
#define QVM_EVENT_REQUEST 0x8 /* arg >> 32 is the ptrace request */

/* qvm_event.arg of vmm_ptrace for PTRACE_TRACEME (the other ptrace events carry the ptrace mode) */
#define QVM_ARG_TRACEME 0x10000

struct qvm_slot {
	__u32 vmm_tgid;
	__u32 live; /* 0 while the slot is being (un)watched: its members and files do not count */
};

struct qvm_file_key {
	__u64 dev; /* the kernel's encoding (MAJOR << 20 | MINOR), not stat()'s: the loader converts */
	__u64 ino;
};

struct qvm_path_key {
	char path[QVM_PATH_BYTES];
};

struct qvm_config {
	__u32 live_slots;
	__u32 paths;
};

struct qvm_event {
	__u64 ktime_ns; /* bpf_ktime_get_ns(): CLOCK_MONOTONIC, comparable with time.monotonic_ns() */
	__u64 arg; /* rule-specific number (ptrace mode, bpf cmd, mount flags, ...) */
	__u32 rule;
	__u32 slot;
	__u32 pid; /* the acting thread */
	__u32 tgid; /* its process */
	__u32 target; /* the process acted on, where there is one (else 0) */
	__u32 enforced;
	__u32 flags;
	__u32 pad;
	char comm[16];
	char detail[QVM_DETAIL_BYTES];
};

#ifndef QVM_GUARD_ABI_ONLY

char LICENSE[] SEC("license") = "GPL";

#define EPERM 1

/* The BPF side's own size checks on the shared record (the loader checks the same from its side). */
_Static_assert(sizeof(struct qvm_event) == 48 + 16 + QVM_DETAIL_BYTES, "qvm_event layout");
_Static_assert(QVM_PATH_BYTES <= QVM_DETAIL_BYTES, "a path fits the detail");

/* ptrace_may_access() mode bits (include/linux/ptrace.h; not in BTF, they are #defines). */
#define PTRACE_MODE_READ 0x01
#define PTRACE_MODE_ATTACH 0x02
#define PTRACE_MODE_NOAUDIT 0x04

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, QVM_MAX_MEMBERS);
	__type(key, __u32);
	__type(value, __u32);
} members SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, QVM_MAX_THREADS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, __u32);
} threads SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, QVM_MAX_SLOTS);
	__type(key, __u32);
	__type(value, struct qvm_slot);
} slots SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, QVM_MAX_AGENTS);
	__type(key, __u32);
	__type(value, __u32);
} agents SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, QVM_MAX_FILES);
	__type(key, struct qvm_file_key);
	__type(value, __u32);
} files SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, QVM_MAX_PATHS);
	__type(key, struct qvm_path_key);
	__type(value, __u32);
} paths SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct qvm_config);
} guard_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} lost SEC(".maps");

/* The live slot a tgid belongs to, or -1. A member of a slot being unwatched no longer counts. */
static __always_inline int slot_of(__u32 tgid)
{
	__u32 *slot = bpf_map_lookup_elem(&members, &tgid);
	if (!slot)
		return -1;
	__u32 s = *slot;
	struct qvm_slot *st = bpf_map_lookup_elem(&slots, &s);
	if (!st || !st->live)
		return -1;
	return (int)s;
}

static __always_inline __u32 current_tgid(void)
{
	return (__u32)(bpf_get_current_pid_tgid() >> 32);
}

static __always_inline bool is_agent(__u32 tgid)
{
	return bpf_map_lookup_elem(&agents, &tgid) != NULL;
}

/* The member process a task id (a tgid, or any of its threads' ids) belongs to: its tgid, or 0. */
static __always_inline __u32 member_of(__u32 tid)
{
	if (bpf_map_lookup_elem(&members, &tid))
		return tid;
	__u32 *tgid = bpf_map_lookup_elem(&threads, &tid);
	return tgid ? *tgid : 0;
}

/* The tracepoints' early exit: nothing watched, nothing to look at (one array lookup, inlined). */
static __always_inline struct qvm_config *watching(void)
{
	__u32 zero = 0;
	struct qvm_config *c = bpf_map_lookup_elem(&guard_config, &zero);
	return c && c->live_slots ? c : NULL;
}

/*
 * Reserve an event with the common fields filled; NULL when the ring buffer is full (counted in `lost`).
 * The caller fills `detail` and submits. A full ring buffer never changes a verdict.
 */
static __always_inline struct qvm_event *event(__u32 rule, __u32 enforced, __u32 slot, __u32 target, __u64 arg)
{
	struct qvm_event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		__u32 zero = 0;
		__u64 *n = bpf_map_lookup_elem(&lost, &zero);
		if (n)
			*n += 1;
		return NULL;
	}
	__u64 id = bpf_get_current_pid_tgid();
	e->ktime_ns = bpf_ktime_get_ns();
	e->rule = rule;
	e->slot = slot;
	e->pid = (__u32)id;
	e->tgid = (__u32)(id >> 32);
	e->target = target;
	e->enforced = enforced;
	e->arg = arg;
	e->flags = 0;
	e->pad = 0;
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	e->detail[0] = 0;
	return e;
}

/* Report with a kernel string as detail (a NULL or unreadable string leaves it empty) and give the verdict. */
static __always_inline int report_str(__u32 rule, __u32 enforced, __u32 slot, __u32 target, __u64 arg,
				      const char *str)
{
	struct qvm_event *e = event(rule, enforced, slot, target, arg);
	if (e) {
		if (str && bpf_probe_read_kernel_str(e->detail, sizeof(e->detail), str) < 0)
			e->detail[0] = 0;
		bpf_ringbuf_submit(e, 0);
	}
	return enforced ? -EPERM : 0;
}

/* An observe-mode finding (never enforced) with a kernel string (a constant, a buffer of ours) or, with
 * `user`, a string in the caller's memory as detail. */
static __always_inline int observe_str(__u32 rule, __u32 slot, __u32 target, __u64 arg, __u32 flags,
				       const char *str, bool user)
{
	struct qvm_event *e = event(rule, 0, slot, target, arg);
	if (e) {
		long n = 0;
		if (str)
			n = user ? bpf_probe_read_user_str(e->detail, sizeof(e->detail), str)
				 : bpf_probe_read_kernel_str(e->detail, sizeof(e->detail), str);
		if (n < 0)
			e->detail[0] = 0;
		e->flags = QVM_EVENT_OBSERVED | flags;
		bpf_ringbuf_submit(e, 0);
	}
	return 0;
}

/*
 * LSM_HOOK(name): the section of a BPF LSM program. The check-only build (QVM_VERIFY_ONLY, build.py's
 * verify_only=True, for kernels that refuse BPF LSM programs) compiles the same bodies as target-less raw
 * tracepoint programs, which the loader's verify mode loads (the verifier checks every one) and never attaches.
 */
#ifdef QVM_VERIFY_ONLY
#define LSM_HOOK(name) SEC("raw_tp")
#else
#define LSM_HOOK(name) SEC("lsm/" #name)
#endif

/* The rule's number and whether it denies, from rules.h: RULE(VMM_EXEC) -> QVM_RULE_VMM_EXEC, QVM_ENFORCE_... */
#define RULE(name) QVM_RULE_##name, QVM_ENFORCE_##name
/* The rule's number for an observe-mode program (which never denies). */
#define OBSERVE(name) QVM_RULE_##name

/* ---- process tree tracking (both modes) ---- */

/* A process forked by a member joins its instance; a thread created by one joins `threads`. Runs before the
 * child is first woken, so the child never runs unwatched. */
SEC("tp_btf/sched_process_fork")
int BPF_PROG(qvm_fork, struct task_struct *parent, struct task_struct *child)
{
	__u32 ptgid = BPF_CORE_READ(parent, tgid);
	int slot = slot_of(ptgid);
	if (slot < 0)
		return 0;
	__u32 s = (__u32)slot;
	__u32 ctgid = BPF_CORE_READ(child, tgid);
	struct qvm_event *e;
	if (ptgid == ctgid) {
		__u32 tid = BPF_CORE_READ(child, pid);
		if (bpf_map_update_elem(&threads, &tid, &ptgid, BPF_ANY) == 0)
			return 0;
		ctgid = tid; /* reported below as not tracked */
	} else if (bpf_map_update_elem(&members, &ctgid, &s, BPF_ANY) == 0) {
		report_str(RULE(VMM_FORK), s, ctgid, 0, NULL);
		return 0;
	}
	/* A full map must not let the child escape unnoticed: it stays unwatched, but say so. */
	e = event(0, 0, s, ctgid, 0);
	if (e) {
		e->flags = QVM_EVENT_MEMBERS_FULL;
		bpf_ringbuf_submit(e, 0);
	}
	return 0;
}

/* A thread of a member leaves `threads`; a process leaves its instance when its last thread exits
 * (signal->live already dropped to 0 here). */
SEC("tp_btf/sched_process_exit")
int BPF_PROG(qvm_exit, struct task_struct *p)
{
	__u32 tgid = BPF_CORE_READ(p, tgid);
	if (!bpf_map_lookup_elem(&members, &tgid))
		return 0;
	__u32 tid = BPF_CORE_READ(p, pid);
	if (tid != tgid)
		bpf_map_delete_elem(&threads, &tid);
	if (BPF_CORE_READ(p, signal, live.counter) != 0)
		return 0;
	bpf_map_delete_elem(&members, &tgid);
	return 0;
}

/* ==== enforce mode: BPF LSM hooks ==== */

/* ---- the VMM must not become something else ---- */

LSM_HOOK(bprm_check_security)
int BPF_PROG(qvm_exec, struct linux_binprm *bprm)
{
	int slot = slot_of(current_tgid());
	if (slot < 0)
		return 0;
	return report_str(RULE(VMM_EXEC), slot, 0, 0, BPF_CORE_READ(bprm, filename));
}

/*
 * ptrace_may_access(): PTRACE_ATTACH, /proc/<pid>/mem, process_vm_readv/writev, /proc/<pid>/{maps,environ,
 * fd,...}. The kernel skips this hook within one thread group. A VMM task may trace nothing (vmm_ptrace); a
 * VMM may be inspected only by the agent or its own instance (host_ptrace_vmm). NOAUDIT checks (the wchan
 * and stack fields of /proc/<pid>/stat that every `ps` reads) are denied silently: hiding two fields is
 * harmless, reporting every `ps` would drown the real findings.
 */
LSM_HOOK(ptrace_access_check)
int BPF_PROG(qvm_ptrace, struct task_struct *child, unsigned int mode)
{
	__u32 me = current_tgid();
	__u32 target = BPF_CORE_READ(child, tgid);
	int mine = slot_of(me);
	if (mine >= 0) {
		if (mode & PTRACE_MODE_NOAUDIT)
			return QVM_ENFORCE_VMM_PTRACE ? -EPERM : 0;
		return report_str(RULE(VMM_PTRACE), mine, target, mode, NULL);
	}
	int theirs = slot_of(target);
	if (theirs < 0 || is_agent(me))
		return 0;
	/* Read-level checks (environ, maps, fd links: `ps -e` opens /proc/<pid>/environ for every process) are
	 * denied without a report: the host learns nothing of the VMM, and ordinary tools do not revoke the
	 * node. Attach-level ones (mem, ptrace, process_vm_readv/writev) are the hoster reaching in: reported. */
	if ((mode & PTRACE_MODE_NOAUDIT) || !(mode & PTRACE_MODE_ATTACH))
		return QVM_ENFORCE_HOST_PTRACE_VMM ? -EPERM : 0;
	return report_str(RULE(HOST_PTRACE_VMM), theirs, target, mode, NULL);
}

/* PTRACE_TRACEME: a VMM task asking its parent to trace it. */
LSM_HOOK(ptrace_traceme)
int BPF_PROG(qvm_traceme, struct task_struct *parent)
{
	int slot = slot_of(current_tgid());
	if (slot < 0)
		return 0;
	return report_str(RULE(VMM_PTRACE), slot, BPF_CORE_READ(parent, tgid), QVM_ARG_TRACEME, NULL);
}

LSM_HOOK(sb_mount)
int BPF_PROG(qvm_mount, const char *dev_name, const struct path *path, const char *type, unsigned long flags)
{
	int slot = slot_of(current_tgid());
	if (slot < 0)
		return 0;
	return report_str(RULE(VMM_MOUNT), slot, 0, flags, type);
}

LSM_HOOK(move_mount)
int BPF_PROG(qvm_move_mount, const struct path *from_path, const struct path *to_path)
{
	int slot = slot_of(current_tgid());
	if (slot < 0)
		return 0;
	return report_str(RULE(VMM_MOUNT), slot, 0, 0, "move_mount");
}

LSM_HOOK(bpf)
int BPF_PROG(qvm_bpf, int cmd)
{
	int slot = slot_of(current_tgid());
	if (slot < 0)
		return 0;
	return report_str(RULE(VMM_BPF), slot, 0, (__u64)cmd, NULL);
}

/* request_module() runs in the context of the task whose syscall needs the module (e.g. socket(AF_...)). */
LSM_HOOK(kernel_module_request)
int BPF_PROG(qvm_modreq, char *kmod_name)
{
	int slot = slot_of(current_tgid());
	if (slot < 0)
		return 0;
	return report_str(RULE(VMM_MODULE), slot, 0, 0, kmod_name);
}

/* init_module (module) and kexec_file_load/kexec_load (kexec) from a buffer. */
LSM_HOOK(kernel_load_data)
int BPF_PROG(qvm_load_data, enum kernel_load_data_id id)
{
	int slot = slot_of(current_tgid());
	if (slot < 0)
		return 0;
	if (id == bpf_core_enum_value(enum kernel_load_data_id, LOADING_MODULE))
		return report_str(RULE(VMM_MODULE), slot, 0, id, "init_module");
	if (id == bpf_core_enum_value(enum kernel_load_data_id, LOADING_KEXEC_IMAGE) ||
	    id == bpf_core_enum_value(enum kernel_load_data_id, LOADING_KEXEC_INITRAMFS))
		return report_str(RULE(VMM_KEXEC), slot, 0, id, "kexec_load");
	return 0;
}

/* finit_module and kexec_file_load read their image from a file. */
LSM_HOOK(kernel_read_file)
int BPF_PROG(qvm_read_file, struct file *file, enum kernel_read_file_id id)
{
	int slot = slot_of(current_tgid());
	if (slot < 0)
		return 0;
	const unsigned char *name = BPF_CORE_READ(file, f_path.dentry, d_name.name);
	if (id == bpf_core_enum_value(enum kernel_read_file_id, READING_MODULE))
		return report_str(RULE(VMM_MODULE), slot, 0, id, (const char *)name);
	if (id == bpf_core_enum_value(enum kernel_read_file_id, READING_KEXEC_IMAGE) ||
	    id == bpf_core_enum_value(enum kernel_read_file_id, READING_KEXEC_INITRAMFS))
		return report_str(RULE(VMM_KEXEC), slot, 0, id, (const char *)name);
	return 0;
}

/* setuid()/setresuid()/...: observed. arg = old euid << 32 | new euid. */
LSM_HOOK(task_fix_setuid)
int BPF_PROG(qvm_setuid, struct cred *new, const struct cred *old)
{
	int slot = slot_of(current_tgid());
	if (slot < 0)
		return 0;
	__u64 before = BPF_CORE_READ(old, euid.val);
	__u64 after = BPF_CORE_READ(new, euid.val);
	return report_str(RULE(VMM_SETUID), slot, 0, before << 32 | after, NULL);
}

/* connect(): observed; the raw sockaddr goes in `detail` (the loader formats inet / inet6 / unix). */
LSM_HOOK(socket_connect)
int BPF_PROG(qvm_connect, struct socket *sock, struct sockaddr *address, int addrlen)
{
	int slot = slot_of(current_tgid());
	if (slot < 0)
		return 0;
	__u16 family = BPF_CORE_READ(address, sa_family);
	/* Copy only the addrlen bytes the caller gave: the rest of the kernel's sockaddr_storage is stale stack. */
	__u32 len = addrlen > 0 ? (__u32)addrlen : 0;
	if (len > QVM_SOCKADDR_BYTES)
		len = QVM_SOCKADDR_BYTES;
	struct qvm_event *e = event(RULE(VMM_CONNECT), slot, 0, (__u64)family | (__u64)len << 16);
	if (e) {
		/* The mask changes nothing (len <= 110), but behind the barrier the compiler cannot drop it, and the
		 * verifier sees a register bounded to 0..127 (the clamp above alone it does not follow). */
		barrier_var(len);
		len &= 0x7f;
		if (len == 0 || bpf_probe_read_kernel(e->detail, len, address) < 0)
			e->arg = family;
		e->flags = QVM_EVENT_RAW_SOCKADDR;
		bpf_ringbuf_submit(e, 0);
	}
	return QVM_ENFORCE_VMM_CONNECT ? -EPERM : 0;
}

/* ---- the instance's files ---- */

/* Every open() on the host passes here: one hash lookup on (dev, inode), nothing more unless it is protected. */
LSM_HOOK(file_open)
int BPF_PROG(qvm_file_open, struct file *file)
{
	struct qvm_file_key key = {};
	struct inode *inode = BPF_CORE_READ(file, f_inode);
	key.dev = BPF_CORE_READ(inode, i_sb, s_dev);
	key.ino = BPF_CORE_READ(inode, i_ino);
	__u32 *owner = bpf_map_lookup_elem(&files, &key);
	if (!owner)
		return 0;
	__u32 s = *owner;
	struct qvm_slot *st = bpf_map_lookup_elem(&slots, &s);
	if (!st || !st->live)
		return 0;
	__u32 me = current_tgid();
	if (is_agent(me) || slot_of(me) == (int)s)
		return 0;
	const unsigned char *name = BPF_CORE_READ(file, f_path.dentry, d_name.name);
	return report_str(RULE(HOST_READS_INSTANCE_FILE), s, st->vmm_tgid, key.ino, (const char *)name);
}

/*
 * ==== observe mode: tracepoints ====
 *
 * For kernels where BPF LSM programs cannot attach. Syscall tracepoints fire on entry, before the kernel
 * resolved anything: a pid is the number the caller passed, a path the string it passed. What that cannot
 * see (the known gaps; enforce mode, which judges the kernel's resolved objects, has none of them):
 *   - /proc/<pid>/... is matched on the path as written, absolute and canonical: a relative path (cwd in
 *     /proc/<pid>), openat() relative to a directory fd, `//`, `.`/`..` components, symlinks to /proc, or a
 *     procfs mounted elsewhere are not seen. Only mem, pagemap, fd/<n>, map_files/<range> (also under
 *     task/<tid>/) are watched; environ (every `ps` opens it), readlink() of fd links, maps, stat and the
 *     other ptrace-checked files are not.
 *   - protected files are matched by their absolute path(s) as given to `protectpath`: relative paths, hard
 *     links, bind mounts, /proc/<pid>/fd/<n> re-opens, open_by_handle_at and any other name of the same file
 *     are not seen.
 *   - pids are read in the caller's pid namespace and compared with the host's: a caller inside another pid
 *     namespace is not resolved.
 *   - the syscall may still fail (a finding says what was attempted, not that it worked), and module/kexec
 *     syscalls exist only where the kernel has them (the loader reports absent tracepoints).
 */

/* ---- the VMM must not become something else ---- */

/* After a successful exec (the VMM's own first exec happened before `watch`, so it is never reported). */
SEC("tracepoint/sched/sched_process_exec")
int qvm_tp_exec(struct trace_event_raw_sched_process_exec *ctx)
{
	if (!watching())
		return 0;
	__u32 me = current_tgid();
	int slot = slot_of(me);
	if (slot < 0)
		return 0;
	/* A non-leader thread that exec'd took over the leader's pid: its old id is no thread any more. */
	__u32 old = (__u32)ctx->old_pid;
	if (old != me)
		bpf_map_delete_elem(&threads, &old);
	struct qvm_event *e = event(OBSERVE(VMM_EXEC), 0, slot, 0, 0);
	if (e) {
		__u32 off = ctx->__data_loc_filename & 0xffff;
		if (bpf_probe_read_kernel_str(e->detail, sizeof(e->detail), (void *)ctx + off) < 0)
			bpf_get_current_comm(e->detail, sizeof(e->detail));
		e->flags = QVM_EVENT_OBSERVED;
		bpf_ringbuf_submit(e, 0);
	}
	return 0;
}

/*
 * Task `me` reaches into task id `tid` (ptrace, process_vm_readv/writev, /proc/<tid>/...): a VMM task reaching
 * out of its own process is vmm_ptrace; a host task other than the agent reaching into a watched process is
 * host_ptrace_vmm. `arg`: PTRACE_MODE_ATTACH or _READ (| request << 32 with QVM_EVENT_REQUEST).
 */
static __always_inline int reach(__u32 tid, __u64 arg, __u32 flags, const char *what)
{
	__u32 me = current_tgid();
	__u32 target = member_of(tid);
	int mine = slot_of(me);
	if (mine >= 0) {
		if (target == me)
			return 0; /* its own threads: not a ptrace access */
		return observe_str(OBSERVE(VMM_PTRACE), mine, target ? target : tid, arg, flags, what, false);
	}
	if (!target)
		return 0;
	int theirs = slot_of(target);
	if (theirs < 0 || is_agent(me))
		return 0;
	return observe_str(OBSERVE(HOST_PTRACE_VMM), theirs, target, arg, flags, what, false);
}

/* ptrace(request, pid, ...): every request naming a watched task (attaching is the first of them). */
SEC("tracepoint/syscalls/sys_enter_ptrace")
int qvm_tp_ptrace(struct trace_event_raw_sys_enter *ctx)
{
	if (!watching())
		return 0;
	long request = (long)ctx->args[0];
	if (request == 0) { /* PTRACE_TRACEME: the pid is ignored, the parent becomes the tracer */
		int slot = slot_of(current_tgid());
		if (slot < 0)
			return 0;
		struct task_struct *task = (struct task_struct *)bpf_get_current_task();
		__u32 parent = BPF_CORE_READ(task, real_parent, tgid);
		return observe_str(OBSERVE(VMM_PTRACE), slot, parent, QVM_ARG_TRACEME, 0, "ptrace", false);
	}
	return reach((__u32)ctx->args[1], PTRACE_MODE_ATTACH | (__u64)(__u32)request << 32, QVM_EVENT_REQUEST,
		     "ptrace");
}

SEC("tracepoint/syscalls/sys_enter_process_vm_readv")
int qvm_tp_vm_readv(struct trace_event_raw_sys_enter *ctx)
{
	if (!watching())
		return 0;
	return reach((__u32)ctx->args[0], PTRACE_MODE_ATTACH, 0, "process_vm_readv");
}

SEC("tracepoint/syscalls/sys_enter_process_vm_writev")
int qvm_tp_vm_writev(struct trace_event_raw_sys_enter *ctx)
{
	if (!watching())
		return 0;
	return reach((__u32)ctx->args[0], PTRACE_MODE_ATTACH, 0, "process_vm_writev");
}

/* ---- opens: /proc/<pid>/mem and friends, protected paths ---- */

/* Whether `s` starts with the `n` bytes of `lit` (n and lit constants, n <= 10: folded into n compares at
 * constant offsets; spelled out, as clang turns a loop of this shape into a bcmp() call BPF does not have). */
#define QVM_BYTE_EQ(k) (n <= (k) || s[k] == lit[k])
static __always_inline bool starts(const char *s, const char *lit, int n)
{
	return QVM_BYTE_EQ(0) && QVM_BYTE_EQ(1) && QVM_BYTE_EQ(2) && QVM_BYTE_EQ(3) && QVM_BYTE_EQ(4) &&
	       QVM_BYTE_EQ(5) && QVM_BYTE_EQ(6) && QVM_BYTE_EQ(7) && QVM_BYTE_EQ(8) && QVM_BYTE_EQ(9);
}

/*
 * The decimal number at s[from..], ended by '/': 0 if there is none (or it is too long). `*end` is the offset
 * of the '/'. `from` is a constant, so every access is at a constant offset (unrolled, at most 10 digits).
 */
static __always_inline __u32 pid_at(const char *s, int from, int *end)
{
	__u64 v = 0;
#pragma unroll
	for (int i = 0; i < 11; i++) {
		char c = s[from + i];
		if (c >= '0' && c <= '9') {
			v = v * 10 + (__u64)(c - '0');
			continue;
		}
		if (c != '/' || i == 0 || v > 0xffffffffULL)
			return 0;
		*end = from + i;
		return (__u32)v;
	}
	return 0;
}

/*
 * What /proc/<pid>/<leaf> reaches, as a ptrace mode (0: nothing the guard watches): the VMM's memory (mem),
 * its page table (pagemap), its open files (fd/<n>) and mapped files (map_files/<range>). Not environ: every
 * `ps` of procps-ng 4 opens every process's environ (and it holds the environment the agent gave the VMM,
 * not the guest's memory); enforce mode sees it (ptrace_access_check) with the rest.
 */
static __always_inline __u64 proc_leaf(const char *s)
{
	if (starts(s, "mem", 4)) /* with its NUL: exactly "mem" */
		return PTRACE_MODE_ATTACH;
	if (starts(s, "pagemap", 8))
		return PTRACE_MODE_READ;
	if ((starts(s, "fd/", 3) && s[3]) || (starts(s, "map_files/", 10) && s[10]))
		return PTRACE_MODE_READ;
	return 0;
}

#define QVM_PROC_REST 32 /* the part of a /proc path after "/proc/<pid>/" that matters */

/* /proc/<pid>/<leaf> and /proc/<pid>/task/<tid>/<leaf> in `path` (read from `upath`): report a reach. */
static __always_inline int open_proc(const char *path, const char *upath)
{
	int end = 0, end2 = 0;
	__u32 pid = pid_at(path, 6, &end);
	if (!pid)
		return 0;
	char rest[QVM_PROC_REST] = {};
	/* `end` is 7..16: the rest is read again from the caller's memory, so every later access is at a fixed
	 * offset of `rest` (a second, short read, only for /proc/<digits>/ paths). */
	if (bpf_probe_read_user_str(rest, sizeof(rest), upath + end + 1) <= 0)
		return 0;
	__u64 mode = proc_leaf(rest);
	if (!mode && starts(rest, "task/", 5)) {
		__u32 tid = pid_at(rest, 5, &end2);
		if (!tid)
			return 0;
		pid = tid;
		__builtin_memset(rest, 0, sizeof(rest));
		if (bpf_probe_read_user_str(rest, sizeof(rest), upath + end + 1 + end2 + 1) <= 0)
			return 0;
		mode = proc_leaf(rest);
	}
	if (!mode)
		return 0;
	return reach(pid, mode, 0, path);
}

/* Every open on the host passes here: after the early exits (nothing watched, the agent) one bounded string
 * read from the caller; then /proc paths are parsed, other paths looked up when any path is protected. */
static __always_inline int on_open(const char *upath)
{
	struct qvm_config *cfg = watching();
	if (!cfg)
		return 0;
	__u32 me = current_tgid();
	if (is_agent(me))
		return 0;
	struct qvm_path_key key = {};
	long n = bpf_probe_read_user_str(key.path, sizeof(key.path), upath);
	if (n <= 0)
		return 0;
	if (starts(key.path, "/proc/", 6) && key.path[6] >= '0' && key.path[6] <= '9')
		return open_proc(key.path, upath);
	if (!cfg->paths || n >= (long)sizeof(key.path)) /* longer than any protected path */
		return 0;
	__u32 *owner = bpf_map_lookup_elem(&paths, &key);
	if (!owner)
		return 0;
	__u32 s = *owner;
	struct qvm_slot *st = bpf_map_lookup_elem(&slots, &s);
	if (!st || !st->live || slot_of(me) == (int)s)
		return 0;
	return observe_str(OBSERVE(HOST_READS_INSTANCE_FILE), s, st->vmm_tgid, 0, 0, key.path, false);
}

SEC("tracepoint/syscalls/sys_enter_openat")
int qvm_tp_openat(struct trace_event_raw_sys_enter *ctx)
{
	return on_open((const char *)ctx->args[1]);
}

SEC("tracepoint/syscalls/sys_enter_openat2")
int qvm_tp_openat2(struct trace_event_raw_sys_enter *ctx)
{
	return on_open((const char *)ctx->args[1]);
}

SEC("tracepoint/syscalls/sys_enter_open")
int qvm_tp_open(struct trace_event_raw_sys_enter *ctx)
{
	return on_open((const char *)ctx->args[0]);
}

SEC("tracepoint/syscalls/sys_enter_creat")
int qvm_tp_creat(struct trace_event_raw_sys_enter *ctx)
{
	return on_open((const char *)ctx->args[0]);
}

/* ---- syscalls a VMM task has no business making ---- */

/* The live slot of the current task, or -1 (with the early exit first). */
static __always_inline int my_slot(void)
{
	return watching() ? slot_of(current_tgid()) : -1;
}

SEC("tracepoint/syscalls/sys_enter_mount")
int qvm_tp_mount(struct trace_event_raw_sys_enter *ctx)
{
	int slot = my_slot();
	if (slot < 0)
		return 0;
	/* mount(dev_name, dir_name, type, flags, data): the type, as the VMM wrote it */
	return observe_str(OBSERVE(VMM_MOUNT), slot, 0, ctx->args[3], 0, (const char *)ctx->args[2], true);
}

SEC("tracepoint/syscalls/sys_enter_fsmount")
int qvm_tp_fsmount(struct trace_event_raw_sys_enter *ctx)
{
	int slot = my_slot();
	if (slot < 0)
		return 0;
	return observe_str(OBSERVE(VMM_MOUNT), slot, 0, ctx->args[1], 0, "fsmount", false);
}

SEC("tracepoint/syscalls/sys_enter_move_mount")
int qvm_tp_move_mount(struct trace_event_raw_sys_enter *ctx)
{
	int slot = my_slot();
	if (slot < 0)
		return 0;
	return observe_str(OBSERVE(VMM_MOUNT), slot, 0, ctx->args[4], 0, "move_mount", false);
}

SEC("tracepoint/syscalls/sys_enter_bpf")
int qvm_tp_bpf(struct trace_event_raw_sys_enter *ctx)
{
	int slot = my_slot();
	if (slot < 0)
		return 0;
	return observe_str(OBSERVE(VMM_BPF), slot, 0, ctx->args[0], 0, NULL, false);
}

/* The module and kexec syscalls exist only on kernels built with them: where the tracepoint is absent the
 * loader does not load the program (and says so), and the syscall cannot be made at all. */
#define SYSCALL_BY_MEMBER(sys, rule)                                                   \
	SEC("tracepoint/syscalls/sys_enter_" #sys)                                     \
	int qvm_tp_##sys(struct trace_event_raw_sys_enter *ctx)                        \
	{                                                                              \
		int slot = my_slot();                                                  \
		if (slot < 0)                                                          \
			return 0;                                                      \
		return observe_str(OBSERVE(rule), slot, 0, 0, 0, #sys, false);         \
	}

SYSCALL_BY_MEMBER(init_module, VMM_MODULE)
SYSCALL_BY_MEMBER(finit_module, VMM_MODULE)
SYSCALL_BY_MEMBER(kexec_load, VMM_KEXEC)
SYSCALL_BY_MEMBER(kexec_file_load, VMM_KEXEC)

/* The id changes: reported on entry with the id that would become effective (arg index `which`, -1 for
 * "unchanged"); the loader prints "<syscall> id=<n>". */
#define SETID_BY_MEMBER(sys, which)                                                    \
	SEC("tracepoint/syscalls/sys_enter_" #sys)                                     \
	int qvm_tp_##sys(struct trace_event_raw_sys_enter *ctx)                        \
	{                                                                              \
		int slot = my_slot();                                                  \
		if (slot < 0)                                                          \
			return 0;                                                      \
		return observe_str(OBSERVE(VMM_SETUID), slot, 0, (__u32)ctx->args[which], 0, #sys, false); \
	}

SETID_BY_MEMBER(setuid, 0)
SETID_BY_MEMBER(setreuid, 1)
SETID_BY_MEMBER(setresuid, 1)
SETID_BY_MEMBER(setfsuid, 0)
SETID_BY_MEMBER(setgid, 0)
SETID_BY_MEMBER(setregid, 1)
SETID_BY_MEMBER(setresgid, 1)
SETID_BY_MEMBER(setfsgid, 0)
SETID_BY_MEMBER(setgroups, 0)

/* connect(fd, addr, addrlen): the sockaddr from the VMM's memory, formatted by the loader as in enforce mode. */
SEC("tracepoint/syscalls/sys_enter_connect")
int qvm_tp_connect(struct trace_event_raw_sys_enter *ctx)
{
	int slot = my_slot();
	if (slot < 0)
		return 0;
	const void *address = (const void *)ctx->args[1];
	long addrlen = (long)ctx->args[2];
	__u16 family = 0;
	if (bpf_probe_read_user(&family, sizeof(family), address) < 0)
		family = 0;
	__u32 len = addrlen > 0 ? (__u32)addrlen : 0;
	if (len > QVM_SOCKADDR_BYTES)
		len = QVM_SOCKADDR_BYTES;
	struct qvm_event *e = event(OBSERVE(VMM_CONNECT), 0, slot, 0, (__u64)family | (__u64)len << 16);
	if (e) {
		barrier_var(len); /* as in qvm_connect: a bound the verifier follows */
		len &= 0x7f;
		if (len == 0 || bpf_probe_read_user(e->detail, len, address) < 0)
			e->arg = family;
		e->flags = QVM_EVENT_RAW_SOCKADDR | QVM_EVENT_OBSERVED;
		bpf_ringbuf_submit(e, 0);
	}
	return 0;
}

#endif /* QVM_GUARD_ABI_ONLY */
