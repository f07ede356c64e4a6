/* The broker's protocol, one line each way over a Unix socket:
 *   -> hello PID PPID NAME
 *   <- shm|ivshmem PATH SIDE LATENCY_NS BYTES_PER_SEC LABEL   or   err MESSAGE
 *   -> stats {JSON}          (at exit)
 * The connection stays open while the process lives: its end tells the
 * broker the process is gone. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "interpose.h"

static int broker_fd = -1;

static int write_all(int fd, const char *s, size_t n)
{
    while (n) {
        ssize_t w = write(fd, s, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return -1;
        s += w;
        n -= (size_t)w;
    }
    return 0;
}

int dh_broker_hello(const char *socket_path, struct dh_channel *ch, char *err, size_t cap)
{
    if (broker_fd >= 0)
        close(broker_fd); /* a forked child's copy of its parent's connection */
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    if (strlen(socket_path) >= sizeof sa.sun_path) {
        snprintf(err, cap, "broker socket path too long: %s", socket_path);
        return -1;
    }
    strcpy(sa.sun_path, socket_path);
    broker_fd = dh_fd_high(socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (broker_fd < 0 || connect(broker_fd, (struct sockaddr *)&sa, sizeof sa)) {
        snprintf(err, cap, "cannot reach the harness at %s (%s)", socket_path, strerror(errno));
        return -1;
    }
    char line[512], name[64] = "?";
    int fd = open("/proc/self/comm", O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        ssize_t n = read(fd, name, sizeof name - 1);
        name[n > 0 ? n - 1 : 0] = 0; /* drop the newline */
        close(fd);
    }
    int n = snprintf(line, sizeof line, "hello %d %d %s\n", getpid(), getppid(), name);
    if (write_all(broker_fd, line, (size_t)n)) {
        snprintf(err, cap, "the harness at %s hung up", socket_path);
        return -1;
    }
    size_t got = 0;
    while (got < sizeof line - 1) {
        ssize_t r = read(broker_fd, line + got, 1);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0 || line[got] == '\n')
            break;
        got++;
    }
    line[got] = 0;
    if (!strncmp(line, "err ", 4)) {
        snprintf(err, cap, "%s", line + 4);
        return -1;
    }
    memset(ch, 0, sizeof *ch);
    if (sscanf(line, "%15s %255s %d %lu %lu %47s", ch->kind, ch->path, &ch->side,
               &ch->latency_ns, &ch->bytes_per_sec, ch->label) != 6) {
        snprintf(err, cap, "the harness answered %.200s", line[0] ? line : "nothing");
        return -1;
    }
    return 0;
}

int dh_broker_open(const struct dh_channel *ch, dh_link **out)
{
    int rc;
    if (!strcmp(ch->kind, "shm")) {
        rc = dh_link_shm_open(ch->path, ch->side, out);
    } else if (!strcmp(ch->kind, "ivshmem")) {
        /* A guest's ivshmem device: sysfs maps its BAR2 (no driver needed). */
        char p[320];
        snprintf(p, sizeof p, "/sys/bus/pci/devices/%s/enable", ch->path);
        int fd = open(p, O_WRONLY | O_CLOEXEC);
        if (fd < 0 || write(fd, "1", 1) != 1) {
            if (fd >= 0)
                close(fd);
            return DH_EIO;
        }
        close(fd);
        snprintf(p, sizeof p, "/sys/bus/pci/devices/%s/resource2", ch->path);
        struct stat st;
        if ((fd = open(p, O_RDWR | O_SYNC | O_CLOEXEC)) < 0 || fstat(fd, &st)) {
            if (fd >= 0)
                close(fd);
            return DH_EIO;
        }
        void *m = dh_sys_mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd,
                              0);
        close(fd);
        if (m == MAP_FAILED)
            return DH_EIO;
        rc = dh_link_shm_attach(m, (size_t)st.st_size, ch->side, DH_WAIT_POLL, out);
    } else {
        return DH_EINVAL;
    }
    if (!rc && (ch->latency_ns || ch->bytes_per_sec)) {
        dh_link_model m = {.latency_ns = ch->latency_ns, .bytes_per_sec = ch->bytes_per_sec};
        dh_link_set_model(*out, &m);
    }
    return rc;
}

void dh_broker_report(const char *json)
{
    if (broker_fd < 0)
        return;
    if (!write_all(broker_fd, "stats ", 6) && !write_all(broker_fd, json, strlen(json)))
        write_all(broker_fd, "\n", 1);
}
