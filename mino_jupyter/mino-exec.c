/* mino-exec: the resident cell executor of one mino session container.
 *
 * Started once per session by an engine exec as the cell user, stdin attached. It runs one
 * cell at a time with /bin/bash and relays the cell's output as frames; see
 * docs/executor-design.md for the protocol and the security argument. In short:
 *
 *   every message, both ways:  type (1 byte) | length (4 bytes, big-endian) | payload
 *
 *   host -> executor (stdin)
 *     'R' run:    nonce[16] | grace_ms u32 | fields: tag (1) | length u32 | bytes
 *                 tags: 'C' working directory, 'S' script, 'V' one environment entry "K=V"
 *     'K' signal: nonce[16] | signal u32      (to the cell's process group; ignored if the
 *                                             nonce is not the running cell's)
 *   executor -> host (stdout; nothing else ever writes there)
 *     'H' hello:  "mino-exec 1 pid=N"         (after it made itself non-dumpable)
 *     'S' start:  nonce[16] | "pid=N"          (N: the cell's shell, leader of its own session)
 *     'O' / 'E':  the cell's stdout / stderr bytes
 *     'X' end:    nonce[16] | how (1: 'e' exit, 's' signal, 'f' not started, 'b' busy,
 *                 't' not started: the executor's limits were changed, it exits)
 *                 | value u32 | flags u32 (1: the cell's pipes were still open at the end)
 *     'L' log:    a line about a request the executor refused
 *
 * A cell ends when its shell has exited and its stdout and stderr are closed, or GRACE ms after
 * the shell exited when something it left behind still holds them. What such a process writes
 * later is read and thrown away: it never reaches the host, and the writer is not killed by
 * SIGPIPE. If stdin closes (or stdout breaks), every process group it started is killed and it
 * exits.
 *
 * Build: gcc -O2 -static -o mino-exec mino-exec.c   (install mode 0111/0711, root-owned)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define NONCE 16
#define MAX_REQUEST (64u << 20)
#define MAX_ARGV_SCRIPT 100000 /* larger scripts go to bash through a memfd */
#define MAX_ENV 4096
#define MAX_GROUPS 4096
#define MAX_DRAIN 256
#define CHUNK 65536
#define BASH "/bin/bash"
#define DEFAULT_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

static int sig_r = -1, sig_w = -1;   /* self-pipe: SIGCHLD arrived */

/* What the executor was started with. A cell runs as the executor's uid, so it can change the
 * executor's resource limits, nice value, CPU affinity and I/O priority (prlimit, renice, taskset,
 * ionice: none of them asks whether the target is dumpable), and every later cell would inherit
 * them. So before each cell: anything changed, and this executor ends (a new one starts). */
static struct {
    struct rlimit lim[RLIM_NLIMITS];
    int nice;
    cpu_set_t cpus;
    long ioprio;
} born;

static void note_birth(void)
{
    for (int r = 0; r < RLIM_NLIMITS; r++)
        getrlimit(r, &born.lim[r]);
    errno = 0;
    born.nice = getpriority(PRIO_PROCESS, 0);
    CPU_ZERO(&born.cpus);
    sched_getaffinity(0, sizeof born.cpus, &born.cpus);
    born.ioprio = syscall(SYS_ioprio_get, 1 /* IOPRIO_WHO_PROCESS */, 0);
}

static const char *changed_since_birth(void)
{
    for (int r = 0; r < RLIM_NLIMITS; r++) {
        struct rlimit now;
        if (getrlimit(r, &now) != 0 || now.rlim_cur != born.lim[r].rlim_cur || now.rlim_max != born.lim[r].rlim_max)
            return "its resource limits";
    }
    errno = 0;
    int nice = getpriority(PRIO_PROCESS, 0);
    if (errno || nice != born.nice)
        return "its nice value";
    cpu_set_t cpus;
    CPU_ZERO(&cpus);
    if (sched_getaffinity(0, sizeof cpus, &cpus) != 0 || !CPU_EQUAL(&cpus, &born.cpus))
        return "its CPU affinity";
    if (syscall(SYS_ioprio_get, 1, 0) != born.ioprio)
        return "its I/O priority";
    return NULL;
}

