/* dh-fresh: makes a guest restored from a snapshot a fresh one.
 *
 * Run by the guest's init after a snapshot point: it blocks reading one
 * line from a virtio-serial port (the host writes it once the VM state is
 * loaded), then sets the wall clock (the saved state carries the old one),
 * mixes the host's entropy into the input pool and forces the kernel's CRNG
 * to reseed from it at once (otherwise every guest restored from one
 * snapshot would draw the same random stream until the next timed reseed),
 * prints the rest of the line (the per-start parameters, key=value) and
 * answers "DH-FRESH" on the port: the host's sign that the state loaded and
 * the guest runs.
 *
 * Line: <unix time in ns> <entropy, hex, 32..256 bytes> [key=value ...]
 * Static (it runs from the initramfs, which has no libc). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/random.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#define MAX_ENTROPY 256

static int die(const char *what)
{
	fprintf(stderr, "dh-fresh: %s: %s\n", what, strerror(errno));
	return 1;
}

static int hexval(int c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	return -1;
}

int main(int argc, char **argv)
{
	static char line[16384];
	size_t n = 0;
	if (argc != 2) {
		fprintf(stderr, "usage: dh-fresh PORT\n");
		return 2;
	}
	int fd = open(argv[1], O_RDWR);
	if (fd < 0)
		return die(argv[1]);
	while (n < sizeof(line) - 1) {  /* byte by byte: nothing after the line is ours */
		ssize_t r = read(fd, line + n, 1);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return r < 0 ? die("read") : (fprintf(stderr, "dh-fresh: port closed\n"), 1);
		if (line[n] == '\n')
			break;
		n++;
	}
	line[n] = 0;

	char *rest = line, *ns_s = strsep(&rest, " "), *hex = strsep(&rest, " ");
	if (!ns_s || !hex || strlen(hex) < 64 || strlen(hex) > 2 * MAX_ENTROPY || strlen(hex) % 2) {
		fprintf(stderr, "dh-fresh: malformed line (want: NS HEX [k=v ...])\n");
		return 1;
	}
	unsigned long long ns = strtoull(ns_s, NULL, 10);
	struct timespec ts = { .tv_sec = ns / 1000000000ull, .tv_nsec = ns % 1000000000ull };
	if (clock_settime(CLOCK_REALTIME, &ts))
		return die("clock_settime");

	struct {
		struct rand_pool_info info;
		unsigned char buf[MAX_ENTROPY];
	} e;
	size_t len = strlen(hex) / 2;
	for (size_t i = 0; i < len; i++) {
		int hi = hexval(hex[2 * i]), lo = hexval(hex[2 * i + 1]);
		if (hi < 0 || lo < 0) {
			fprintf(stderr, "dh-fresh: entropy is not hex\n");
			return 1;
		}
		e.buf[i] = (unsigned char)(hi << 4 | lo);
	}
	e.info.entropy_count = (int)(8 * len);
	e.info.buf_size = (int)len;
	int rnd = open("/dev/urandom", O_WRONLY);
	if (rnd < 0)
		return die("/dev/urandom");
	if (ioctl(rnd, RNDADDENTROPY, &e))
		return die("RNDADDENTROPY");
	if (ioctl(rnd, RNDRESEEDCRNG))
		return die("RNDRESEEDCRNG");
	close(rnd);
	printf("%s\n", rest ? rest : "");
	fflush(stdout);
	static const char ack[] = "DH-FRESH\n";
	if (write(fd, ack, sizeof(ack) - 1) != (ssize_t)(sizeof(ack) - 1))
		return die("write");
	close(fd);
	return 0;
}