static struct {
    pid_t pid;                        /* 0: no cell running */
    uint8_t nonce[NONCE];
    int out, err;                     /* read ends, -1 once at EOF */
    int exited, status;
    uint32_t grace_ms;
    struct timespec exited_at;
} cell = {0, {0}, -1, -1, 0, 0, 0, {0, 0}};

static pid_t groups[MAX_GROUPS];      /* every cell's process group, killed when stdin closes */
static int ngroups;
static int drain[MAX_DRAIN];          /* pipes of ended cells: read and discarded */
static int ndrain;

static void kill_everything_and_exit(int code)
{
    if (cell.pid > 0)
        kill(cell.pid, SIGKILL);
    for (int i = 0; i < ngroups; i++)
        kill(-groups[i], SIGKILL);
    _exit(code);
}

static void put32(uint8_t *p, uint32_t v) { p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v; }
static uint32_t get32(const uint8_t *p) { return (uint32_t)p[0] << 24 | p[1] << 16 | p[2] << 8 | p[3]; }

/* One frame to stdout, whole; a broken stdout means the host is gone. */
static void frame(char type, const void *a, size_t alen, const void *b, size_t blen)
{
    uint8_t head[5];
    head[0] = (uint8_t)type;
    put32(head + 1, (uint32_t)(alen + blen));
    struct iovec iov[3] = {{head, 5}, {(void *)a, alen}, {(void *)b, blen}};
    int n = 3, i = 0;
    while (i < n) {
        ssize_t w = writev(1, iov + i, n - i);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            kill_everything_and_exit(3);
        }
        while (i < n && (size_t)w >= iov[i].iov_len)
            w -= iov[i++].iov_len;
        if (i < n) {
            iov[i].iov_base = (char *)iov[i].iov_base + w;
            iov[i].iov_len -= w;
        }
    }
}

static void logf_(const char *fmt, const char *arg)
{
    char line[512];
    int n = snprintf(line, sizeof line, fmt, arg);
    frame('L', line, n < 0 ? 0 : (size_t)n >= sizeof line ? sizeof line - 1 : (size_t)n, NULL, 0);
}

static void end_record(const uint8_t *nonce, char how, uint32_t value, uint32_t flags)
{
    uint8_t p[NONCE + 9];
    memcpy(p, nonce, NONCE);
    p[NONCE] = (uint8_t)how;
    put32(p + NONCE + 1, value);
    put32(p + NONCE + 5, flags);
    frame('X', p, sizeof p, NULL, 0);
}

static void on_sigchld(int sig)
{
    (void)sig;
    int saved = errno;
    (void)!write(sig_w, "c", 1);
    errno = saved;
}

static long ms_since(const struct timespec *t)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (now.tv_sec - t->tv_sec) * 1000L + (now.tv_nsec - t->tv_nsec) / 1000000L;
}

/* ------------------------------------------------------------------ starting a cell */

struct request {
    const char *cwd;
    const uint8_t *script;
    size_t script_len;
    char *env[MAX_ENV + 3];
    int nenv;
    int has_path;
};

/* Parse a run request's fields in place (they are copied to NUL-terminated strings). */
static const char *parse_run(uint8_t *p, size_t len, struct request *rq, char **store)
{
    memset(rq, 0, sizeof *rq);
    rq->cwd = "/workspace";
    char *s = *store;                 /* room for every field plus a NUL each */
    size_t at = 0;
    while (at < len) {
        if (len - at < 5)
            return "truncated field";
        uint8_t tag = p[at];
        uint32_t n = get32(p + at + 1);
        at += 5;
        if (n > len - at)
            return "field longer than the request";
        const uint8_t *v = p + at;
        at += n;
        if (tag == 'S') {
            rq->script = v;
            rq->script_len = n;
            continue;
        }
        if (memchr(v, 0, n))
            return "NUL byte in a working directory or environment entry";
        memcpy(s, v, n);
        s[n] = 0;
        if (tag == 'C') {
            rq->cwd = s;
        } else if (tag == 'V') {
            if (!strchr(s, '=') || s[0] == '=')
                return "environment entry without a name";
            if (!strncmp(s, "BASH_ENV=", 9) || !strncmp(s, "ENV=", 4))
                continue;             /* never: bash would run that file first */
            if (rq->nenv >= MAX_ENV)
                return "too many environment entries";
            rq->has_path |= !strncmp(s, "PATH=", 5);
            rq->env[rq->nenv++] = s;
        } else {
            return "unknown field";
        }
        s += n + 1;
        *store = s;                   /* what was copied is wiped by the caller, refused or not */
    }
    if (!rq->script)
        return "no script";
    return NULL;
}

static void start_cell(const uint8_t *nonce, uint32_t grace_ms, struct request *rq)
{
    static char bash_env[] = "BASH_ENV=", path_env[] = "PATH=" DEFAULT_PATH;
    rq->env[rq->nenv++] = bash_env;
    if (!rq->has_path)
        rq->env[rq->nenv++] = path_env;
    rq->env[rq->nenv] = NULL;

    int big = rq->script_len > MAX_ARGV_SCRIPT || memchr(rq->script, 0, rq->script_len) != NULL;
    char *script = NULL;
    int memfd = -1;
    if (big) {                        /* bash reads it from /dev/fd/3: no argv limit, no NULs lost */
        memfd = memfd_create("mino-cell", MFD_CLOEXEC);
        if (memfd < 0 || write(memfd, rq->script, rq->script_len) != (ssize_t)rq->script_len) {
            logf_("cannot hand the script over: %s", strerror(errno));
            end_record(nonce, 'f', 126, 0);
            if (memfd >= 0)
                close(memfd);
            return;
        }
    } else {
        script = strndup((const char *)rq->script, rq->script_len);
    }
    char *argv_small[] = {BASH, "--noprofile", "--norc", "-c", script, "mino-cell", NULL};
    char *argv_big[] = {BASH, "--noprofile", "--norc", "/dev/fd/3", NULL};

    int out[2], err[2];
    if (pipe2(out, O_CLOEXEC) < 0 || pipe2(err, O_CLOEXEC) < 0) {
        logf_("cannot make pipes: %s", strerror(errno));
        end_record(nonce, 'f', 126, 0);
        free(script);
        return;
    }
    pid_t pid = fork();
    if (pid == 0) {
        /* The child: non-dumpable like its parent until execve (bash is readable, so the exec
         * makes it an ordinary process again). */
        struct sigaction dfl = {.sa_handler = SIG_DFL};
        for (int s = 1; s < NSIG; s++)
            sigaction(s, &dfl, NULL);
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        setsid();
        int null = open("/dev/null", O_RDONLY);
        if (null < 0 || dup2(null, 0) < 0 || dup2(out[1], 1) < 0 || dup2(err[1], 2) < 0)
            _exit(126);
        if (memfd >= 0 && dup2(memfd, 3) < 0)
            _exit(126);
        syscall(SYS_close_range, memfd >= 0 ? 4 : 3, ~0U, 0);  /* CLOEXEC covers it too */
        if (chdir(rq->cwd) < 0) {
            dprintf(2, "mino-exec: cannot enter %s: %s\n", rq->cwd, strerror(errno));
            _exit(126);
        }
        execve(BASH, big ? argv_big : argv_small, rq->env);
        dprintf(2, "mino-exec: cannot run %s: %s\n", BASH, strerror(errno));
        _exit(127);
    }
    int saved = errno;
    close(out[1]);
    close(err[1]);
    if (memfd >= 0)
        close(memfd);
    free(script);
    if (pid < 0) {
        close(out[0]);
        close(err[0]);
        logf_("cannot start the cell: %s", strerror(saved));
        end_record(nonce, 'f', 126, 0);
        return;
    }
    fcntl(out[0], F_SETFL, O_NONBLOCK);
    fcntl(err[0], F_SETFL, O_NONBLOCK);
    cell.pid = pid;
    memcpy(cell.nonce, nonce, NONCE);
    cell.out = out[0];
    cell.err = err[0];
    cell.exited = 0;
    cell.grace_ms = grace_ms;
    if (ngroups == MAX_GROUPS) {      /* forget the groups that are gone */
        int kept = 0;
        for (int i = 0; i < ngroups; i++)
            if (kill(-groups[i], 0) == 0 || errno != ESRCH)
                groups[kept++] = groups[i];
        ngroups = kept;
    }
    if (ngroups < MAX_GROUPS)
        groups[ngroups++] = pid;
    char text[32];
    int n = snprintf(text, sizeof text, "pid=%d", (int)pid);
    frame('S', nonce, NONCE, text, (size_t)n);
}

/* ------------------------------------------------------------------ the cell's output */

/* Relay what one pipe has now (at most `rounds` reads); -1 in *fd once it is at EOF. */
static void relay(int *fd, char type, int rounds)
{
    static char buf[CHUNK];
    while (*fd >= 0 && rounds-- > 0) {
        ssize_t n = read(*fd, buf, sizeof buf);
        if (n > 0) {
            frame(type, buf, (size_t)n, NULL, 0);
            continue;
        }
        if (n < 0 && (errno == EINTR))
            continue;
        if (n < 0 && errno == EAGAIN)
            return;
        close(*fd);                   /* EOF (or an error: treated alike) */
        *fd = -1;
    }
}

static void keep_draining(int fd)
{
    if (fd < 0)
        return;
    if (ndrain == MAX_DRAIN) {        /* too many left-behind writers: the oldest loses its pipe */
        close(drain[0]);
        memmove(drain, drain + 1, sizeof drain[0] * --ndrain);
    }
    drain[ndrain++] = fd;
}

static void finish_cell(void)
{
    /* What is in the pipes now was written before the end: it still belongs to this cell. */
    relay(&cell.out, 'O', 16);
    relay(&cell.err, 'E', 16);
    uint32_t flags = (cell.out >= 0 || cell.err >= 0) ? 1 : 0;
    keep_draining(cell.out);
    keep_draining(cell.err);
    int st = cell.status;
    cell.pid = 0;
    cell.out = cell.err = -1;
    if (WIFSIGNALED(st))
        end_record(cell.nonce, 's', (uint32_t)WTERMSIG(st), flags);
    else
        end_record(cell.nonce, 'e', (uint32_t)WEXITSTATUS(st), flags);
}

static void reap(void)
{
    char junk[64];
    while (read(sig_r, junk, sizeof junk) > 0)
        ;
    int st;
    pid_t pid;
    while ((pid = waitpid(-1, &st, WNOHANG)) > 0) {
        if (pid == cell.pid && !cell.exited) {
            cell.exited = 1;
            cell.status = st;
            clock_gettime(CLOCK_MONOTONIC, &cell.exited_at);
        }
    }
}

/* ------------------------------------------------------------------ requests */

static void signal_cell(int sig)
{
    if (kill(-cell.pid, sig) < 0 && errno == ESRCH)
        kill(cell.pid, sig);          /* not yet the leader of its own session */
}

static void handle(uint8_t type, uint8_t *p, uint32_t len)
{
    static char *store;
    static size_t store_len;
    if (type == 'R') {
        if (len < NONCE + 4) {
            logf_("%s", "short run request");
            return;
        }
        if (cell.pid) {
            logf_("%s", "a cell is still running");
            end_record(p, 'b', 0, 0);
            return;
        }
        const char *changed = changed_since_birth();
        if (changed) {  /* no cell starts with what another cell set: a new executor takes it */
            logf_("a process changed %s; this executor ends and a new one starts", changed);
            end_record(p, 't', 0, 0);
            _exit(5);
        }
        if (store_len < 2 * (size_t)len + 16) {
            free(store);
            store_len = 2 * (size_t)len + 16;  /* every field copied with a NUL */
            store = malloc(store_len);
            if (!store)
                kill_everything_and_exit(4);
        }
        char *cursor = store;
        struct request rq;
        const char *bad = parse_run(p + NONCE + 4, len - NONCE - 4, &rq, &cursor);
        if (bad) {
            logf_("refused a run request: %s", bad);
            end_record(p, 'f', 126, 0);
        } else {
            start_cell(p, get32(p + NONCE), &rq);
        }
        explicit_bzero(store, (size_t)(cursor - store));  /* the cell's secrets stay in its own env only */
    } else if (type == 'K') {
        if (len != NONCE + 4)
            return;
        uint32_t sig = get32(p + NONCE);
        if (cell.pid && !cell.exited && !memcmp(p, cell.nonce, NONCE) && sig > 0 && sig < NSIG)
            signal_cell((int)sig);
    } else {
        char t[2] = {(char)type, 0};
        logf_("unknown request type %s", t);
    }
}

int main(void)
{
    /* First: no other process of this uid may trace us, or open /proc/self/{fd,mem,environ}. */
    if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0 || prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) != 0) {
        static const char msg[] = "mino-exec: cannot make itself non-dumpable\n";
        (void)!write(2, msg, sizeof msg - 1);
        return 2;
    }
    clearenv();                       /* nothing of the exec's environment reaches a cell */
    note_birth();
    signal(SIGPIPE, SIG_IGN);
    int sp[2];
    if (pipe2(sp, O_CLOEXEC | O_NONBLOCK) < 0)
        return 2;
    sig_r = sp[0];
    sig_w = sp[1];
    struct sigaction sa = {.sa_handler = on_sigchld, .sa_flags = SA_RESTART | SA_NOCLDSTOP};
    sigaction(SIGCHLD, &sa, NULL);
    fcntl(0, F_SETFD, FD_CLOEXEC);
    fcntl(1, F_SETFD, FD_CLOEXEC);
    fcntl(2, F_SETFD, FD_CLOEXEC);

    char hello[64];
    int n = snprintf(hello, sizeof hello, "mino-exec 1 pid=%d", (int)getpid());
    frame('H', hello, (size_t)n, NULL, 0);

    uint8_t *in = NULL;
    size_t in_len = 0, in_cap = 0;
    for (;;) {
        struct pollfd fds[4 + MAX_DRAIN];
        int nf = 0;
        fds[nf++] = (struct pollfd){0, POLLIN, 0};
        fds[nf++] = (struct pollfd){sig_r, POLLIN, 0};
        fds[nf++] = (struct pollfd){cell.out, POLLIN, 0};  /* fd -1 is skipped by poll */
        fds[nf++] = (struct pollfd){cell.err, POLLIN, 0};
        for (int i = 0; i < ndrain; i++)
            fds[nf++] = (struct pollfd){drain[i], POLLIN, 0};
        int timeout = -1;
        if (cell.pid && cell.exited) {
            long left = (long)cell.grace_ms - ms_since(&cell.exited_at);
            timeout = left < 0 ? 0 : (int)left;
        }
        if (poll(fds, (nfds_t)nf, timeout) < 0 && errno != EINTR)
            kill_everything_and_exit(3);

        if (fds[1].revents)
            reap();
        /* Both ready in one look: stderr first. It is unbuffered, so what it holds was written no
         * later than the stdout beside it in most programs (`ls /nonexistent || echo after`). */
        if (fds[3].revents)
            relay(&cell.err, 'E', 4);
        if (fds[2].revents)
            relay(&cell.out, 'O', 4);
        for (int i = ndrain - 1; i >= 0; i--) {
            if (!fds[4 + i].revents)
                continue;
            static char junk[CHUNK];
            ssize_t r = read(drain[i], junk, sizeof junk);
            if (r == 0 || (r < 0 && errno != EINTR && errno != EAGAIN)) {
                close(drain[i]);
                drain[i] = drain[--ndrain];
            }
        }
        if (cell.pid && cell.exited &&
            ((cell.out < 0 && cell.err < 0) || ms_since(&cell.exited_at) >= (long)cell.grace_ms))
            finish_cell();

        if (fds[0].revents) {
            if (in_cap - in_len < CHUNK) {
                in_cap = in_cap ? in_cap * 2 : 2 * CHUNK;
                uint8_t *bigger = malloc(in_cap);
                if (!bigger)
                    kill_everything_and_exit(4);
                memcpy(bigger, in, in_len);
                explicit_bzero(in, in_len);
                free(in);
                in = bigger;
            }
            ssize_t r = read(0, in + in_len, in_cap - in_len);
            if (r == 0 || (r < 0 && errno != EINTR && errno != EAGAIN))
                kill_everything_and_exit(0);  /* the host is gone */
            if (r > 0)
                in_len += (size_t)r;
            size_t at = 0;
            while (in_len - at >= 5) {
                uint32_t len = get32(in + at + 1);
                if (len > MAX_REQUEST) {
                    logf_("%s", "request too large: the stream is broken");
                    kill_everything_and_exit(2);
                }
                if (in_len - at - 5 < len)
                    break;
                handle(in[at], in + at + 5, len);
                at += 5 + len;
            }
            memmove(in, in + at, in_len - at);
            explicit_bzero(in + (in_len - at), at);
            in_len -= at;
        }
    }
}
